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
//   - a source backoff refuses every key of the source: after a 429 with
//     Retry-After from a provider without a budget, until then (capped at
//     MaxRetryAfterMemory); after a 429 without a usable Retry-After or a
//     refused credential, FailureTTL doubled at each consecutive one up
//     to FailureMax. A success of any key of the source ends it. For a
//     provider with a budget, a 429 with Retry-After closes the budget
//     until then instead (Budget.Hold, same cap) and is not remembered
//     for the source nor the key: callers queue for the budget or are
//     refused with its wait, refreshes wait; a 429 without a usable
//     Retry-After starts the source backoff and closes the budget as
//     long, so that every sidecar sharing the budget's store holds too;
//   - a key backoff, from the key's failure memory (FailureTTL doubled at
//     each consecutive failure up to FailureMax, or the provider's
//     Retry-After if longer), refuses the key; after a failed
//     refresh-ahead, no new one starts before the key's backoff ends;
//   - the source's circuit breaker (internal/breaker) refuses calls after
//     BreakerThreshold consecutive temporary failures;
//   - the provider's budget (Profile.Budget, package budget) is taken
//     before each call: a caller waits its turn (at most BudgetWait, and
//     leaving the call its bound before the fetch's deadline, budgetBy),
//     a refresh-ahead never does; a refusal is answered without a call,
//     with the budget's wait, and is not remembered; a call that runs out
//     of time after such a wait is neither held against the breaker nor
//     remembered for the key; a refused refresh-ahead is tried again by a
//     lookup after a short defer (refreshDenied);
//   - a fetch calls up to MaxAttempts times while its failures are
//     temporary, with backoff and jitter, within FetchTimeout.
//
// A provider's Retry-After, here, is the wait its answer asks for as the
// sources read it (ParseWait): its Retry-After header or, without a usable
// one, the reset of its rate-limit headers.
//
// The source classifies its errors (Classifier). A refused fetch's error
// carries the backoff applied, so RetryAfterOf tells callers what is left
// of it, or of the closing of the provider's budget when that ends later
// (callableIn): the time until a token request may be made. The key's
// state also limits purges by rejection (reject.go). One sweep, at most
// once per cleanupInterval, drops the state that ended.

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
// Observers are told outside policy.mu.
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

// failure is a remembered failure: until when it refuses calls, how many
// failures in a row it counts. err is nil when nothing is remembered; the
// observer obs was told it started (a key's or a source's backoff).
type failure struct {
	err       error
	at, until time.Time
	failures  int
	obs       Observer
}

// active reports whether h refuses calls at now: a clock that went back
// before the failure does not extend it.
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

// notes are calls made once policy.mu is released: observers', a
// budget's hold.
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
// token API is not called for the key before retryAfter has passed (the
// key's or its source's backoff, whichever ends last, named by scope, or
// its budget's closing when that ends later; unscoped, the closing alone).
// RetryAfterOf reports it, so a caller is told the backoff actually
// applied.
type backoffError struct {
	err        error
	retryAfter time.Duration
	scope      Backoff
	notCalled  bool // the policy refused the fetch before any call
	// unscoped: no backoff refuses the key; retryAfter is the closing of
	// its budget that the fetch's 429 caused (BackoffOf reports none).
	unscoped bool
}

func (e *backoffError) Error() string { return e.err.Error() }
func (e *backoffError) Unwrap() error { return e.err }

// Backoff names what the failure policy does not call the token API for,
// behind an error it answered (BackoffOf): a source (its circuit breaker
// open, or its backoff after a 429 with Retry-After or a refused
// credential), one key (its failure memory), or a source's budget. Backoffs are comparable:
// equal for the refusals of one source's backoff, or of one key's. A map
// key to limit the logs of repeated refusals; never log a Backoff itself
// (it holds the binary cache key, see Binding.Key): log its SourceID.
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
// answered it (a backoff, with or without a call to the token API, or an
// open breaker); false for any other error. An open breaker, also when a
// key's memory repeats it, is its source's backoff.
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
// API: false when the failure policy refused it without a call (a key's
// or its source's backoff, an open breaker, an exhausted budget), also for
// the callers that joined that fetch. True for nil and for any other error.
func Called(err error) bool {
	var be *backoffError
	if errors.As(err, &be) {
		return !be.notCalled
	}
	var ue *UnavailableError
	return !errors.As(err, &ue)
}

// withBackoffLocked returns err with the time left until a token request
// for b's key may be made (callableIn); err itself when no backoff
// applies.
func (p *policy) withBackoffLocked(b *Binding, err error, now time.Time) error {
	if h, scope := p.backoffLocked(b, now); h != nil {
		return &backoffError{err: err, retryAfter: callableIn(b, h, now), scope: scope}
	}
	return err
}

// admit returns the error that refuses a call for b's key at now (the
// remembered failure, with the time left until a token request for the
// key may be made, callableIn), nil when it may go out.
func (p *policy) admit(b *Binding, now time.Time) error {
	p.mu.Lock()
	defer p.mu.Unlock()
	if h, scope := p.backoffLocked(b, now); h != nil {
		return &backoffError{err: h.err, retryAfter: callableIn(b, h, now), scope: scope, notCalled: true}
	}
	return nil
}

// callableIn is how long after now a token request for b's key may be
// made while the backoff h (nil: none) refuses it: until h ends, or until
// b's budget reopens when it is closed longer (another key's 429 with
// Retry-After, the provider's rate-limit headers), so that the wait a
// refused caller is told is the one it has. Called with p.mu held (before
// the budget's lock).
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
	if n >= 31 {
		return p.opts.FailureMax
	}
	return min(p.opts.FailureTTL<<(n-1), p.opts.FailureMax)
}

