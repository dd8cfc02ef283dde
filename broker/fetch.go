package broker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// cachedFresh returns the entry cached for b's key when it needs no fetch
// (for a refresh-ahead of cur: another entry, not yet due), else nil.
// Called inside the singleflight group, so that a fetch that just ended
// is not repeated.
func (br *Broker) cachedFresh(b *Binding, cur *Entry) *Entry {
	v, ok := br.cache.Get(b.key)
	if !ok {
		return nil
	}
	e, now := v.(*Entry), br.opts.Now()
	if !e.validAt(now, br.opts.Leeway) || (cur != nil && (e == cur || !now.Before(e.RefreshAt()))) {
		return nil
	}
	e.servedTo(b)
	b.current.Store(e)
	return e
}

// fetch obtains a token for b and caches it, once per key at a time
// (inside the singleflight group), bounded by FetchTimeout only: detached
// from the cancellation of the request that started it, keeping its
// values. cur is the entry refreshed ahead, nil for a foreground fetch. A
// forced fetch (Check) adopts no stored token and counts its calls in
// force.
func (br *Broker) fetch(parent context.Context, b *Binding, cur *Entry, force *forced) (*Entry, error) {
	now := br.opts.Now()
	br.pol.maybeSweep(now)
	// Shared by its waiters: each gives up on its own context.
	deadline := time.Now().Add(br.opts.FetchTimeout)
	ctx, cancel := context.WithDeadline(context.WithoutCancel(parent), deadline)
	defer cancel()
	by := br.budgetBy(parent, b, now)
	// A lookup's fetch gives up its wait for budget once no lookup waits
	// for it (waitFor).
	bctx, giveUp := ctx, context.CancelFunc(nil)
	if cur == nil && force == nil {
		bctx, giveUp = context.WithCancel(ctx)
		defer giveUp()
	}

	// The last call and the fetch are reported once the outcome is
	// stored, so that an observer sees a consistent state.
	report := func() {}
	defer func() { report() }()
	mint := func(ctx context.Context) (Token, error) {
		tok, calls, r, err := br.mint(ctx, bctx, b, cur != nil, deadline, by)
		report()
		report = r
		if force != nil {
			force.calls += calls
		}
		if err == nil {
			tok.RefreshAt = br.planRefresh(b, tok, cur != nil)
		}
		return tok, err
	}
	f := br.beginFlight(b.key, giveUp)
	defer br.endFlight(b.key, f)
	for attempt := 0; ; attempt++ {
		tok, origin, err := br.obtain(ctx, b, cur, mint, f, force != nil)
		now = br.opts.Now()
		if err != nil {
			switch {
			case cur != nil && refusedByBudgetOnly(err):
				br.refreshDenied(b, cur, err, now)
			case cur != nil:
				br.pol.deferRefresh(b, err, now, time.Time{})
			}
			return nil, err
		}
		e := br.newEntry(b, tok, origin)
		if br.storeFetched(b, e, now, f) || attempt > 0 {
			// A token purged twice while fetched is handed to its
			// waiters, never cached.
			if b.Observer != nil && origin == OriginMinted {
				b.Observer.RefreshPlanned(b, e.RefreshAt())
			}
			return e, nil
		}
		// A purge named the token while it was fetched: once more.
	}
}

// obtain gets a token through the shared tier when there is one (a usable
// stored token, unless mintOnly, or one minted once for the fleet), else
// by minting.
func (br *Broker) obtain(ctx context.Context, b *Binding, cur *Entry, mint func(context.Context) (Token, error), f *flight, mintOnly bool) (Token, string, error) {
	sh := br.opts.Shared
	if sh == nil {
		tok, err := mint(ctx)
		return tok, OriginMinted, err
	}
	usable := br.usable(cur)
	if mintOnly {
		usable = func(Token) bool { return false }
	}
	if rejected := br.rejectedToken(b.key); rejected != "" {
		// A token an upstream rejected is never adopted back.
		valid := usable
		usable = func(t Token) bool { return t.Value != rejected && valid(t) }
	}
	// Nor is one purged while this fetch runs (inflight.go).
	adoptable := func(t Token) bool { return usable(t) && !br.purgedDuring(f, t.Fingerprint()) }
	tok, adopted, err := sh.Fetch(ctx, b.key, adoptable, mint)
	if err != nil || !adopted {
		return tok, OriginMinted, err
	}
	now := br.opts.Now()
	tok.issuedBy(now)
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
		t.issuedBy(now)
		return t.Expiry.Sub(cur.expiry) > outlivesBy && now.Before(br.refreshAt(t))
	}
}

