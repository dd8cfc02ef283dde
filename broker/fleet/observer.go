package fleet

// Observer is told what the shared tier does, for metrics. Every method is
// called synchronously on the request path, so it must be cheap and safe
// for concurrent use. No method receives a key, a merchant or a token:
// redisstore.Metrics counts them in label-free counters.
type Observer interface {
	// L2Hit is called when a lookup found a usable token in Redis on its
	// first read.
	L2Hit()
	// L2Miss is called when a lookup found no usable token in Redis on its
	// first read.
	L2Miss()
	// L2Error is called when a Redis call failed or timed out; op names it
	// (get, set, lock, unlock, pttl, publish, purge).
	L2Error(op string)
	// LockWait is called when a lookup waits because another node holds
	// the key's lock.
	LockWait()
	// Adopted is called when, after a miss, a lookup used the token that
	// another node minted (after waiting for it, or found under the lock),
	// without minting one.
	Adopted()
	// InvalidationReceived is called for each purge announced by another
	// node.
	InvalidationReceived()
	// Undecryptable is called when a value in Redis does not open: sealed
	// with an unknown key, altered, or not written by the broker. It is
	// ignored (treated as absent).
	Undecryptable()
	// Bypassed is called when a lookup minted without the shared tier
	// because Redis was unavailable (breaker open, error or timeout), or
	// without the key's lock after waiting Options.LockTTL for it.
	Bypassed()
	// RolledBack is called when a value in Redis is older than one this
	// node has seen for its key: an old value written back (a purged
	// token, a spent refresh token) or a failover that lost the newest
	// write. A token is ignored (treated as absent); a refresh token is
	// replaced by the newer one this node has.
	RolledBack()
	// L2Timeout is called when a Redis call ran out of its bound (op as
	// for L2Error, which is called too). A timeout is slow, not failed:
	// it opens the breaker only when timeouts last (Options.SlowSpan).
	L2Timeout(op string)
	// BreakerOpened is called when the breaker opens: lookups mint
	// without Redis for Options.BreakerCooldown.
	BreakerOpened()
}

// NopObserver is an Observer that does nothing.
type NopObserver struct{}

// L2Hit implements Observer.
func (NopObserver) L2Hit() {}

// L2Miss implements Observer.
func (NopObserver) L2Miss() {}

// L2Error implements Observer.
func (NopObserver) L2Error(string) {}

// LockWait implements Observer.
func (NopObserver) LockWait() {}

// Adopted implements Observer.
func (NopObserver) Adopted() {}

// InvalidationReceived implements Observer.
func (NopObserver) InvalidationReceived() {}

// Undecryptable implements Observer.
func (NopObserver) Undecryptable() {}

// Bypassed implements Observer.
func (NopObserver) Bypassed() {}

// RolledBack implements Observer.
func (NopObserver) RolledBack() {}

// L2Timeout implements Observer.
func (NopObserver) L2Timeout(string) {}

// BreakerOpened implements Observer.
func (NopObserver) BreakerOpened() {}

var _ Observer = NopObserver{}
