package broker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"time"
)

// This file is the one policy every call to a token API goes through,
// whether a request is waiting (foreground) or a token is refreshed ahead of
// its expiry (background):
//
//  0. the source's hold (sourcehold.go): a 429 with Retry-After or a bad
//     credential holds every key of the source;
//  1. failure memory per key: after a failed fetch, the key's fetches get
//     the same error without calling, for FailureTTL doubled with each
//     consecutive failure (capped at FailureMax) or the provider's
//     Retry-After if longer (capped at MaxRetryAfterMemory);
//  2. the source's circuit breaker (breaker.go);
//  3. up to MaxAttempts calls for temporary failures, with exponential
//     backoff and jitter in between, within FetchTimeout.

// failure is the failure memory of one key.
type failure struct {
	err      error
	at       time.Time // when the fetch failed (broker clock)
	until    time.Time // no token API call for the key before this
	failures int       // consecutive failed fetches of the key
	// b and obs were told BackingOff(true); they are told false.
	b   *Binding
	obs Observer
}

// holds reports whether the memory still answers for the key at now. A
// clock that went back before the failure does not extend it: the memory
// then no longer holds, so a backward jump never suspends fetches.
func (f *failure) holds(now time.Time) bool {
	return !now.Before(f.at) && now.Before(f.until)
}

// Policy is the failure policy's state for one key, for the admin API.
type Policy struct {
	// NextRefresh is the earliest time a refresh-ahead may call the token
	// API: the entry's refresh time, or the end of its backoff if later.
	NextRefresh time.Time
	// LastError is the key's last fetch failure, nil after a success.
	LastError error
	// BackoffUntil is when the failure memory stops answering for the key;
	// zero when it does not hold.
	BackoffUntil time.Time
	// Failures is the number of consecutive failed fetches of the key.
	Failures int
	// SourceBackoffUntil is until when the key's source is not called for
	// any key (a 429 with Retry-After, or a bad credential); zero when no
	// such hold is in force.
	SourceBackoffUntil time.Time
	// PurgeHeldUntil is until when the key's purges by rejection are on
	// hold (see RejectHoldBase); zero when they are not.
	PurgeHeldUntil time.Time
	// Strikes counts the key's replacement tokens rejected soon after
	// they were cached (see Reject).
	Strikes int
}

// Policy returns the failure policy's state for the key of a cached entry.
func (br *Broker) Policy(e *Entry) Policy {
	now := br.opts.Now()
	p := Policy{NextRefresh: e.RefreshAt()}
	p.PurgeHeldUntil, p.Strikes = br.RejectHold(e.binding.key)
	f := e.retry.Load()
	if v, ok := br.failures.Load(e.binding.key); ok {
		f = v.(*failure)
	}
	if until, err := br.SourceHold(e.binding.SourceID); err != nil {
		p.SourceBackoffUntil = until
		if until.After(p.NextRefresh) {
			p.NextRefresh = until
		}
	}
	if f != nil {
		p.LastError, p.Failures = f.err, f.failures
		if f.holds(now) {
			p.BackoffUntil = f.until
			if f.until.After(p.NextRefresh) {
				p.NextRefresh = f.until
			}
		}
	}
	return p
}

