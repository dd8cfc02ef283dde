package broker

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/breaker"
)

// The failure policy governs every call to a token API, whether a request
// waits for it (foreground) or a token is refreshed ahead of its expiry
// (background). It keeps one state per key and one per source, both on
// the broker clock, and answers before any call:
//
//   - a source hold (a 429 with Retry-After, capped at
//     MaxRetryAfterMemory; or a refused credential, FailureTTL doubled at
//     each consecutive one up to FailureMax) refuses every key of the
//     source;
//   - the key's failure memory (FailureTTL doubled at each consecutive
//     failure up to FailureMax, or the provider's Retry-After if longer)
//     refuses the key; after a failed refresh-ahead, no new one starts
//     before the hold applied to it ends;
//   - the source's circuit breaker (internal/breaker) refuses calls after
//     BreakerThreshold consecutive temporary failures;
//   - a fetch calls up to MaxAttempts times while its failures are
//     temporary, with backoff and jitter, within FetchTimeout.
//
// The source classifies its errors (Classifier). A refused fetch's error
// carries the hold applied, so RetryAfterOf tells callers what is left of
// it. The key's state also limits purges by rejection (reject.go). One
// sweep, at most once per CleanupInterval, drops the state that ended.

// Breaker states of a source (the values are those of the metrics gauge).
const (
	BreakerClosed   = breaker.Closed
	BreakerHalfOpen = breaker.HalfOpen
	BreakerOpen     = breaker.Open
)

// BreakerState is the state of a source's circuit breaker.
type BreakerState = breaker.State

// policy is the failure policy's state. Its methods are called outside
// Broker.mu, or with Broker.mu held before policy.mu, never the reverse.
type policy struct {
	opts *Options

	mu        sync.Mutex
	keys      map[string]*keyState    // by cache key
	sources   map[string]*sourceState // by SourceID
	lastSweep time.Time
}

// keyState is the policy's state for one key.
type keyState struct {
	b   *Binding // the binding that last failed, for its source and observer
	obs Observer // told BackingOff(true) while backingOff

	// Failure memory: the last failure, when it happened, until when the
	// key's fetches answer it without calling, how many in a row.
	err        error
	at, until  time.Time
	failures   int
	backingOff bool
	// refreshUntil: no refresh-ahead before this, after a failed one.
	refreshUntil time.Time

	// Purges by rejection (reject.go).
	strikes   int
	holdUntil time.Time // no purge by rejection before this
	purgedAt  time.Time // last purge by rejection
	rejected  Secret    // the token that purge dropped: never adopted again
	lastRej   time.Time // last rejection, purged or not
}

// sourceState is the policy's state for one source.
type sourceState struct {
	brk breaker.Breaker
	// The source hold: its failure, when it was set, until when, how many
	// refused credentials in a row; obs was told SourceBackingOff(true)
	// while held is set.
	err       error
	at, until time.Time
	failures  int
	held      bool
	obs       Observer
}

// within reports whether now lies in [at, until): a clock that went back
// before at does not extend a hold.
func within(now, at, until time.Time) bool { return !now.Before(at) && now.Before(until) }

// notes are observer calls made once policy.mu is released.
type notes []func()

func (n notes) run() {
	for _, f := range n {
		f()
	}
}

func (p *policy) key(b *Binding) *keyState {
	ks := p.keys[b.key]
	if ks == nil {
		if p.keys == nil {
			p.keys = map[string]*keyState{}
		}
		ks = &keyState{b: b}
		p.keys[b.key] = ks
	}
	return ks
}

func (p *policy) source(id string) *sourceState {
	ss := p.sources[id]
	if ss == nil {
		if p.sources == nil {
			p.sources = map[string]*sourceState{}
		}
		ss = &sourceState{brk: breaker.Breaker{Threshold: p.opts.BreakerThreshold, Cooldown: p.opts.BreakerCooldown}}
		p.sources[id] = ss
	}
	return ss
}

// admit returns the error that refuses a call for b's key at now (its
// source's hold or its failure memory, with the hold applied), nil when
// the call may go out.
func (p *policy) admit(b *Binding, now time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ss := p.sources[b.SourceID]; ss != nil && ss.held && within(now, ss.at, ss.until) {
		return p.heldLocked(b, ss.err, now)
	}
	if ks := p.keys[b.key]; ks != nil && ks.err != nil && within(now, ks.at, ks.until) {
		return p.heldLocked(b, ks.err, now)
	}
	return nil
}

