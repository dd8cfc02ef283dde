// Package budget spends a token API's rate limit on purpose: one Budget per
// provider, a generic cell rate algorithm bucket in a Store (in this
// process, or in Redis for a fleet), callers served before refreshes,
// refreshes planned where the rate has room, and the provider's rate-limit
// headers lowering the rate until they pass. A provider's 429 closes the
// budget (Hold) in every process spending its Store key, at most MaxHold.
package budget

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"time"
)

// Priority is who a token request is for.
type Priority uint8

// Priorities.
const (
	// Foreground: a caller waits for the token, and its turn.
	Foreground Priority = iota
	// Background: a refresh-ahead. It never takes what a waiting caller
	// needs, and never waits.
	Background
)

// String names the priority for logs and metrics.
func (p Priority) String() string {
	if p == Background {
		return "background"
	}
	return "foreground"
}

// ErrExhausted is in the chain of every *ExhaustedError.
var ErrExhausted = errors.New("token API budget exhausted")

// ExhaustedError is a token request the budget refused without calling the
// token API.
type ExhaustedError struct {
	// Provider is the budget's name.
	Provider string
	// RetryAfter is how long until the budget expects to serve a request
	// of the same priority.
	RetryAfter time.Duration
	// Priority is the refused request's.
	Priority Priority
}

// Error says whose budget is exhausted, for which request and for how
// long.
func (e *ExhaustedError) Error() string {
	why := "its rate limit has no room before the request's deadline"
	if e.Priority == Background {
		why = "a refresh-ahead gets none while callers wait, the provider's limit is closed, or only the callers' reserve is left"
	}
	return fmt.Sprintf("token API budget of provider %q exhausted: %s; retry after %s",
		e.Provider, why, e.RetryAfter.Round(time.Millisecond))
}

// Unwrap returns ErrExhausted.
func (e *ExhaustedError) Unwrap() error { return ErrExhausted }

// BackgroundShare is the part of the rate that refreshes are planned on
// (Plan); the rest is kept for callers who wait.
const BackgroundShare = 0.75

// reserveShare is the part of the burst a background request leaves in the
// bucket for callers.
const reserveShare = 0.25

// Option configures a Budget.
type Option func(*Budget)

// WithFallback sets the limit of the in-process bucket that answers while
// the Store fails. Default: the budget's own limit.
func WithFallback(l Limit) Option {
	return func(b *Budget) { b.fallbackLimit = l }
}

// WithLocalShare says the budget spends one of n equal shares of the
// provider's limit in a store of its own, so Observe lowers it to the n-th
// of what the provider says is left for the whole API key. Default 1.
func WithLocalShare(n int) Option {
	return func(b *Budget) { b.shareOf = max(n, 1) }
}

// WithSharedBy says the budget's Store is shared by n sidecars: each plans
// its refreshes on an n-th of the rate, and while the store fails spends
// at most an n-th of a lowered rate. Default 1.
func WithSharedBy(n int) Option {
	return func(b *Budget) { b.sharedBy = max(n, 1) }
}

// Budget is one provider's token API budget. It is safe for concurrent use;
// all profiles of a provider share one.
type Budget struct {
	name          string
	limit         Limit
	fallbackLimit Limit
	store         Store
	fallback      Store // in-process, while store fails
	now           func() time.Time
	shareOf       int // WithLocalShare
	sharedBy      int // WithSharedBy

	mu sync.Mutex
	// queue holds the callers waiting, in arrival order, each a channel
	// closed when it becomes the head; only the head asks the store.
	queue []chan struct{}
	// nextAt is when the head of the queue expects to be served.
	nextAt time.Time
	// lowered applies until loweredUntil (Observe); closedUntil: the
	// provider said no request is left before then.
	lowered                   Limit
	loweredUntil, closedUntil time.Time
	remaining                 int // the bucket's last answer
	used, exhausted           uint64
	waitTotal                 time.Duration
	cal                       calendar
}

// New returns the budget of the provider name, spending l in s under the
// key name, on the clock now (time.Now when nil). It panics when l or the
// fallback limit is not valid (Limit.Validate): check configuration first.
func New(name string, l Limit, s Store, now func() time.Time, opts ...Option) *Budget {
	if err := l.Validate(); err != nil {
		panic("budget.New: provider " + name + ": " + err.Error())
	}
	if now == nil {
		now = time.Now
	}
	b := &Budget{name: name, limit: l, fallbackLimit: l, store: s, now: now, shareOf: 1, sharedBy: 1}
	for _, o := range opts {
		o(b)
	}
	if err := b.fallbackLimit.Validate(); err != nil {
		panic("budget.New: provider " + name + ": fallback " + err.Error())
	}
	b.fallback = NewLocal(now)
	b.remaining = l.Burst
	b.cal = newCalendar(l.Share(b.sharedBy))
	return b
}

