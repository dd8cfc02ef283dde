package broker

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/breaker"
)

// The failure policy governs every call to a token API, foreground or
// refresh-ahead. It keeps one state per key and one per source, on the
// broker clock, and answers before any call:
//
//   - a source backoff refuses every key of the source: after a 429 with
//     Retry-After from a provider without a budget, until then (capped at
//     MaxRetryAfterMemory); after a 429 without a usable Retry-After or a
//     refused credential, FailureTTL doubled per consecutive one up to
//     FailureMax. A success of any key ends it. With a budget, a 429 with
//     Retry-After closes the budget instead (Budget.Hold, same cap) and is
//     remembered for neither source nor key; a 429 without one starts the
//     source backoff and closes the budget as long, so that every sidecar
//     sharing the budget's store waits too;
//   - a key backoff (FailureTTL doubled per consecutive failure up to
//     FailureMax, or the provider's Retry-After if longer) refuses the key;
//     after a failed refresh-ahead, no new one starts before it ends;
//   - the source's circuit breaker (internal/breaker) refuses calls after
//     BreakerThreshold consecutive temporary failures;
//   - the provider's budget is taken before each call: a caller waits its
//     turn (at most BudgetWait, leaving the call its bound: budgetBy), a
//     refresh-ahead never waits; a refusal is answered without a call,
//     with the budget's wait, and not remembered; a call that runs out of
//     time after such a wait counts for neither breaker nor key; a refused
//     refresh-ahead is retried by a lookup after a short defer
//     (refreshDenied);
//   - a fetch calls up to MaxAttempts times while its failures are
//     temporary, with jittered backoff, within FetchTimeout.
//
// A provider's Retry-After is the wait its answer asks for (ParseWait).
// A refused fetch's error carries the time until a token request may be
// made (RetryAfterOf, callableIn). The key's state also limits purges by
// rejection (reject.go). One sweep, at most once per cleanupInterval,
// drops the state that ended.

// Breaker states of a source (the values are those of the metrics gauge).
const (
	BreakerClosed   = breaker.Closed
	BreakerHalfOpen = breaker.HalfOpen
	BreakerOpen     = breaker.Open
)

// BreakerState is the state of a source's circuit breaker.
type BreakerState = breaker.State

// policy is the failure policy's state. Lock order: Broker.mu before
// policy.mu. Observers are told outside policy.mu.
type policy struct {
	opts *Options

	mu        sync.Mutex
	keys      map[string]*keyState    // by cache key
	sources   map[string]*sourceState // by SourceID
	lastSweep time.Time
}

func newPolicy(opts *Options) policy {
	return policy{opts: opts, keys: map[string]*keyState{}, sources: map[string]*sourceState{}, lastSweep: opts.Now()}
}

// failure is a remembered failure: until when it refuses calls and how
// many failures in a row it counts; err is nil when none is. obs was told
// it started.
type failure struct {
	err       error
	at, until time.Time
	failures  int
	obs       Observer
}

// active reports whether h refuses calls at now (never before h.at: a
// clock that went back does not extend it).
func (h *failure) active(now time.Time) bool {
	return h.err != nil && !now.Before(h.at) && now.Before(h.until)
}

// consecutive is how many failures h counts if the next one is at now: 0
// unless h ended less than FailureMax ago.
func (h *failure) consecutive(now time.Time, failureMax time.Duration) int {
	if h.err == nil || now.Before(h.at) || !now.Before(h.until.Add(failureMax)) {
		return 0
	}
	return h.failures
}

// keyState is the policy's state for one key.
type keyState struct {
	b       *Binding // for its source, and for the observer told of mem
	mem     failure  // failure memory
	refresh failure  // after a failed refresh-ahead: no new one before until

	// Purges by rejection (reject.go).
	strikes     int
	pausedUntil time.Time // no purge by rejection before this
	purgedAt    time.Time // last purge by rejection
	rejected    Secret    // the token that purge dropped: never adopted again
	lastRej     time.Time // last rejection, purged or not
}

