// Package broker is the core of the token broker: it obtains access tokens
// from providers' token APIs (Sources), caches them per (source,
// organisation, scopes, audience), makes sure that only one fetch per key is
// in flight, and refreshes tokens ahead of their expiry so that requests do
// not wait. It does not import Caddy, so it can be used, tested and
// benchmarked on its own.
package broker

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	gocache "github.com/patrickmn/go-cache"
	"golang.org/x/sync/singleflight"
)

// Defaults of Options.
const (
	DefaultRefreshWindow   = 0.25
	DefaultLeeway          = time.Second
	DefaultFetchTimeout    = 30 * time.Second
	DefaultRefreshRetry    = time.Second
	DefaultCleanupInterval = time.Minute
)

// Options configure a Broker. The zero value gives the defaults.
type Options struct {
	// RefreshWindow is the last part of a token's lifetime, as a fraction
	// between 0 and 1, in which a request is still served the cached token
	// but starts one background refresh. Default 0.25 (the last 25 %).
	// A negative value disables refresh-ahead.
	RefreshWindow float64
	// Leeway is how long a token must still be valid to be handed out: a
	// token closer to its expiry than this counts as expired, so it cannot
	// expire on its way to the provider. Default 1s.
	Leeway time.Duration
	// FetchTimeout bounds one call to a Source, whoever waits on it.
	// Default 30s.
	FetchTimeout time.Duration
	// RefreshRetry is how long to wait before another background refresh
	// after one failed (the cached token keeps being served meanwhile).
	// Default 1s.
	RefreshRetry time.Duration
	// CleanupInterval is how often expired tokens are dropped from memory.
	// Default 1m.
	CleanupInterval time.Duration
	// MaxAttempts is how many times one fetch calls the Source when it
	// fails with a temporary error (timeout, refused connection, 429, 5xx),
	// waiting an exponential backoff with jitter in between, within the
	// fetch's deadline. Default 3; 1 disables retries.
	MaxAttempts int
	// BackoffBase is the wait before the second attempt. Default 100ms.
	BackoffBase time.Duration
	// BackoffMax caps the wait between attempts. Default 2s. A provider's
	// Retry-After is honoured when longer, if the deadline allows.
	BackoffMax time.Duration
	// FailureTTL is how long a failed fetch is remembered for its key:
	// requests in that time get the same error without calling the token
	// API again, so an outage does not multiply the load on the provider.
	// A provider's Retry-After extends it. Default 2s; negative disables.
	FailureTTL time.Duration
	// BreakerThreshold is how many consecutive temporary failures of one
	// source open its circuit breaker. Default 5; negative disables.
	BreakerThreshold int
	// BreakerCooldown is how long an open breaker refuses calls before it
	// lets one probe through. Default 10s.
	BreakerCooldown time.Duration
	// Now is the clock. Default time.Now. Tests inject their own.
	Now func() time.Time
	// Sleep waits between attempts. Default: a timer. Tests inject their
	// own so that backoff costs no time.
	Sleep func(ctx context.Context, d time.Duration) error
	// Observer is told about lookups and fetches (metrics, logs). Optional.
	Observer Observer
}

// Result says how a lookup was served.
type Result uint8

// Lookup results.
const (
	// Hit: a cached token, not yet in its refresh window.
	Hit Result = iota
	// RefreshAhead: a cached token in its refresh window; this lookup
	// started the one background refresh.
	RefreshAhead
	// Miss: no usable token was cached; this lookup waited on a fetch it
	// started.
	Miss
	// Shared: no usable token was cached; this lookup waited on a fetch
	// another lookup had started.
	Shared
)

// String names the result for logs, metrics and placeholders.
func (r Result) String() string {
	switch r {
	case Hit:
		return "hit"
	case RefreshAhead:
		return "refresh"
	case Miss:
		return "miss"
	case Shared:
		return "shared"
	}
	return "unknown"
}