// heldError is a failed fetch's error as the policy answers it: the token
// API is not called for the key before RetryAfter has passed (the key's
// failure memory or its source's hold, whichever ends last). RetryAfterOf
// reports it, so a caller is told the hold actually applied.
type heldError struct {
	err        error
	retryAfter time.Duration
}

func (e *heldError) Error() string { return e.err.Error() }
func (e *heldError) Unwrap() error { return e.err }

// holdUntilLocked is until when the policy refuses b's key at now (zero
// when it does not).
func (p *policy) holdUntilLocked(b *Binding, now time.Time) time.Time {
	var until time.Time
	if ss := p.sources[b.SourceID]; ss != nil && ss.held && within(now, ss.at, ss.until) {
		until = ss.until
	}
	if ks := p.keys[b.key]; ks != nil && ks.err != nil && within(now, ks.at, ks.until) && ks.until.After(until) {
		until = ks.until
	}
	return until
}

// heldLocked returns err with the time left until the policy lets b's key
// call again; err itself when nothing holds it.
func (p *policy) heldLocked(b *Binding, err error, now time.Time) error {
	until := p.holdUntilLocked(b, now)
	if !until.After(now) {
		return err
	}
	return &heldError{err: err, retryAfter: until.Sub(now)}
}

// backoffFor is the memory of the n-th consecutive failure (n ≥ 1).
func (p *policy) backoffFor(n int) time.Duration {
	if n >= 31 {
		return p.opts.FailureMax
	}
	return min(p.opts.FailureTTL<<(n-1), p.opts.FailureMax)
}

// record notes the outcome of a fetch of b's key that made calls calls to
// the Source (0: refused by the breaker) and ended with err, of class c:
// a success forgets the key's memory and its source's hold; a failure is
// remembered. It returns err as the policy answers it (with the hold
// applied).
func (p *policy) record(b *Binding, err error, c Class, calls int, now time.Time) error {
	var n notes
	defer func() { n.run() }()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil {
		if ss := p.sources[b.SourceID]; ss != nil {
			n = p.releaseSourceLocked(b.SourceID, ss, n)
		}
		if ks := p.keys[b.key]; ks != nil {
			n = ks.forget(n)
		}
		return nil
	}
	if p.opts.FailureTTL < 0 || errors.Is(err, context.Canceled) {
		return p.heldLocked(b, err, now)
	}
	if calls > 0 {
		n = p.holdSourceLocked(b, err, c, now, n)
	}
	ks := p.key(b)
	k := 0
	if ks.err != nil && !now.Before(ks.at) && now.Before(ks.until.Add(p.opts.FailureMax)) {
		k = ks.failures // consecutive: the previous memory ended recently
	}
	var wait time.Duration
	if calls == 0 {
		// Refused by the breaker: nothing new was learnt about the key.
		wait = RetryAfterOf(err)
	} else {
		k++
		wait = max(p.backoffFor(k), min(RetryAfterOf(err), MaxRetryAfterMemory))
	}
	ks.err, ks.at, ks.until, ks.failures = err, now, now.Add(wait), k
	if !ks.backingOff {
		ks.backingOff, ks.b, ks.obs = true, b, observerOf(b, p.opts)
		n = append(n, backingOff(ks.obs, b, true))
	}
	return p.heldLocked(b, err, now)
}

// holdSourceLocked holds b's source after err, when err is about the
// source's credential (class c).
func (p *policy) holdSourceLocked(b *Binding, err error, c Class, now time.Time, n notes) notes {
	ss := p.source(b.SourceID)
	var wait time.Duration
	k := ss.failures
	switch {
	case c == ClassRateLimited && RetryAfterOf(err) > 0:
		wait = min(RetryAfterOf(err), MaxRetryAfterMemory)
		if !ss.held {
			k = 0
		}
	case c == ClassCredential:
		if !ss.held || now.Before(ss.at) || !now.Before(ss.until.Add(p.opts.FailureMax)) {
			k = 0
		}
		k++
		wait = p.backoffFor(k)
	default:
		return n
	}
	ss.err, ss.at, ss.until, ss.failures = err, now, now.Add(wait), k
	if !ss.held {
		ss.held, ss.obs = true, observerOf(b, p.opts)
		n = append(n, sourceBackingOff(ss.obs, b.SourceID, true))
	}
	return n
}