// fetch obtains a token for b and caches it. It runs once per key at a time
// (inside the singleflight group), detached from the cancellation of the
// request that started it but keeping its values (trace context); only
// FetchTimeout bounds it. cur is the entry being refreshed ahead, nil for a
// foreground fetch. With a shared tier, a usable token stored there is
// adopted; otherwise mint runs the policy.
func (br *Broker) fetch(parent context.Context, b *Binding, cur *Entry) (*Entry, error) {
	now := br.opts.Now()
	br.maybeSweep(now)
	// A fetch that finished just before this one started may have left a
	// fresh token: do not fetch twice.
	if v, ok := br.cache.Get(b.key); ok {
		e := v.(*Entry)
		if e.validAt(now, br.opts.Leeway) && (cur == nil || (e != cur && now.Before(e.RefreshAt()))) {
			e.servedTo(b)
			b.current.Store(e)
			return e, nil
		}
	}
	// The fetch is shared, so the deadline of the request that happened
	// to start it must not cut it short for the others (each waiter gives
	// up on its own context).
	deadline := time.Now().Add(br.opts.FetchTimeout)
	ctx, cancel := context.WithDeadline(context.WithoutCancel(parent), deadline)
	defer cancel()

	// The last attempt is reported once its outcome is in the cache (or
	// remembered as a failure), so an observer sees a consistent state.
	report := func() {}
	defer func() { report() }()
	mint := func(ctx context.Context) (Token, error) {
		tok, r, err := br.mint(ctx, b, cur != nil, deadline)
		report = r
		return tok, err
	}
	tok, origin, err := br.obtain(ctx, b, cur, mint)
	now = br.opts.Now()
	if err != nil {
		if cur != nil {
			cur.retry.Store(br.refreshFailure(b, err, now))
		}
		return nil, err
	}
	e := br.newEntry(b, tok, origin)
	br.store(b, e, now)
	return e, nil
}

// obtain gets a token from the shared tier when there is one (adopting a
// usable stored token, or minting once for the fleet), else by minting.
func (br *Broker) obtain(ctx context.Context, b *Binding, cur *Entry, mint func(context.Context) (Token, error)) (Token, string, error) {
	sh := br.opts.Shared
	if sh == nil {
		tok, err := mint(ctx)
		return tok, OriginMinted, err
	}
	usable := br.usable(cur)
	if rejected := br.rejectedToken(b.key); rejected != "" {
		// A token an upstream rejected is never adopted back from the
		// shared tier, even if its purge there has not happened yet.
		valid := usable
		usable = func(t Token) bool { return t.Value != rejected && valid(t) }
	}
	tok, adopted, err := sh.Fetch(ctx, b.key, usable, mint)
	if err != nil || !adopted {
		return tok, OriginMinted, err
	}
	now := br.opts.Now()
	if tok.IssuedAt.IsZero() || tok.IssuedAt.After(now) {
		tok.IssuedAt = now
	}
	if !ValidTokenValue(tok.Value.Reveal()) || !usable(tok) {
		// The tier must not hand out garbage; if it does, mint here.
		tok, err = mint(ctx)
		return tok, OriginMinted, err
	}
	return tok, OriginShared, nil
}

// usable is what the shared tier may hand out: a token valid beyond Leeway;
// for a refresh-ahead of cur, one that expires after cur's token and is not
// itself in its refresh window.
func (br *Broker) usable(cur *Entry) func(Token) bool {
	return func(t Token) bool {
		now := br.opts.Now()
		if !t.ValidAt(now, br.opts.Leeway) {
			return false
		}
		if cur == nil {
			return true
		}
		if t.IssuedAt.IsZero() || t.IssuedAt.After(now) {
			t.IssuedAt = now
		}
		return t.Expiry.Sub(cur.expiry) > outlivesBy && now.Before(br.refreshAt(t))
	}
}

// outlivesBy is how much longer than the token it refreshes a token must
// live to be adopted by a refresh-ahead: more than the clocks' jitter, so
// that the same token handed back (by the shared tier, with its expiry as
// an absolute time) is not taken for a newer one.
const outlivesBy = time.Second

// refreshFailure is what holds back the next refresh-ahead of an entry
// after a failed one: the key's failure memory, or (when the memory is
// disabled) DefaultFailureTTL.
func (br *Broker) refreshFailure(b *Binding, err error, now time.Time) *failure {
	if h := br.sourceHeld(b, now); h != nil {
		return &failure{err: h.err, at: now, until: h.until}
	}
	if v, ok := br.failures.Load(b.key); ok {
		if f := v.(*failure); f.holds(now) {
			return f
		}
	}
	return &failure{err: err, at: now, until: now.Add(max(br.opts.FailureTTL, DefaultFailureTTL))}
}