// sourceState is the policy's state for one source.
type sourceState struct {
	brk     breaker.Breaker
	brkObs  Observer // told the breaker's last change
	backoff failure  // after a 429 or a refused credential
}

// notes are calls made once policy.mu is released.
type notes []func()

func (n notes) run() {
	for _, f := range n {
		f()
	}
}

func (p *policy) key(b *Binding) *keyState {
	ks := p.keys[b.key]
	if ks == nil {
		ks = &keyState{b: b}
		p.keys[b.key] = ks
	}
	return ks
}

func (p *policy) source(id string) *sourceState {
	ss := p.sources[id]
	if ss == nil {
		ss = &sourceState{brk: breaker.Breaker{Threshold: p.opts.BreakerThreshold, Cooldown: p.opts.BreakerCooldown}}
		p.sources[id] = ss
	}
	return ss
}

// backoffLocked returns the source or key backoff refusing b's key at
// now, the one that ends last, or nil; scope names it.
func (p *policy) backoffLocked(b *Binding, now time.Time) (h *failure, scope Backoff) {
	if ss := p.sources[b.SourceID]; ss != nil && ss.backoff.active(now) {
		h, scope = &ss.backoff, Backoff{SourceID: b.SourceID}
	}
	if ks := p.keys[b.key]; ks != nil && ks.mem.active(now) && (h == nil || ks.mem.until.After(h.until)) {
		h, scope = &ks.mem, Backoff{SourceID: b.SourceID, key: b.key}
	}
	return h, scope
}

// backoffError is a failed fetch's error as the policy answers it: the
// token API is not called for the key before retryAfter (RetryAfterOf),
// by the backoff named by scope or the budget's closing if that ends later.
type backoffError struct {
	err        error
	retryAfter time.Duration
	scope      Backoff
	notCalled  bool // the policy refused the fetch before any call
	// unscoped: no backoff applies, only the budget's closing that the
	// fetch's 429 caused (BackoffOf reports none).
	unscoped bool
}

func (e *backoffError) Error() string { return e.err.Error() }
func (e *backoffError) Unwrap() error { return e.err }

// Backoff names what the failure policy refused a call for (BackoffOf): a
// source (open breaker or source backoff), one key, or a source's budget.
// Comparable, to limit the logs of repeated refusals. Never log a Backoff
// itself (it holds the binary cache key): log its SourceID.
type Backoff struct {
	// SourceID is the source backing off, or the source of the key.
	SourceID string
	key      string // the cache key backing off; "" when the source is
	budget   bool   // the source's token API budget refused (refusedByBudget)
}

// Source reports whether the whole source backs off (its breaker or its
// backoff), not one key nor its budget.
func (h Backoff) Source() bool { return h.key == "" && !h.budget }

// Budget reports whether the provider's token API budget refused the call
// (Profile.Budget): its own scope, apart from the source's backoff.
func (h Backoff) Budget() bool { return h.budget }

// BackoffOf returns the backoff behind err when the failure policy
// answered it (a backoff or an open breaker, which is its source's);
// false for any other error.
func BackoffOf(err error) (Backoff, bool) {
	var ue *UnavailableError
	if errors.As(err, &ue) {
		return Backoff{SourceID: ue.SourceID}, true
	}
	var be *backoffError
	if errors.As(err, &be) && !be.unscoped {
		return be.scope, true
	}
	return Backoff{}, false
}

// Called reports whether the fetch that ended with err called the token
// API: false when the failure policy refused it without a call (a
// backoff, an open breaker, an exhausted budget); true for nil and any
// other error.
func Called(err error) bool {
	var be *backoffError
	if errors.As(err, &be) {
		return !be.notCalled
	}
	var ue *UnavailableError
	return !errors.As(err, &ue)
}

// withBackoffLocked returns err with the backoff refusing b's key, if any.
func (p *policy) withBackoffLocked(b *Binding, err error, now time.Time) error {
	if h, scope := p.backoffLocked(b, now); h != nil {
		return &backoffError{err: err, retryAfter: callableIn(b, h, now), scope: scope}
	}
	return err
}