// releaseSourceLocked ends the hold of source id.
func (p *policy) releaseSourceLocked(id string, ss *sourceState, n notes) notes {
	if ss.held {
		n = append(n, sourceBackingOff(ss.obs, id, false))
	}
	ss.err, ss.at, ss.until, ss.failures, ss.held, ss.obs = nil, time.Time{}, time.Time{}, 0, false, nil
	return n
}

// forget drops the key's failure memory and refresh hold.
func (ks *keyState) forget(n notes) notes {
	if ks.backingOff {
		n = append(n, backingOff(ks.obs, ks.b, false))
	}
	ks.err, ks.at, ks.until, ks.failures, ks.backingOff, ks.obs, ks.refreshUntil = nil, time.Time{}, time.Time{}, 0, false, nil, time.Time{}
	return n
}

// refreshFailed holds back the next refresh-ahead of b's key after a
// failed one: until the hold the policy applies to the key, or (when the
// failure memory is disabled) for DefaultFailureTTL.
func (p *policy) refreshFailed(b *Binding, err error, now time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	until := p.holdUntilLocked(b, now)
	ks := p.key(b)
	if until.IsZero() {
		until = now.Add(max(p.opts.FailureTTL, DefaultFailureTTL))
		if ks.err == nil {
			ks.err, ks.at = err, now
		}
	}
	ks.refreshUntil = until
}

// refreshed lifts the refresh hold of b's key: it has a new token.
func (p *policy) refreshed(b *Binding) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if ks := p.keys[b.key]; ks != nil {
		ks.refreshUntil = time.Time{}
	}
}

// refreshDue reports whether a refresh-ahead of b's key may start at now:
// no failed refresh holds it back (a clock that went back before that
// failure does not).
func (p *policy) refreshDue(b *Binding, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ks := p.keys[b.key]
	return ks == nil || !within(now, ks.at, ks.refreshUntil)
}