// record notes the outcome of a fetch of b's key that made calls calls to
// the Source (0: refused by the breaker, remembered for the key while the
// breaker is open) and ended with err, of class c;
// b's observer is told when a backoff starts and ends: a success
// ends the key's and its source's backoffs; a failure is remembered for
// the key and, when c says it is the credential's or a 429's, for the
// source (a 429's for a budget: Budget.Hold under p.mu, whose store call
// gets ctx without its end once p.mu is released). It returns err as the policy answers it (with the backoff applied).
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
		// ends when the probe is answered, not at a time the key's
		// memory could keep (nor once the probe closed the breaker).
		return p.withBackoffLocked(b, err, now)
	}
	if calls > 0 && c == ClassRateLimited && b.Budget != nil && RetryAfterOf(err) > 0 {
		// The budget holds every key of the provider until then (at
		// most MaxHold); it answers the next fetches itself, and this
		// one with its closing when no backoff ends later. Without a
		// backoff, this answer is the provider's refusal, not one of
		// the budget's (unscoped).
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
			// A 429 without a usable Retry-After throttles the source's
			// credential too: held as a refused credential is, the
			// count of consecutive ones kept here; with a budget, the
			// budget is held as long, for every sidecar sharing it.
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

// holdBudget closes b's budget for d from now, a 429's hold, and returns
// the call that holds it in the budget's store, so that every budget
// sharing the store (each sidecar of a fleet on one Redis) holds too: it
// is made once policy.mu is released (a Redis call), whether or not the
// fetch's caller still waits.
func holdBudget(ctx context.Context, b *Binding, now time.Time, d time.Duration) func() {
	store := b.Budget.Hold(now, d)
	return func() { store(context.WithoutCancel(ctx)) }
}

// unrecorded returns err, of a fetch of b's key whose call ran out of time
// after a wait for budget, as the policy answers it without remembering
// it: the wait, not the provider, cut the call short.
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

// drop tells what ends with the source's state, before it is deleted: its
// backoff, and its breaker when not closed (closed from then on, as
// SourceHealth says), to the observer told of its last change.
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
// failed or that its budget refused (err): until until when it is not
// zero, else until the key's backoff ends or, when the failure memory is
// disabled, for DefaultFailureTTL.
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

// refusedByBudget is a fetch of b's key that its budget refused before any
// call, or before the second call of its first attempt answered
// ClassRetryNow (a call that says nothing of the provider), as the policy
// answers it: not called, retry after the budget's wait. It is not
// remembered: the budget answers the next fetch itself.
func refusedByBudget(b *Binding, err error) error {
	return &backoffError{err: err, retryAfter: RetryAfterOf(err), scope: Backoff{SourceID: b.SourceID, budget: true}, notCalled: true}
}

// notCalled tells the breaker of b's source that a call allow let through
// did not go out (its budget refused it, or a backoff after its wait for
// budget): a probe is released undecided.
// Another call tells it nothing: a probe out meanwhile keeps its place.
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
// ended, and returns its state before and after.
// cutByWait: the call ran out of time after a wait for budget, which
// tells nothing about the source (undecided, like a canceled call): the
// probe (probe) is released; another call leaves the breaker as it is,
// so that a probe out meanwhile keeps its place.
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

// maybeSweep runs the sweep at most once per cleanupInterval (or at once
// when the clock went back): it forgets the backoffs that ended
// FailureMax ago (or lie in the future of a clock that went back), and
// drops the state of keys and sources that keeps nothing, so that state
// keyed by source ID (a new ID per configuration change) does not grow.
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
	// SourceBackoffUntil is until when the key's source is not called for
	// any key (a 429, or a bad credential); zero when no
	// source backoff applies.
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

// SourceHealth returns the health of one source, its keys not counted
// (FailingKeys and LastError are zero): its breaker's state and its
// backoff. Unlike SourcesHealth it does not walk the failure memory: it
// costs a lookup, whatever the number of failing keys.
func (br *Broker) SourceHealth(sourceID string) SourceHealth {
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.sourceHealthLocked(sourceID, br.opts.Now())
}

// sourceHealthLocked is the health of a source at now, its keys not
// counted: its breaker's state and its backoff. Call it with p.mu held.
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
		if ks.mem.err != nil && match(ks.mem.err) {
			n = ks.forget(n)
			c++
		}
	}
	return c
}

// ForgetSource drops everything the failure policy remembers about a
// source: its backoff (429 Retry-After, bad credential), its circuit
// breaker, and the failure memory and refresh backoffs of its keys. Call it when the
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

// Backoffs calls visit for every key in backoff now (its last fetch
// failed and its failure memory has not ended), with the binding of its
// last failure, that failure, when it happened and until when the key is
// not called. The keys are copied under the failure policy's lock and
// visited after it is released: visit may take its time.
func (br *Broker) Backoffs(visit func(b *Binding, err error, at, until time.Time)) {
	type held struct {
		b         *Binding
		err       error
		at, until time.Time
	}
	now := br.opts.Now()
	p := &br.pol
	p.mu.Lock()
	keys := make([]held, 0, len(p.keys))
	for _, ks := range p.keys {
		if ks.mem.active(now) {
			keys = append(keys, held{ks.b, ks.mem.err, ks.mem.at, ks.mem.until})
		}
	}
	p.mu.Unlock()
	for _, k := range keys {
		visit(k.b, k.err, k.at, k.until)
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