// minRetryAfter is the least wait a refused caller is told, so that it
// always gets a Retry-After.
const minRetryAfter = time.Millisecond

// Sleep waits d, or until ctx ends and then returns ctx's error.
func Sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// Take spends one token request. A Foreground request waits its turn
// behind the callers already waiting until the bucket has room, in sleep
// (nil: Sleep); when it cannot be served before deadline (budget clock;
// zero: none) it returns an *ExhaustedError at once. A Background request
// is served only when no caller waits and the bucket keeps a reserve for
// callers, else refused at once. Take returns ctx's error when ctx ends
// while it waits. It reports whether the request waited.
func (b *Budget) Take(ctx context.Context, p Priority, deadline time.Time, sleep func(ctx context.Context, d time.Duration) error) (waited bool, err error) {
	if err := ctx.Err(); err != nil {
		return false, err
	}
	if d, ok := ctx.Deadline(); ok {
		if dl := b.now().Add(time.Until(d)); deadline.IsZero() || dl.Before(deadline) {
			deadline = dl
		}
	}
	if p == Background {
		return false, b.takeBackground(ctx)
	}
	return b.takeForeground(ctx, deadline, sleep)
}

// takeBackground is Take for a refresh.
func (b *Budget) takeBackground(ctx context.Context) error {
	now := b.now()
	b.mu.Lock()
	l := b.effectiveLocked(now)
	if len(b.queue) > 0 || now.Before(b.closedUntil) {
		eta := b.etaLocked(len(b.queue), now, l)
		b.exhausted++
		b.mu.Unlock()
		return &ExhaustedError{Provider: b.name, RetryAfter: eta.Sub(now) + l.interval(), Priority: Background}
	}
	b.mu.Unlock()
	res, err := b.allow(ctx, l, Background)
	if err != nil {
		return err
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	if res.Allowed > 0 {
		b.used++
		return nil
	}
	b.exhausted++
	return &ExhaustedError{Provider: b.name, RetryAfter: res.RetryAfter, Priority: Background}
}

// reserve is how much of a burst background requests leave to callers.
func reserve(burst int) int {
	if burst <= 1 {
		return 0
	}
	return max(1, int(float64(burst)*reserveShare))
}

// spentBy is l as a request of priority p spends it: a Background request
// leaves callers the reserve of its burst.
func spentBy(l Limit, p Priority) Limit {
	if p == Background {
		l.Burst = max(1, l.Burst-reserve(l.Burst))
	}
	return l
}

// takeForeground is Take for a caller.
func (b *Budget) takeForeground(ctx context.Context, deadline time.Time, sleep func(ctx context.Context, d time.Duration) error) (waited bool, err error) {
	if sleep == nil {
		sleep = Sleep
	}
	start := b.now()
	w := make(chan struct{})
	b.mu.Lock()
	if ahead := len(b.queue); ahead > 0 || start.Before(b.closedUntil) {
		l := b.effectiveLocked(start)
		eta := b.etaLocked(ahead, start, l)
		if !deadline.IsZero() && eta.After(deadline) {
			b.exhausted++
			b.mu.Unlock()
			return false, &ExhaustedError{Provider: b.name, RetryAfter: max(eta.Sub(start), minRetryAfter)}
		}
	}
	b.queue = append(b.queue, w)
	if len(b.queue) == 1 {
		close(w)
	} else {
		waited = true
	}
	b.mu.Unlock()

	select {
	case <-w:
	case <-ctx.Done():
		b.leave(w, start, gaveUp)
		return waited, ctx.Err()
	}
	for {
		now := b.now()
		b.mu.Lock()
		l, closed := b.effectiveLocked(now), b.closedUntil
		b.mu.Unlock()
		var wait time.Duration
		if now.Before(closed) {
			wait = closed.Sub(now)
		} else {
			res, err := b.allow(ctx, l, Foreground)
			if err != nil {
				b.leave(w, start, gaveUp)
				return waited, err
			}
			if res.Allowed > 0 {
				b.leave(w, start, served)
				return waited, nil
			}
			wait = res.RetryAfter
		}
		eta := now.Add(wait)
		if !deadline.IsZero() && eta.After(deadline) {
			b.leave(w, start, refused)
			return waited, &ExhaustedError{Provider: b.name, RetryAfter: max(wait, minRetryAfter)}
		}
		b.mu.Lock()
		b.nextAt = eta
		b.mu.Unlock()
		waited = true
		if err := sleep(ctx, wait); err != nil {
			b.leave(w, start, gaveUp)
			return waited, err
		}
	}
}

// Outcomes of a caller leaving the queue.
const (
	gaveUp = iota // its context ended, or the store failed
	served
	refused
)

// leave takes w out of the queue, hands the head's turn on, and counts a
// served or refused caller.
func (b *Budget) leave(w chan struct{}, start time.Time, outcome int) {
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	for i, q := range b.queue {
		if q == w {
			b.queue = append(b.queue[:i], b.queue[i+1:]...)
			if i == 0 && len(b.queue) > 0 {
				close(b.queue[0])
			}
			break
		}
	}
	switch outcome {
	case served:
		b.used++
		b.waitTotal += max(0, now.Sub(start))
		b.nextAt = time.Time{}
	case refused:
		b.exhausted++
	}
}

// etaLocked is when a caller with ahead callers before it expects to be
// served under l.
func (b *Budget) etaLocked(ahead int, now time.Time, l Limit) time.Time {
	head := now
	for _, t := range []time.Time{b.nextAt, b.closedUntil} {
		if t.After(head) {
			head = t
		}
	}
	return head.Add(time.Duration(max(0, ahead-b.remaining)) * l.interval())
}

// effectiveLocked is the limit in force at now: the configured one, or the
// one a provider's headers lowered it to.
func (b *Budget) effectiveLocked(now time.Time) Limit {
	if now.Before(b.loweredUntil) {
		return b.lowered
	}
	return b.limit
}

// allow asks the store for one request of priority p under l; while the
// store fails, the in-process bucket answers under the fallback limit or
// this sidecar's share of l, whichever is lower. A store call ended by ctx
// returns ctx's error.
func (b *Budget) allow(ctx context.Context, l Limit, p Priority) (Result, error) {
	res, err := b.store.AllowN(ctx, b.name, spentBy(l, p), 1)
	if err != nil && ctx.Err() != nil {
		return Result{}, ctx.Err()
	}
	if err != nil {
		fl := b.fallbackLimit
		if share := l.Share(b.sharedBy); share.PerSecond() < fl.PerSecond() {
			fl = share
		}
		if res, err = b.fallback.AllowN(ctx, b.name, spentBy(fl, p), 1); err != nil {
			return Result{}, fmt.Errorf("token API budget of provider %q: %w", b.name, err)
		}
	}
	b.mu.Lock()
	b.remaining = res.Remaining
	b.mu.Unlock()
	return res, nil
}

// State is a budget's state, for metrics and the admin state.
type State struct {
	// Name is the provider.
	Name string
	// Rate is the configured rate, in requests per second.
	Rate float64
	// Burst is the configured burst.
	Burst int
	// Effective is the rate in force, in requests per second: lower while
	// the provider's headers say so, 0 while the budget is closed.
	Effective float64
	// LoweredUntil is when the lowering or closing ends; zero for none.
	LoweredUntil time.Time
	// Remaining is how many requests the bucket held at its last answer.
	Remaining int
	// Waiting is how many callers wait for their turn now.
	Waiting int
	// Used counts the requests served; Exhausted those refused.
	Used, Exhausted uint64
	// WaitTotal is how long the served callers waited in all.
	WaitTotal time.Duration
}

// State returns the budget's state. It makes no Store call.
func (b *Budget) State() State {
	now := b.now()
	b.mu.Lock()
	defer b.mu.Unlock()
	st := State{Name: b.name, Rate: b.limit.PerSecond(), Burst: b.limit.Burst, Effective: b.effectiveLocked(now).PerSecond(),
		Remaining: b.remaining, Waiting: len(b.queue), Used: b.used, Exhausted: b.exhausted, WaitTotal: b.waitTotal}
	if now.Before(b.loweredUntil) {
		st.LoweredUntil = b.loweredUntil
	}
	if now.Before(b.closedUntil) {
		st.Effective, st.LoweredUntil = 0, later(st.LoweredUntil, b.closedUntil)
	}
	return st
}

// later returns the later of a and b.
func later(a, b time.Time) time.Time {
	if a.After(b) {
		return a
	}
	return b
}