// admit returns the backoff error that refuses a call for b's key at now,
// nil when it may go out.
func (p *policy) admit(b *Binding, now time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if h, scope := p.backoffLocked(b, now); h != nil {
		return &backoffError{err: h.err, retryAfter: callableIn(b, h, now), scope: scope, notCalled: true}
	}
	return nil
}

// callableIn is how long after now a token request for b's key may be
// made under the backoff h (nil: none): until h or the budget's closing
// ends, whichever is later. Called with p.mu held.
func callableIn(b *Binding, h *failure, now time.Time) time.Duration {
	var until time.Time
	if h != nil {
		until = h.until
	}
	if b.Budget != nil {
		until = later(until, b.Budget.ClosedUntil())
	}
	return until.Sub(now)
}

// backoffFor is the memory of the n-th consecutive failure (n ≥ 1).
func (p *policy) backoffFor(n int) time.Duration {
	return doubled(p.opts.FailureTTL, p.opts.FailureMax, n)
}

// doubled is base doubled n-1 times (n ≥ 1; base for a smaller n), capped
// at limit.
func doubled(base, limit time.Duration, n int) time.Duration {
	d := base
	for i := 1; i < n; i++ {
		if d > limit/2 {
			return limit
		}
		d *= 2
	}
	return min(d, limit)
}

// record notes the outcome of a fetch of b's key that made calls calls (0:
// refused by the open breaker) and ended with err of class c, and returns
// err with the backoff applied. A success ends the key's and source's
// backoffs; a failure is remembered for the key and, for a refused
// credential or a 429, for the source or its budget. b's observer is told
// when a backoff starts or ends.
func (p *policy) record(ctx context.Context, b *Binding, err error, c Class, calls int, now time.Time) error {
	var n notes
	defer func() { n.run() }()
	p.mu.Lock()
	defer p.mu.Unlock()
	if err == nil {
		if ss := p.sources[b.SourceID]; ss != nil {
			n = ss.release(b.SourceID, n)
		}
		if ks := p.keys[b.key]; ks != nil {
			n = ks.forget(n)
		}
		return nil
	}
	if p.opts.FailureTTL < 0 || errors.Is(err, context.Canceled) {
		return p.withBackoffLocked(b, err, now)
	}
	if calls == 0 && p.source(b.SourceID).brk.State() != BreakerOpen {
		// Refused by the half-open breaker while its probe is out: that
		// ends with the probe's answer, not at a time to remember.
		return p.withBackoffLocked(b, err, now)
	}
	if calls > 0 && c == ClassRateLimited && b.Budget != nil && RetryAfterOf(err) > 0 {
		// The budget refuses every key of the provider until then and
		// answers the next fetches itself.
		n = append(n, holdBudget(ctx, b, now, RetryAfterOf(err)))
		h, scope := p.backoffLocked(b, now)
		return &backoffError{err: err, retryAfter: callableIn(b, h, now), scope: scope, unscoped: h == nil}
	}
	if calls > 0 {
		ss := p.source(b.SourceID)
		var wait time.Duration
		k := ss.backoff.failures
		switch {
		case c == ClassRateLimited && RetryAfterOf(err) > 0:
			wait = min(RetryAfterOf(err), MaxRetryAfterMemory)
		case c == ClassRateLimited, c == ClassCredential:
			// A 429 without a usable Retry-After backs off as a refused
			// credential does; a budget is closed as long, for every
			// sidecar sharing it.
			k = ss.backoff.consecutive(now, p.opts.FailureMax) + 1
			wait = p.backoffFor(k)
			if c == ClassRateLimited && b.Budget != nil {
				n = append(n, holdBudget(ctx, b, now, wait))
			}
		}
		if wait > 0 {
			if ss.backoff.err == nil {
				ss.backoff.obs = b.Observer
				n = append(n, sourceBackingOff(ss.backoff.obs, b.SourceID, true))
			}
			ss.backoff.err, ss.backoff.at, ss.backoff.until, ss.backoff.failures = err, now, now.Add(wait), k
		}
	}
	ks := p.key(b)
	k := ks.mem.consecutive(now, p.opts.FailureMax)
	wait := RetryAfterOf(err) // refused by the breaker: nothing new was learnt about the key
	if calls > 0 {
		k++
		wait = max(p.backoffFor(k), min(wait, MaxRetryAfterMemory))
	}
	if ks.mem.err == nil {
		ks.b, ks.mem.obs = b, b.Observer
		n = append(n, backingOff(ks.mem.obs, b, true))
	}
	ks.mem.err, ks.mem.at, ks.mem.until, ks.mem.failures = err, now, now.Add(wait), k
	return p.withBackoffLocked(b, err, now)
}

