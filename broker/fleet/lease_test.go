package fleet

import (
	"testing"
	"time"
)

// leaseOpts give a token's lock a lease of 2s (four times timeout_max)
// and a lock TTL of 20s. A waiting lookup makes three Redis calls per lock
// poll, well within its timeout_max on a busy machine.
func leaseOpts(o *Options) {
	o.Timeout, o.MaxTimeout, o.LockTTL, o.LockPoll = 20*time.Millisecond, 500*time.Millisecond, 20*time.Second, 500*time.Millisecond
}

// TestTokenLockOfKilledHolderFreedWithinFetch: a node killed while it
// holds a token's lock (its keep-alive stops, the lock is never released)
// holds up the key's lookups on the other nodes for a short lease, not for
// the lock TTL (at least the fetch timeout): a lookup whose context is
// shorter than the lock TTL, as a fetch's is, takes the lock once the
// lease has run out and mints, rather than failing with its deadline.
func TestTokenLockOfKilledHolderFreedWithinFetch(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	killed, other := newNode(t, r, keys, leaseOpts), newNode(t, r, keys, leaseOpts)
	subject := "tok:" + killed.name(testKey)
	h, err := killed.obtain(testCtx(t), subject)
	if err != nil {
		t.Fatal(err)
	}
	close(h.stop) // the process dies: no keep-alive, no release
	h.wg.Wait()

	fetchTimeout := 5 * time.Second // shorter than the lock TTL
	var m minter
	tok, adopted, err := other.Fetch(testCtxFor(t, fetchTimeout), testKey, usable, m.mint)
	if err != nil || adopted || tok.Value == "" || m.n.Load() != 1 {
		t.Fatalf("lookup while a killed node's lock is left: adopted=%v err=%v mints=%d; want the lock taken once the killed holder's lease ran out, and one mint",
			adopted, err, m.n.Load())
	}
	if other.obs.bypass() != 0 {
		t.Errorf("bypassed %d; want the lock taken, not bypassed", other.obs.bypass())
	}
}

// TestTokenLockLeaseKeptByLiveHolder: a live holder whose mint outlasts
// its token lock's lease keeps the lock (its keep-alive renews the lease):
// a lookup on another node waits for its token and adopts it; the key is
// minted once.
func TestTokenLockLeaseKeptByLiveHolder(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	holder, other := newNode(t, r, keys, leaseOpts), newNode(t, r, keys, leaseOpts)
	ctx := testCtx(t)
	m := minter{gate: make(chan struct{}), in: make(chan struct{}, 2)}
	done := make(chan error, 1)
	go func() {
		_, _, err := holder.Fetch(ctx, testKey, usable, m.mint)
		done <- err
	}()
	<-m.in // the holder mints under the lock
	type result struct {
		adopted bool
		err     error
	}
	waited := make(chan result, 1)
	go func() {
		_, adopted, err := other.Fetch(ctx, testKey, usable, m.mint)
		waited <- result{adopted, err}
	}()
	// The mint outlasts the lease: the lock's expiry is renewed every
	// quarter of it, before it runs out.
	lockKey := holder.lockKey("tok:" + holder.name(testKey))
	lease := holder.lockTTL("tok:" + holder.name(testKey))
	raw := r.Client()
	last, renewals := raw.PTTL(ctx, lockKey).Val(), 0
	for deadline := time.Now().Add(10 * time.Second); renewals < 5; time.Sleep(lease / 20) {
		if time.Now().After(deadline) {
			t.Fatalf("the holder's lock was renewed %d times in 10s; want every quarter of its lease (%s)", renewals, lease)
		}
		ttl := raw.PTTL(ctx, lockKey).Val()
		if ttl <= 0 {
			t.Fatalf("the live holder's lock is gone (PTTL %s) after %d renewals", ttl, renewals)
		}
		if ttl > last {
			renewals++
		}
		last = ttl
	}
	close(m.gate)
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	res := <-waited
	if res.err != nil || !res.adopted || m.n.Load() != 1 {
		t.Fatalf("other node: adopted=%v err=%v mints=%d; want the holder's token adopted, one mint", res.adopted, res.err, m.n.Load())
	}
}