// allow asks the breaker of b's source whether a call may go out at now.
func (p *policy) allow(b *Binding, now time.Time) (ok bool, wait time.Duration, changed bool, cause error) {
	if p.opts.BreakerThreshold <= 0 {
		return true, 0, false, nil
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.source(b.SourceID).brk.Allow(now)
}

// called tells the breaker of b's source how a call let through by allow
// ended, and returns its state before and after.
func (p *policy) called(b *Binding, err error, c Class, now time.Time) (from, to BreakerState) {
	if p.opts.BreakerThreshold <= 0 {
		return BreakerClosed, BreakerClosed
	}
	o := breaker.Answered
	switch {
	case err == nil:
		o = breaker.Healthy
	case errors.Is(err, context.Canceled):
		o = breaker.Unknown
	case c == ClassTemporary:
		o = breaker.Failed
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.source(b.SourceID).brk.Record(now, o, err)
}

// maybeSweep runs sweep at most once per CleanupInterval (or at once when
// the clock went back).
func (p *policy) maybeSweep(now time.Time) {
	var n notes
	defer func() { n.run() }()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !now.Before(p.lastSweep) && now.Sub(p.lastSweep) < p.opts.CleanupInterval {
		return
	}
	p.lastSweep = now
	for k, ks := range p.keys {
		if ks.err != nil && (now.Before(ks.at) || !now.Before(later(ks.until, ks.refreshUntil).Add(p.opts.FailureMax))) {
			n = ks.forget(n)
		}
		if ks.err == nil && !within(now, ks.at, ks.refreshUntil) && ks.rejectQuiet(now) && !now.Before(ks.purgedAt.Add(RejectHoldMax)) {
			delete(p.keys, k)
		}
	}
	cutoff := now.Add(-p.opts.CleanupInterval)
	for id, ss := range p.sources {
		if ss.held && (now.Before(ss.at) || !now.Before(ss.until.Add(p.opts.FailureMax))) {
			n = p.releaseSourceLocked(id, ss, n)
		}
		if !ss.held && ss.brk.Idle(cutoff) {
			delete(p.sources, id)
		}
	}
}

// later returns the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

func observerOf(b *Binding, o *Options) Observer {
	if b.Observer != nil {
		return b.Observer
	}
	return o.Observer
}

func backingOff(obs Observer, b *Binding, on bool) func() {
	return func() {
		if bo, ok := obs.(BackoffObserver); ok {
			bo.BackingOff(b, on)
		}
	}
}

func sourceBackingOff(obs Observer, sourceID string, on bool) func() {
	return func() {
		if so, ok := obs.(SourceObserver); ok {
			so.SourceBackingOff(sourceID, on)
		}
	}
}

// SourceObserver is an optional interface of an Observer: it is told when a
// source starts being held (its token API is not called for any key, see
// Broker.SourceHold) and when it stops.
type SourceObserver interface {
	SourceBackingOff(sourceID string, on bool)
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
	b := e.binding
	out := Policy{NextRefresh: e.RefreshAt()}
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ss := p.sources[b.SourceID]; ss != nil && ss.held && within(now, ss.at, ss.until) {
		out.SourceBackoffUntil = ss.until
		out.NextRefresh = later(out.NextRefresh, ss.until)
	}
	if ks := p.keys[b.key]; ks != nil {
		out.LastError, out.Failures = ks.err, ks.failures
		out.PurgeHeldUntil, out.Strikes = ks.rejectHold(now), ks.strikes
		for _, until := range []time.Time{ks.until, ks.refreshUntil} {
			if ks.err != nil && within(now, ks.at, until) && until.After(out.BackoffUntil) {
				out.BackoffUntil = until
			}
		}
		out.NextRefresh = later(out.NextRefresh, out.BackoffUntil)
	}
	return out
}

// SourceHold returns until when a source's token API is not called for any
// key, and the failure behind it; zero when no hold is in force.
func (br *Broker) SourceHold(sourceID string) (until time.Time, err error) {
	now := br.opts.Now()
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ss := p.sources[sourceID]; ss != nil && ss.held && within(now, ss.at, ss.until) {
		return ss.until, ss.err
	}
	return time.Time{}, nil
}

// BreakerState returns the state of a source's circuit breaker (closed for a
// source that has none yet).
func (br *Broker) BreakerState(sourceID string) BreakerState {
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ss := p.sources[sourceID]; ss != nil {
		return ss.brk.State()
	}
	return BreakerClosed
}

// ForgetFailures drops the remembered fetch failures (see
// Options.FailureTTL) whose error match selects, so that the next lookup of
// their keys fetches again at once: after a merchant's new consent, say,
// its remembered consent_required must not outlive the cause. It returns
// how many were dropped.
func (br *Broker) ForgetFailures(match func(error) bool) int {
	var n notes
	defer func() { n.run() }()
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	c := 0
	for _, ks := range p.keys {
		if ks.err != nil && match(ks.err) {
			n = ks.forget(n)
			c++
		}
	}
	return c
}

// ForgetSource drops everything the failure policy remembers about a
// source: its hold (429 Retry-After, bad credential), its circuit breaker,
// and the failure memory and refresh holds of its keys. Call it when the
// source's credential changed (a key rotation plus a reload keeps its
// ID): the next lookup calls it at once. It returns how many key failures
// were dropped.
func (br *Broker) ForgetSource(sourceID string) int {
	var n notes
	defer func() { n.run() }()
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ss := p.sources[sourceID]; ss != nil {
		n = p.releaseSourceLocked(sourceID, ss, n)
		delete(p.sources, sourceID)
	}
	c := 0
	for _, ks := range p.keys {
		if ks.err != nil && ks.b.SourceID == sourceID {
			n = ks.forget(n)
			c++
		}
	}
	return c
}

// SourcesHealth returns the health of the given sources, by source ID, in
// one pass over the failure memory.
func (br *Broker) SourcesHealth(sourceIDs ...string) map[string]SourceHealth {
	now := br.opts.Now()
	out := make(map[string]SourceHealth, len(sourceIDs))
	for _, id := range sourceIDs {
		h := SourceHealth{Breaker: br.BreakerState(id)}
		h.HeldUntil, h.HoldError = br.SourceHold(id)
		out[id] = h
	}
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, ks := range p.keys {
		if ks.err == nil || !within(now, ks.at, ks.until) {
			continue
		}
		h, ok := out[ks.b.SourceID]
		if !ok {
			continue
		}
		h.FailingKeys++
		if h.LastError == nil || ks.at.After(h.LastFailure) {
			h.LastError, h.LastFailure = ks.err, ks.at
		}
		out[ks.b.SourceID] = h
	}
	return out
}