// mint runs the policy for one key and calls the Source: the key's failure
// memory first, then attempts (breaker, retries). It returns the report of
// the last call, for the caller to run once the outcome is stored.
func (br *Broker) mint(ctx context.Context, b *Binding, background bool, deadline time.Time) (Token, func(), error) {
	now := br.opts.Now()
	if h := br.sourceHeld(b, now); h != nil {
		return Token{}, func() {}, br.held(b, h.err, now)
	}
	var prev *failure
	if v, ok := br.failures.Load(b.key); ok {
		prev = v.(*failure)
		if prev.holds(now) {
			return Token{}, func() {}, br.held(b, prev.err, now)
		}
	}
	tok, calls, report, err := br.attempts(ctx, b, background, deadline)
	now = br.opts.Now()
	br.rememberSource(b, err, calls, now)
	if err != nil {
		br.remember(b, prev, err, calls, now)
		return tok, report, br.held(b, err, now)
	}
	if prev != nil {
		br.forget(b.key, prev)
	}
	return tok, report, nil
}

// heldError is a failed fetch's error as the policy answers it: the token
// API is not called for the key before RetryAfter has passed (the key's
// failure memory or its source's hold, whichever ends last). It is what
// RetryAfterOf reports, so that a caller is told the hold actually applied
// (a provider's Retry-After is cut to MaxRetryAfterMemory; a later caller
// is told what is left of it).
type heldError struct {
	err        error
	retryAfter time.Duration
}

func (e *heldError) Error() string { return e.err.Error() }
func (e *heldError) Unwrap() error { return e.err }

// held returns err with the time left, at now, until the policy lets b's
// key call the token API again; err itself when nothing holds it.
func (br *Broker) held(b *Binding, err error, now time.Time) error {
	var until time.Time
	if h := br.sourceHeld(b, now); h != nil {
		until = h.until
	}
	if v, ok := br.failures.Load(b.key); ok {
		if f := v.(*failure); f.holds(now) && f.until.After(until) {
			until = f.until
		}
	}
	if !until.After(now) {
		return err
	}
	return &heldError{err: err, retryAfter: until.Sub(now)}
}

// remember stores the failure memory of b's key after a failed fetch that
// made calls calls to the Source.
func (br *Broker) remember(b *Binding, prev *failure, err error, calls int, now time.Time) {
	if br.opts.FailureTTL < 0 || errors.Is(err, context.Canceled) {
		return
	}
	n := 0
	if prev != nil && !now.Before(prev.at) && now.Before(prev.until.Add(br.opts.FailureMax)) {
		n = prev.failures // consecutive: the previous memory ended recently
	}
	var wait time.Duration
	if calls == 0 {
		// Refused by the breaker: nothing new was learnt about the key.
		wait = RetryAfterOf(err)
	} else {
		n++
		wait = br.opts.FailureMax
		if n < 31 {
			wait = min(br.opts.FailureTTL<<(n-1), br.opts.FailureMax)
		}
		wait = max(wait, min(RetryAfterOf(err), MaxRetryAfterMemory))
	}
	f := &failure{err: err, at: now, until: now.Add(wait), failures: n}
	if prev != nil {
		f.b, f.obs = prev.b, prev.obs
		if br.failures.CompareAndSwap(b.key, prev, f) {
			return
		}
	}
	f.b, f.obs = b, br.observer(b)
	if old, loaded := br.failures.Swap(b.key, f); loaded {
		// Told already (cannot happen inside the singleflight, but keep
		// the true/false pairing whatever happens).
		f.b, f.obs = old.(*failure).b, old.(*failure).obs
		return
	}
	backingOff(f, true)
}

// forget drops the failure memory f of key, unless a newer failure replaced
// it meanwhile (compare-and-delete).
func (br *Broker) forget(key string, f *failure) {
	if br.failures.CompareAndDelete(key, f) {
		backingOff(f, false)
	}
}

func backingOff(f *failure, on bool) {
	if bo, ok := f.obs.(BackoffObserver); ok {
		bo.BackingOff(f.b, on)
	}
}

// maybeSweep runs sweep at most once per CleanupInterval (or at once when
// the clock went back).
func (br *Broker) maybeSweep(now time.Time) {
	last, n := br.lastSweep.Load(), now.UnixNano()
	if n >= last && n-last < int64(br.opts.CleanupInterval) {
		return
	}
	if br.lastSweep.CompareAndSwap(last, n) {
		br.sweep(now)
	}
}