// Observer is told what the broker does. Implementations must be fast and
// safe for concurrent use; Lookup runs on every request.
type Observer interface {
	// Lookup is called once per successful Get with how it was served.
	Lookup(b *Binding, r Result)
	// Fetched is called after every call to a Source, with the token
	// (never log its Value) or the error, and how long the call took.
	// background is true for refresh-ahead fetches.
	Fetched(ctx context.Context, b *Binding, tok Token, elapsed time.Duration, background bool, err error)
}

// BreakerObserver is an optional interface of an Observer: it is told when a
// source's circuit breaker changes state.
type BreakerObserver interface {
	BreakerChanged(sourceID string, state BreakerState)
}

// Entry is a cached token with the Authorization header value built once.
// Entries are immutable once cached, apart from their refresh bookkeeping.
type Entry struct {
	tok       Token
	header    string
	refreshAt time.Time
	binding   *Binding
	// fingerprint of the token, computed once.
	fingerprint string

	stale       atomic.Bool // replaced by a newer token, or purged
	refreshing  atomic.Bool
	nextAttempt atomic.Int64 // unix nanoseconds; earliest next background refresh
}

// Token returns the cached token.
func (e *Entry) Token() Token { return e.tok }

// Header returns "Bearer <token>", the value of the Authorization header.
func (e *Entry) Header() string { return e.header }

// Fingerprint is the token's fingerprint, computed once per token.
func (e *Entry) Fingerprint() string { return e.fingerprint }

// RefreshAt is when the entry enters its refresh window.
func (e *Entry) RefreshAt() time.Time { return e.refreshAt }

// Broker caches tokens and fetches them from Sources. It is safe for
// concurrent use. One Broker serves any number of sources and bindings.
type Broker struct {
	opts  Options
	cache *gocache.Cache
	group singleflight.Group

	mu       sync.Mutex // orders cache writes with Purge's compare-and-delete
	failures sync.Map   // key -> *failure
	breakers sync.Map   // SourceID -> *breaker
}