// holdBudget closes b's budget for d from now and returns the call that
// closes it in the budget's store (every sidecar sharing it), to make once
// policy.mu is released, whether or not the caller still waits.
func holdBudget(ctx context.Context, b *Binding, now time.Time, d time.Duration) func() {
	store := b.Budget.Hold(now, d)
	return func() { store(context.WithoutCancel(ctx)) }
}

// unrecorded returns err, of a call cut short by a wait for budget, with
// b's backoff applied but without remembering it.
func (p *policy) unrecorded(b *Binding, err error, now time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.withBackoffLocked(b, err, now)
}

// release ends the source's backoff.
func (ss *sourceState) release(id string, n notes) notes {
	if ss.backoff.err != nil {
		n = append(n, sourceBackingOff(ss.backoff.obs, id, false))
	}
	ss.backoff = failure{}
	return n
}

// drop tells the observers that the source's backoff ends and its breaker
// is closed, before its state is deleted.
func (ss *sourceState) drop(id string, n notes) notes {
	n = ss.release(id, n)
	if ss.brk.State() != BreakerClosed {
		n = append(n, breakerChanged(ss.brkObs, id, BreakerClosed))
	}
	return n
}

// forget drops the key's failure memory and refresh backoff.
func (ks *keyState) forget(n notes) notes {
	if ks.mem.err != nil {
		n = append(n, backingOff(ks.mem.obs, ks.b, false))
	}
	ks.mem, ks.refresh = failure{}, failure{}
	return n
}

// deferRefresh defers the next refresh-ahead of b's key after one that
// failed or was refused with err: until until when not zero, else until
// the key's backoff ends or, without one, for
// max(FailureTTL, DefaultFailureTTL).
func (p *policy) deferRefresh(b *Binding, err error, now, until time.Time) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if until.IsZero() {
		until = now.Add(max(p.opts.FailureTTL, DefaultFailureTTL))
		if h, _ := p.backoffLocked(b, now); h != nil {
			until = h.until
		}
	}
	p.key(b).refresh = failure{err: err, at: now, until: until}
}

// refusedByBudget is err, a budget's refusal before any call that counts,
// as the policy answers it: not called, retry after the budget's wait,
// not remembered.
func refusedByBudget(b *Binding, err error) error {
	return &backoffError{err: err, retryAfter: RetryAfterOf(err), scope: Backoff{SourceID: b.SourceID, budget: true}, notCalled: true}
}