// sweep forgets failures that ended more than FailureMax ago (or lie in the
// future of a clock that went back) and drops breakers idle for a
// CleanupInterval, so that state keyed by source ID (a new ID per config
// change) does not grow.
func (br *Broker) sweep(now time.Time) {
	br.failures.Range(func(k, v any) bool {
		if f := v.(*failure); now.Before(f.at) || !now.Before(f.until.Add(br.opts.FailureMax)) {
			br.forget(k.(string), f)
		}
		return true
	})
	br.sweepRejections(now)
	br.sweepSources(now)
	cutoff := now.Add(-br.opts.CleanupInterval)
	br.breakers.Range(func(k, v any) bool {
		if v.(*breaker).idle(cutoff) {
			br.breakers.CompareAndDelete(k, v)
		}
		return true
	})
}

// attempts calls the Source up to MaxAttempts times while its failures are
// temporary, the breaker lets calls through and the deadline allows. It
// returns how many calls it made. Every call but the last is reported to the
// observer here, exactly once; the returned func reports the last one.
func (br *Broker) attempts(ctx context.Context, b *Binding, background bool, deadline time.Time) (Token, int, func(), error) {
	obs := br.observer(b)
	bo, _ := obs.(BreakerObserver)
	var brk *breaker
	if br.opts.BreakerThreshold > 0 {
		brk = br.breaker(b.SourceID)
	}
	noop := func() {}
	report := noop
	var last error
	for attempt := 1; ; attempt++ {
		now := br.opts.Now()
		if brk != nil {
			ok, wait, halfOpen, cause := brk.allow(now, br.opts.BreakerCooldown)
			if halfOpen && bo != nil {
				bo.BreakerChanged(b.SourceID, BreakerHalfOpen)
			}
			if !ok {
				if last != nil {
					cause = last
				}
				return Token{}, attempt - 1, report, &UnavailableError{SourceID: b.SourceID, RetryAfter: wait, Err: cause}
			}
		}
		start := time.Now()
		tok, err := b.Source.Token(ctx, b.Request())
		elapsed := time.Since(start)
		now = br.opts.Now()
		if err == nil {
			err = br.check(b, &tok, now)
		}
		if brk != nil {
			if state, changed := brk.record(now, err, br.opts.BreakerThreshold, br.opts.BreakerCooldown); changed && bo != nil {
				bo.BreakerChanged(b.SourceID, state)
			}
		}
		report = func() {
			if obs != nil {
				obs.Fetched(ctx, b, tok, elapsed, background, err)
			}
		}
		if err == nil || !IsTemporary(err) || attempt >= br.opts.MaxAttempts {
			return tok, attempt, report, err
		}
		// A Retry-After longer than BackoffMax ends the fetch: the key's
		// failure memory honours it, no caller sleeps through it.
		ra := RetryAfterOf(err)
		wait := max(backoff(attempt, br.opts.BackoffBase, br.opts.BackoffMax), ra)
		if ra > br.opts.BackoffMax || time.Now().Add(wait).After(deadline) {
			return tok, attempt, report, err
		}
		// This call is reported now, and only now: a breaker refusing the
		// next attempt returns without reporting it again.
		report()
		report, last = noop, err
		if br.opts.Sleep(ctx, wait) != nil {
			return tok, attempt, noop, err
		}
	}
}

// backoff returns the wait before attempt n+1 (n ≥ 1): exponential from
// base, capped at max, with full jitter (uniform in [d/2, d]).
func backoff(n int, base, maxWait time.Duration) time.Duration {
	d := base << (n - 1)
	if d > maxWait || d <= 0 {
		d = maxWait
	}
	return d/2 + rand.N(d/2+1)
}

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
			Description: fmt.Sprintf("merchant %q: expiry %s", b.Merchant, tok.Expiry.UTC().Format(time.RFC3339)), Err: ErrExpiredToken}
	}
	return nil
}

func sourceType(b *Binding) string {
	if t, ok := b.Source.(interface{ Type() string }); ok {
		return t.Type()
	}
	return "token"
}