// outlivesBy is how much longer than the token it refreshes an adopted
// token must live: more than clock jitter, so that the same token handed
// back is not taken for a newer one.
const outlivesBy = time.Second

// mint calls the Source for b's key through the failure policy and
// records the outcome. It returns how many calls it made and the report of
// the last call and of the fetch, to run once the outcome is stored.
// deadline bounds the retries (wall clock), by a caller's wait for budget
// (broker clock); bctx, derived from ctx, ends that wait early.
func (br *Broker) mint(ctx, bctx context.Context, b *Binding, background bool, deadline, by time.Time) (Token, int, func(), error) {
	tok, f, class, last, err := br.attempts(ctx, bctx, b, background, deadline, by)
	calls := len(f.Attempts)
	// A ClassRetryNow call whose resend did not go out does not count.
	answered := calls
	if calls > 0 && IsRetryNow(f.Attempts[calls-1].Err) {
		answered--
	}
	be := (*backoffError)(nil)
	switch {
	case answered == 0 && errors.As(err, &be) && be.notCalled:
	case answered == 0 && errors.Is(err, budget.ErrExhausted):
		err = refusedByBudget(b, err)
	case f.cutByWait:
		err = br.pol.unrecorded(b, err, br.opts.Now())
	default:
		err = br.pol.record(ctx, b, err, class, answered, br.opts.Now())
		if answered == 0 && errors.As(err, &be) {
			be.notCalled = true // refused by the breaker: record made be for this fetch
		}
	}
	if b.Observer == nil || calls == 0 {
		return tok, calls, last, err
	}
	f.Err = err
	if err == nil {
		f.Token = tok
	}
	return tok, calls, func() {
		last()
		b.Observer.FetchDone(ctx, b, f)
	}, err
}