// notCalled tells the breaker of b's source that a call allow let through
// did not go out: a probe is released undecided; for another call there
// is nothing to tell.
func (p *policy) notCalled(b *Binding, probe bool, now time.Time) {
	if !probe {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	p.source(b.SourceID).brk.Record(now, breaker.Unknown, nil)
}

// refreshDue reports whether a refresh-ahead of b's key may start at now.
func (p *policy) refreshDue(b *Binding, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ks := p.keys[b.key]
	return ks == nil || !ks.refresh.active(now)
}

// allow asks the breaker of b's source whether a call may go out at now.
// changed: this call moved the breaker to half-open; probe: the call is
// the half-open breaker's probe.
func (p *policy) allow(b *Binding, now time.Time) (ok bool, wait time.Duration, changed, probe bool, cause error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	ss := p.source(b.SourceID)
	ok, wait, changed, cause = ss.brk.Allow(now)
	if changed {
		ss.brkObs = b.Observer
	}
	return ok, wait, changed, ok && ss.brk.State() == BreakerHalfOpen, cause
}

// called tells the breaker of b's source how a call let through by allow
// ended, and returns its state before and after. A canceled call, or one
// cut short by a wait for budget (cutByWait), is undecided: a probe is
// released, another call leaves the breaker as it is.
func (p *policy) called(b *Binding, err error, c Class, cutByWait, probe bool, now time.Time) (from, to BreakerState) {
	o := breaker.Answered
	switch {
	case err == nil:
		o = breaker.Healthy
	case errors.Is(err, context.Canceled) || cutByWait:
		o = breaker.Unknown
	case c == ClassTemporary:
		o = breaker.Failed
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	ss := p.source(b.SourceID)
	if o == breaker.Unknown && !probe {
		state := ss.brk.State()
		return state, state
	}
	from, to = ss.brk.Record(now, o, err)
	if from != to {
		ss.brkObs = b.Observer
	}
	return from, to
}

// maybeSweep, at most once per cleanupInterval (or when the clock went
// back), forgets the backoffs that ended FailureMax ago (or start in the
// future) and drops the key and source states that keep nothing.
func (p *policy) maybeSweep(now time.Time) {
	var n notes
	defer func() { n.run() }()
	p.mu.Lock()
	defer p.mu.Unlock()
	if !now.Before(p.lastSweep) && now.Sub(p.lastSweep) < cleanupInterval {
		return
	}
	p.lastSweep = now
	ended := func(h *failure) bool {
		return h.err != nil && (now.Before(h.at) || !now.Before(h.until.Add(p.opts.FailureMax)))
	}
	for k, ks := range p.keys {
		if ended(&ks.mem) || (ks.mem.err == nil && ended(&ks.refresh)) {
			n = ks.forget(n)
		}
		if ks.mem.err == nil && ks.refresh.err == nil && ks.rejectQuiet(now) && !now.Before(ks.purgedAt.Add(RejectPauseMax)) {
			delete(p.keys, k)
		}
	}
	cutoff := now.Add(-cleanupInterval)
	for id, ss := range p.sources {
		if ended(&ss.backoff) {
			n = ss.release(id, n)
		}
		if ss.backoff.err == nil && ss.brk.Idle(cutoff) {
			n = ss.drop(id, n)
			delete(p.sources, id)
		}
	}
}

func backingOff(obs Observer, b *Binding, on bool) func() {
	return func() {
		if obs != nil {
			obs.BackingOff(b, on)
		}
	}
}

func breakerChanged(obs Observer, sourceID string, state BreakerState) func() {
	return func() {
		if obs != nil {
			obs.BreakerChanged(sourceID, state)
		}
	}
}

func sourceBackingOff(obs Observer, sourceID string, on bool) func() {
	return func() {
		if obs != nil {
			obs.SourceBackingOff(sourceID, on)
		}
	}
}

// Policy is the failure policy's state for one key, for the admin API.
type Policy struct {
	// NextRefresh is the earliest time a refresh-ahead may call the token
	// API: the entry's refresh time, or the end of its backoff if later.
	NextRefresh time.Time
	// LastError is the key's last fetch failure, nil after a success.
	LastError error
	// BackoffUntil is when the key's backoff ends; zero when none
	// applies.
	BackoffUntil time.Time
	// Failures is the number of consecutive failed fetches of the key.
	Failures int
	// SourceBackoffUntil is when the source's backoff ends; zero when
	// none applies.
	SourceBackoffUntil time.Time
	// PurgesPausedUntil is until when the key's purges by rejection are
	// paused (see RejectPauseBase); zero when they are not.
	PurgesPausedUntil time.Time
	// Strikes counts the key's replacement tokens rejected soon after
	// they were cached (see Reject).
	Strikes int
}

// later returns the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}

// Policy returns the failure policy's state for the key of a cached entry.
func (br *Broker) Policy(e *Entry) Policy {
	now := br.opts.Now()
	b := e.binding
	out := Policy{NextRefresh: e.RefreshAt()}
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	out.SourceBackoffUntil = p.sourceHealthLocked(b.SourceID, now).BackoffUntil
	if ks := p.keys[b.key]; ks != nil {
		out.LastError, out.Failures = ks.mem.err, ks.mem.failures
		if out.LastError == nil {
			out.LastError = ks.refresh.err
		}
		for _, h := range []*failure{&ks.mem, &ks.refresh} {
			if h.active(now) {
				out.BackoffUntil = later(out.BackoffUntil, h.until)
			}
		}
		out.PurgesPausedUntil, out.Strikes = ks.purgePause(now), ks.strikes
	}
	out.NextRefresh = later(out.NextRefresh, later(out.SourceBackoffUntil, out.BackoffUntil))
	return out
}

// SourceHealth returns the health of one source without its keys
// (FailingKeys and LastError are zero): one lookup, unlike SourcesHealth.
func (br *Broker) SourceHealth(sourceID string) SourceHealth {
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sourceHealthLocked(sourceID, br.opts.Now())
}

// sourceHealthLocked is SourceHealth at now. Call it with p.mu held.
func (p *policy) sourceHealthLocked(id string, now time.Time) SourceHealth {
	h := SourceHealth{Breaker: BreakerClosed}
	if ss := p.sources[id]; ss != nil {
		h.Breaker = ss.brk.State()
		if ss.backoff.active(now) {
			h.BackoffUntil, h.BackoffError, h.BackoffAt = ss.backoff.until, ss.backoff.err, ss.backoff.at
		}
	}
	return h
}

// ForgetFailures drops the remembered key failures whose error match
// selects, so that their keys are fetched again at once (after a new
// consent, say). It returns how many were dropped.
func (br *Broker) ForgetFailures(match func(error) bool) int {
	var n notes
	defer func() { n.run() }()
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	c := 0
	for _, ks := range p.keys {
		if ks.mem.err != nil && match(ks.mem.err) {
			n = ks.forget(n)
			c++
		}
	}
	return c
}

// ForgetSource drops everything the failure policy remembers about a
// source: its backoff, its breaker, and its keys' failures and refresh
// backoffs. Call it when the source's credential changed under the same
// ID. It returns how many key failures were dropped.
func (br *Broker) ForgetSource(sourceID string) int {
	var n notes
	defer func() { n.run() }()
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ss := p.sources[sourceID]; ss != nil {
		n = ss.drop(sourceID, n)
		delete(p.sources, sourceID)
	}
	c := 0
	for _, ks := range p.keys {
		if ks.b.SourceID == sourceID && (ks.mem.err != nil || ks.refresh.err != nil) {
			if ks.mem.err != nil {
				c++
			}
			n = ks.forget(n)
		}
	}
	return c
}

// Backoffs calls visit for every key in backoff now, with the binding of
// its last failure, that failure, when it happened and when the backoff
// ends. visit runs outside the policy's lock.
func (br *Broker) Backoffs(visit func(b *Binding, err error, at, until time.Time)) {
	now := br.opts.Now()
	p := &br.pol
	p.mu.Lock()
	keys := make([]keyState, 0, len(p.keys))
	for _, ks := range p.keys {
		if ks.mem.active(now) {
			keys = append(keys, *ks)
		}
	}
	p.mu.Unlock()
	for _, k := range keys {
		visit(k.b, k.mem.err, k.mem.at, k.mem.until)
	}
}

// SourcesHealth returns the health of the given sources, by source ID, in
// one pass over the failure memory.
func (br *Broker) SourcesHealth(sourceIDs ...string) map[string]SourceHealth {
	now := br.opts.Now()
	out := make(map[string]SourceHealth, len(sourceIDs))
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	for _, id := range sourceIDs {
		out[id] = p.sourceHealthLocked(id, now)
	}
	for _, ks := range p.keys {
		h, ok := out[ks.b.SourceID]
		if !ok || !ks.mem.active(now) {
			continue
		}
		h.FailingKeys++
		if h.LastError == nil || ks.mem.at.After(h.LastFailure) {
			h.LastError, h.LastFailure = ks.mem.err, ks.mem.at
		}
		out[ks.b.SourceID] = h
	}
	return out
}