// New returns a Broker. Call Close when done with it.
func New(opts Options) *Broker {
	if opts.RefreshWindow == 0 {
		opts.RefreshWindow = DefaultRefreshWindow
	}
	if opts.RefreshWindow > 1 {
		opts.RefreshWindow = 1
	}
	if opts.Leeway == 0 {
		opts.Leeway = DefaultLeeway
	}
	if opts.FetchTimeout == 0 {
		opts.FetchTimeout = DefaultFetchTimeout
	}
	if opts.RefreshRetry == 0 {
		opts.RefreshRetry = DefaultRefreshRetry
	}
	if opts.CleanupInterval == 0 {
		opts.CleanupInterval = DefaultCleanupInterval
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	if opts.MaxAttempts <= 0 {
		opts.MaxAttempts = DefaultMaxAttempts
	}
	if opts.BackoffBase <= 0 {
		opts.BackoffBase = DefaultBackoffBase
	}
	if opts.BackoffMax <= 0 {
		opts.BackoffMax = DefaultBackoffMax
	}
	if opts.FailureTTL == 0 {
		opts.FailureTTL = DefaultFailureTTL
	}
	if opts.BreakerThreshold == 0 {
		opts.BreakerThreshold = DefaultBreakerThreshold
	}
	if opts.BreakerCooldown <= 0 {
		opts.BreakerCooldown = DefaultBreakerCooldown
	}
	if opts.Sleep == nil {
		opts.Sleep = sleepCtx
	}
	return &Broker{opts: opts, cache: gocache.New(gocache.NoExpiration, opts.CleanupInterval)}
}

// Close drops every cached token. Fetches in flight finish on their own.
func (br *Broker) Close() {
	br.mu.Lock()
	defer br.mu.Unlock()
	for _, it := range br.cache.Items() {
		it.Object.(*Entry).stale.Store(true)
	}
	br.cache.Flush()
}

// Token returns a valid token for the binding: from the cache, or from its
// Source. It never returns a token closer than Leeway to its expiry.
func (br *Broker) Token(ctx context.Context, b *Binding) (Token, error) {
	e, _, err := br.Get(ctx, b)
	if err != nil {
		return Token{}, err
	}
	return e.tok, nil
}

// Get returns the cache entry holding a valid token for the binding and how
// it was served. A cached token in its refresh window is returned at once and
// one background refresh is started. Without a usable cached token, Get
// waits for the one fetch in flight for the binding's key (starting it if
// needed) or for ctx to end, whichever comes first; a caller giving up does
// not cancel the fetch for the others.
func (br *Broker) Get(ctx context.Context, b *Binding) (*Entry, Result, error) {
	now := br.opts.Now()
	// The binding remembers the entry it was last served: on the hot path
	// no shared map is read and no lock is taken. An entry replaced by a
	// newer token or purged is marked stale, and the cache is asked again.
	e := b.current.Load()
	if e == nil || e.stale.Load() || !e.tok.ValidAt(now, br.opts.Leeway) {
		e = nil
		if v, ok := br.cache.Get(b.key); ok {
			e = v.(*Entry)
			b.current.Store(e)
		}
	}
	if e != nil {
		if e.tok.ValidAt(now, br.opts.Leeway) {
			r := Hit
			if !now.Before(e.refreshAt) && now.UnixNano() >= e.nextAttempt.Load() &&
				e.refreshing.CompareAndSwap(false, true) {
				r = RefreshAhead
				br.refresh(ctx, b, e)
			}
			br.observe(b, r)
			return e, r, nil
		}
	}
	if v, ok := br.failures.Load(b.key); ok {
		if f := v.(*failure); now.Before(f.until) {
			return nil, Miss, f.err
		}
		br.failures.Delete(b.key)
	}
	// A lookup can join a fetch that started earlier (a background
	// refresh, say); its token is checked again like a cached one, and if
	// it is no longer usable the lookup waits for one more fetch.
	for attempt := 0; ; attempt++ {
		started := false // set by this lookup's fetch only, read after the channel
		ch := br.group.DoChan(b.key, func() (any, error) {
			started = true
			return br.fetch(ctx, b, false)
		})
		select {
		case res := <-ch:
			if res.Err != nil {
				return nil, Miss, res.Err
			}
			e := res.Val.(*Entry)
			if !e.tok.ValidAt(br.opts.Now(), br.opts.Leeway) {
				if !started && attempt == 0 {
					continue
				}
				return nil, Miss, fmt.Errorf("merchant %q: %w", b.Request.Merchant, ErrExpiredToken)
			}
			r := Miss
			if !started {
				r = Shared
			}
			br.observe(b, r)
			return e, r, nil
		case <-ctx.Done():
			return nil, Miss, fmt.Errorf("merchant %q: waiting for a token: %w", b.Request.Merchant, context.Cause(ctx))
		}
	}
}

func (br *Broker) observer(b *Binding) Observer {
	if b.Observer != nil {
		return b.Observer
	}
	return br.opts.Observer
}

func (br *Broker) observe(b *Binding, r Result) {
	if o := br.observer(b); o != nil {
		o.Lookup(b, r)
	}
}

// refresh starts the background refresh of e.
func (br *Broker) refresh(ctx context.Context, b *Binding, e *Entry) {
	go func() {
		_, err, _ := br.group.Do(b.key, func() (any, error) {
			return br.fetch(ctx, b, true)
		})
		if err != nil {
			e.nextAttempt.Store(br.opts.Now().Add(br.opts.RefreshRetry).UnixNano())
		}
		e.refreshing.Store(false)
	}()
}

// maxFailureTTL caps how long a failure is remembered, whatever Retry-After
// the provider asked for.
const maxFailureTTL = 30 * time.Second

// fetch calls the Source and caches what it returns. It runs once per key at
// a time (inside the singleflight group), detached from the cancellation of
// the request that started it but keeping its values (trace context) and
// its deadline. Temporary failures are retried with backoff while the
// deadline allows; the source's breaker may refuse the call; a failure is
// remembered for FailureTTL.
func (br *Broker) fetch(parent context.Context, b *Binding, background bool) (*Entry, error) {
	now := br.opts.Now()
	// A fetch that finished just before this one started may have left a
	// fresh token: do not fetch twice.
	if v, ok := br.cache.Get(b.key); ok && !background {
		if e := v.(*Entry); e.tok.ValidAt(now, br.opts.Leeway) {
			b.current.Store(e)
			return e, nil
		}
	}
	// Only FetchTimeout bounds the fetch: it is shared, so the deadline of
	// the request that happened to start it must not cut it short for the
	// others (each waiter gives up on its own context).
	deadline := time.Now().Add(br.opts.FetchTimeout)
	ctx, cancel := context.WithDeadline(context.WithoutCancel(parent), deadline)
	defer cancel()

	tok, report, err := br.attempts(ctx, b, background, deadline)
	// The last attempt is reported once its outcome is in the cache (or
	// remembered as a failure), so an observer sees a consistent state.
	defer report()
	now = br.opts.Now()
	if err != nil {
		if br.opts.FailureTTL > 0 && !errors.Is(err, context.Canceled) {
			ttl := min(max(br.opts.FailureTTL, RetryAfterOf(err)), maxFailureTTL)
			br.failures.Store(b.key, &failure{err: err, until: now.Add(ttl)})
		}
		return nil, err
	}
	br.failures.Delete(b.key)
	e := &Entry{tok: tok, header: "Bearer " + tok.Value.Reveal(), refreshAt: tok.Expiry, binding: b,
		fingerprint: tok.Fingerprint()}
	if br.opts.RefreshWindow > 0 {
		life := tok.Expiry.Sub(tok.IssuedAt)
		e.refreshAt = tok.Expiry.Add(-time.Duration(float64(life) * br.opts.RefreshWindow))
	}
	br.mu.Lock()
	if old, ok := br.cache.Get(b.key); ok {
		old.(*Entry).stale.Store(true)
	}
	br.cache.Set(b.key, e, tok.Expiry.Sub(now))
	br.mu.Unlock()
	b.current.Store(e)
	return e, nil
}

// attempts calls the Source up to MaxAttempts times while its failures are
// temporary, the breaker lets calls through and the deadline allows. Every
// attempt but the last is reported to the observer here; the returned func
// reports the last one.
func (br *Broker) attempts(ctx context.Context, b *Binding, background bool, deadline time.Time) (Token, func(), error) {
	brk := br.breaker(b.SourceID)
	obs := br.observer(b)
	report := func() {}
	for attempt := 1; ; attempt++ {
		now := br.opts.Now()
		if br.opts.BreakerThreshold > 0 {
			if ok, wait := brk.allow(now, br.opts.BreakerCooldown); !ok {
				return Token{}, report, &UnavailableError{SourceID: b.SourceID, RetryAfter: wait}
			}
		}
		start := time.Now()
		tok, err := b.Source.Token(ctx, b.Request)
		elapsed := time.Since(start)
		now = br.opts.Now()
		if err == nil {
			err = br.check(b, &tok, now)
		}
		if br.opts.BreakerThreshold > 0 {
			if state, changed := brk.record(now, err, br.opts.BreakerThreshold, br.opts.BreakerCooldown); changed {
				if bo, ok := obs.(BreakerObserver); ok {
					bo.BreakerChanged(b.SourceID, state)
				}
			}
		}
		report = func() {
			if obs != nil {
				obs.Fetched(ctx, b, tok, elapsed, background, err)
			}
		}
		if err == nil || !IsTemporary(err) || attempt >= br.opts.MaxAttempts {
			return tok, report, err
		}
		wait := max(backoff(attempt, br.opts.BackoffBase, br.opts.BackoffMax), RetryAfterOf(err))
		if time.Now().Add(wait).After(deadline) {
			return tok, report, err
		}
		report()
		if br.opts.Sleep(ctx, wait) != nil {
			return tok, func() {}, err
		}
	}
}

func (br *Broker) breaker(sourceID string) *breaker {
	if v, ok := br.breakers.Load(sourceID); ok {
		return v.(*breaker)
	}
	v, _ := br.breakers.LoadOrStore(sourceID, &breaker{})
	return v.(*breaker)
}

// BreakerState returns the state of a source's circuit breaker.
func (br *Broker) BreakerState(sourceID string) BreakerState {
	return br.breaker(sourceID).current()
}

// Purge drops the binding's cached token if it is still the one with the
// given value, and reports whether it did. Callers that saw a token rejected
// (401) purge it this way: a burst of rejections of one token causes one
// new fetch, and a token fetched meanwhile is kept.
func (br *Broker) Purge(b *Binding, rejected Secret) bool {
	br.mu.Lock()
	defer br.mu.Unlock()
	v, ok := br.cache.Get(b.key)
	if !ok || v.(*Entry).tok.Value != rejected {
		return false
	}

	v.(*Entry).stale.Store(true)
	br.cache.Delete(b.key)
	return true
}

// PurgeMatching drops every cached token whose binding matches, and
// returns the entries dropped. Tokens can be shared by merchants (same
// source, organisation, scopes and audience), so the admin API matches
// on those, not on the merchant that happened to fetch the token.
func (br *Broker) PurgeMatching(match func(*Binding) bool) []*Entry {
	br.mu.Lock()
	defer br.mu.Unlock()
	var out []*Entry
	for k, it := range br.cache.Items() {
		if e := it.Object.(*Entry); match(e.binding) {
			e.stale.Store(true)
			br.cache.Delete(k)
			out = append(out, e)
		}
	}
	return out
}

// PurgeMerchant drops every cached token fetched for a merchant.
func (br *Broker) PurgeMerchant(merchant string) []*Entry {
	return br.PurgeMatching(func(b *Binding) bool { return b.Request.Merchant == merchant })
}

// Entries returns the cached, unexpired entries.
func (br *Broker) Entries() []*Entry {
	now := br.opts.Now()
	var out []*Entry
	for _, it := range br.cache.Items() {
		if e := it.Object.(*Entry); e.tok.ValidAt(now, 0) {
			out = append(out, e)
		}
	}
	return out
}

// Binding returns the binding the entry's token was fetched for.
func (e *Entry) Binding() *Binding { return e.binding }

// ErrExpiredToken is returned when a provider hands out a token that is
// already expired, or about to be.
var ErrExpiredToken = errors.New("the token API returned a token that is already expired (check the clocks and the configured token lifetime)")

// check validates what a Source returned before it is cached.
func (br *Broker) check(b *Binding, tok *Token, now time.Time) error {
	if !ValidTokenValue(tok.Value.Reveal()) {
		return &APIError{Provider: sourceType(b), StatusCode: 200, Code: "invalid_token_value",
			Description: "the access token is empty, too long or contains characters not allowed in an HTTP header"}
	}
	if tok.IssuedAt.IsZero() || tok.IssuedAt.After(now) {
		tok.IssuedAt = now
	}
	if !tok.ValidAt(now, br.opts.Leeway) {
		return &APIError{Provider: sourceType(b), StatusCode: 200, Code: "expired_token",
			Description: fmt.Sprintf("merchant %q: expiry %s", b.Request.Merchant, tok.Expiry.UTC().Format(time.RFC3339)), Err: ErrExpiredToken}
	}
	return nil
}

func sourceType(b *Binding) string {
	if t, ok := b.Source.(interface{ Type() string }); ok {
		return t.Type()
	}
	return "token"
}