// attempts calls the Source up to MaxAttempts times while its failures are
// temporary and the backoffs, the breaker, the budget and the deadline
// allow; an attempt answered ClassRetryNow is sent once more at once. It
// returns the calls made (f) and the class of the last counted error.
// Every call but the last is reported to b's observer here, once; the
// returned func reports the last. A refusal before the first call that
// counts ends the fetch with the refusal; before a retry, with the last
// call's error. A ClassRetryNow call is kept in f.Attempts with a
// *RetryNowError; last there, it tells mint that its resend did not go
// out.
func (br *Broker) attempts(ctx, bctx context.Context, b *Binding, background bool, deadline, by time.Time) (Token, Fetch, Class, func(), error) {
	obs := b.Observer
	noop := func() {}
	report := noop
	f := Fetch{Background: background}
	var first time.Time
	var last error
	var class Class
	// callAllowed asks the backoffs, then the breaker, whether a call may
	// go out now; it returns the refusal (the last call's error for a
	// retry), or whether the call is the half-open breaker's probe. A call
	// that already holds the probe (held) asks only the backoffs.
	callAllowed := func(held bool) (probe bool, refused error) {
		now := br.opts.Now()
		if err := br.pol.admit(b, now); err != nil {
			if last != nil {
				return false, last
			}
			return false, err
		}
		if held {
			return true, nil
		}
		ok, wait, halfOpen, probe, cause := br.pol.allow(b, now)
		if halfOpen {
			breakerChanged(obs, b.SourceID, BreakerHalfOpen)()
		}
		if ok {
			return probe, nil
		}
		if last != nil {
			cause = last
		}
		return false, &UnavailableError{SourceID: b.SourceID, RetryAfter: wait, Until: br.opts.Now().Add(wait), Err: cause}
	}
	// resend: this call resends an attempt answered ClassRetryNow, with
	// its probe.
	var probe, resend bool
	for attempt := 1; ; {
		var refused error
		if !resend {
			if probe, refused = callAllowed(false); refused != nil {
				return Token{}, f, class, report, refused
			}
		}
		// A probe does not wait for budget: it goes now or is released.
		takeBy := by
		if probe {
			takeBy = br.opts.Now()
		}
		waited, err := br.takeBudget(bctx, b, background, takeBy)
		if err != nil {
			br.pol.notCalled(b, probe, br.opts.Now())
			if last != nil {
				err = last
			}
			return Token{}, f, class, report, err
		}
		if waited {
			// The breaker may have opened, or a backoff started, while
			// this call waited for budget: ask again.
			wasProbe := probe
			if probe, refused = callAllowed(probe); refused != nil {
				br.pol.notCalled(b, wasProbe, br.opts.Now())
				return Token{}, f, class, report, refused
			}
		}
		start := time.Now()
		if len(f.Attempts) == 0 {
			first = start
		}
		tok, err := b.Source.Token(ctx, b.Request())
		end := time.Now()
		elapsed := end.Sub(start)
		now := br.opts.Now()
		if err == nil {
			err = br.check(b, &tok, now)
		}
		var again bool
		if err != nil {
			c := ClassOf(b.Source, err)
			again = c == ClassRetryNow && !resend
			switch {
			case again:
				err = &RetryNowError{Err: err}
			case c == ClassRetryNow: // the same answer to the call sent again
				class = ClassTemporary
			default:
				class = c
			}
		}
		// A call cut short after a wait for budget says nothing of the
		// provider.
		f.cutByWait = waited && errors.Is(err, context.DeadlineExceeded)
		f.Attempts = append(f.Attempts, Attempt{Elapsed: elapsed, Err: err})
		f.Elapsed = end.Sub(first)
		var from, to BreakerState
		if !again {
			from, to = br.pol.called(b, err, class, f.cutByWait, probe, now)
		}
		report = func() {
			// Told once the outcome is remembered.
			if from != to {
				breakerChanged(obs, b.SourceID, to)()
			}
			if obs != nil {
				obs.Fetched(ctx, b, tok, elapsed, background, err)
			}
		}
		if again {
			// Resent at once: reported now as no failure.
			report()
			report, resend = noop, true
			continue
		}
		resend = false
		// A 429 is retried only with a Retry-After; without one the
		// source backs off (record).
		retry := err != nil && !errors.Is(err, context.Canceled) && (class == ClassTemporary || class == ClassRateLimited && RetryAfterOf(err) > 0)
		if !retry || attempt >= br.opts.MaxAttempts {
			return tok, f, class, report, err
		}
		// A Retry-After longer than backoffMax ends the fetch: the key's
		// backoff honours it.
		ra := RetryAfterOf(err)
		wait := max(backoff(attempt), ra)
		if ra > backoffMax || time.Now().Add(wait).After(deadline) {
			return tok, f, class, report, err
		}
		// Reported now, so that a refused next attempt does not report it.
		report()
		report, last = noop, err
		if br.opts.Sleep(ctx, wait) != nil {
			return tok, f, class, noop, err
		}
		attempt++
	}
}

// backoff returns the wait before attempt n+1 (n ≥ 1): exponential from
// backoffBase, capped at backoffMax, with full jitter (uniform in [d/2, d]).
func backoff(n int) time.Duration {
	d := backoffBase << (n - 1)
	if d > backoffMax || d <= 0 {
		d = backoffMax
	}
	return d/2 + rand.N(d/2+1)
}

// check validates what a Source returned before it is cached.
func (br *Broker) check(b *Binding, tok *Token, now time.Time) error {
	status := tok.Status
	if status == 0 {
		status = http.StatusOK
	}
	if !ValidTokenValue(tok.Value.Reveal()) {
		return &APIError{Provider: sourceType(b), StatusCode: status, Code: "invalid_token_value",
			Description: "the access token is empty, too long or contains characters not allowed in an HTTP header"}
	}
	tok.issuedBy(now)
	if !tok.ValidAt(now, br.opts.Leeway) {
		return &APIError{Provider: sourceType(b), StatusCode: status, Code: "expired_token",
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

// budgetBy is until when (broker clock) a caller of the fetch of b's key
// started at now waits for budget: BudgetWait at most, and no later than
// turnBy allows before the fetch's and the parent request's deadline.
func (br *Broker) budgetBy(parent context.Context, b *Binding, now time.Time) time.Time {
	end := now.Add(br.opts.FetchTimeout)
	if d, ok := parent.Deadline(); ok {
		if pd := now.Add(time.Until(d)); pd.Before(end) {
			end = pd
		}
	}
	by := turnBy(b.Source, now, end)
	if w := now.Add(br.opts.BudgetWait); w.Before(by) {
		by = w
	}
	return by
}

// turnBy is until when (broker clock) a wait for budget may last for a
// call to src that must end by end: the call keeps its bound, or half the
// time left when the bound does not fit; never before now.
func turnBy(src Source, now, end time.Time) time.Time {
	by := end.Add(-min(callBound(src), end.Sub(now)/2))
	if by.Before(now) {
		return now
	}
	return by
}

// CallBounded is implemented by sources whose calls to the token API have
// a bound (their HTTP client's timeout): a caller's wait for budget ends
// early enough to leave a call that long.
type CallBounded interface {
	// CallTimeout is the longest one call to the token API takes; 0 when
	// it is not bounded.
	CallTimeout() time.Duration
}

// defaultCallBound is the time a caller's wait for budget leaves the token
// API call of a source that states no bound (CallBounded).
const defaultCallBound = time.Second

// callBound is the time a wait for budget leaves src's call.
func callBound(src Source) time.Duration {
	if cb, ok := src.(CallBounded); ok {
		if d := cb.CallTimeout(); d > 0 {
			return d
		}
	}
	return defaultCallBound
}

// takeBudget takes one token request from b's budget, if any: a caller
// waits its turn up to by (broker clock), a refresh-ahead never waits. It
// reports whether the request waited.
func (br *Broker) takeBudget(ctx context.Context, b *Binding, background bool, by time.Time) (waited bool, err error) {
	if b.Budget == nil {
		return false, nil
	}
	p := budget.Foreground
	if background {
		p = budget.Background
	}
	// What the fetch spent already counts: the call keeps its time.
	if d, ok := ctx.Deadline(); ok {
		now := br.opts.Now()
		if late := turnBy(b.Source, now, now.Add(time.Until(d))); late.Before(by) {
			by = late
		}
		if by.Before(now) {
			by = now
		}
	}
	return b.Budget.Take(ctx, p, by, br.opts.Sleep)
}

// refusedByBudgetOnly reports whether err ended a fetch that its budget
// refused before any call to the token API.
func refusedByBudgetOnly(err error) bool {
	return errors.Is(err, budget.ErrExhausted) && !Called(err)
}

// A refresh-ahead refused by its budget is tried again after the
// budget's wait, jittered, within these bounds.
const (
	refreshDeferMin = 50 * time.Millisecond
	refreshDeferMax = time.Second
)

// refreshDenied defers the next refresh-ahead of cur, which its budget
// refused, and calls refreshBehind when the wait reaches cur's end.
func (br *Broker) refreshDenied(b *Binding, cur *Entry, err error, now time.Time) {
	wait := RetryAfterOf(err)
	d := min(max(wait, refreshDeferMin), refreshDeferMax)
	d += rand.N(d/2 + 1)
	br.pol.deferRefresh(b, err, now, now.Add(d))
	cur.deferred.Store(true)
	end := cur.expiry.Add(-br.opts.Leeway)
	if now.Add(max(wait, d)).Before(end) {
		return
	}
	br.refreshBehind(b, cur)
}

// refreshBehind tells b's Observer, once per token, that e's refresh will
// not happen before e can no longer be served.
func (br *Broker) refreshBehind(b *Binding, e *Entry) {
	if !e.behind.CompareAndSwap(false, true) {
		return
	}
	if b.Observer != nil {
		b.Observer.RefreshBehind(b, e.expiry)
	}
}

// planRefresh plans the refresh-ahead of tok in its refresh window, ending
// max(life/40, Leeway+1s) before expiry: at the end for a token minted by
// a refresh, at random in the window for one minted for a caller, so that
// tokens minted together do not refresh together. Budget.Plan may move
// the point earlier.
func (br *Broker) planRefresh(b *Binding, tok Token, byRefresh bool) time.Time {
	start := br.refreshAt(tok)
	if br.opts.RefreshWindow <= 0 {
		return start
	}
	late := max(tok.Lifetime()/40, br.opts.Leeway+time.Second)
	end := tok.Expiry.Add(-late)
	if !start.Before(end) {
		return start
	}
	at := end
	if !byRefresh {
		at = start.Add(rand.N(end.Sub(start)))
	}
	if b.Budget != nil {
		at = b.Budget.Plan(start, at)
	}
	return at
}
