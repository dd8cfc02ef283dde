package broker

import (
	"context"
	"errors"
	"fmt"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// planLog records what an Observer is told of refresh plans.
type planLog struct {
	nopObserver
	mu      sync.Mutex
	planned map[string]time.Time // merchant -> last plan
	behind  []time.Time          // expiries told
}

func newPlanLog() *planLog { return &planLog{planned: map[string]time.Time{}} }

func (o *planLog) Lookup(*Binding, Result) {}
func (o *planLog) Fetched(context.Context, *Binding, Token, time.Duration, bool, error) {
}
func (o *planLog) RefreshPlanned(b *Binding, at time.Time) {
	o.mu.Lock()
	o.planned[b.Merchant] = at
	o.mu.Unlock()
}
func (o *planLog) RefreshBehind(_ *Binding, expiry time.Time) {
	o.mu.Lock()
	o.behind = append(o.behind, expiry)
	o.mu.Unlock()
}

func (o *planLog) plannedFor(merchant string) time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.planned[merchant]
}

func (o *planLog) told() []time.Time {
	o.mu.Lock()
	defer o.mu.Unlock()
	return append([]time.Time(nil), o.behind...)
}

// callLog is a source that records the clock at each call.
type callLog struct {
	clock *fakeClock
	life  time.Duration
	mu    sync.Mutex
	at    []time.Time
}

func (s *callLog) Token(_ context.Context, req Request) (Token, error) {
	now := s.clock.Now()
	s.mu.Lock()
	s.at = append(s.at, now)
	n := len(s.at)
	s.mu.Unlock()
	return Token{Value: Secret(fmt.Sprintf("tok-%s-%d", req.Merchant, n)), Expiry: now.Add(s.life)}, nil
}

func (s *callLog) calls() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.at)
}

// maxPerSecond is the most calls in any window [t, t+1s).
func (s *callLog) maxPerSecond() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	most := 0
	for i, t := range s.at {
		n := 0
		for _, u := range s.at[i:] {
			if u.Sub(t) < time.Second {
				n++
			}
		}
		most = max(most, n)
	}
	return most
}

// bindings returns n bindings of one profile, of merchants m0, m1...
func bindings(p *Profile, n int) []*Binding {
	out := make([]*Binding, n)
	for i := range out {
		out[i] = NewBindingFor(p, fmt.Sprintf("m%d", i), fmt.Sprintf("org-%d", i))
	}
	return out
}

// TestColdBurstWithinBudget: K cold keys asked at once are served through
// the budget: the token API never sees more than the GCRA allows in any
// second of the fake clock (the rate, plus the burst above one), and every
// caller gets a token within its deadline.
func TestColdBurstWithinBudget(t *testing.T) {
	for _, tt := range []struct {
		name       string
		l          budget.Limit
		keys, most int
	}{
		{"5/s, no burst", budget.Limit{Rate: 5, Burst: 1, Period: time.Second}, 40, 5},
		{"5/s, burst 5", budget.Limit{Rate: 5, Burst: 5, Period: time.Second}, 40, 9},
		{"120/m, burst 2", budget.Limit{Rate: 120, Burst: 2, Period: time.Minute}, 30, 3},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &callLog{clock: clock, life: time.Hour}
			var bud *budget.Budget
			// A waiting caller's sleep moves the clock once every call
			// already let through has been made, so that each call is
			// logged at the time it was let through.
			sleep := func(_ context.Context, d time.Duration) error {
				waitUntil(t, func() bool { return src.calls() == int(bud.State().Used) })
				clock.Add(d)
				return nil
			}
			bud = budget.New("bank", tt.l, budget.NewLocal(clock.Now), clock.Now)
			br := New(Options{Sleep: sleep, Now: clock.Now, BudgetWait: time.Minute})
			defer br.Close()
			p := NewProfile("bank#1", src, []string{"a"}, "", 0)
			p.Budget = bud
			bs := bindings(p, tt.keys)
			var wg sync.WaitGroup
			errs := make([]error, len(bs))
			for i, b := range bs {
				wg.Add(1)
				go func() {
					defer wg.Done()
					e, _, err := br.Get(context.Background(), b)
					if err == nil && !e.validAt(clock.Now(), br.opts.Leeway) {
						err = errors.New("expired token")
					}
					errs[i] = err
				}()
			}
			wg.Wait()
			for i, err := range errs {
				if err != nil {
					t.Errorf("key %d: %v", i, err)
				}
			}
			if n := src.calls(); n != tt.keys {
				t.Errorf("%d calls, want %d", n, tt.keys)
			}
			if most := src.maxPerSecond(); most > tt.most {
				t.Errorf("%d calls in one second, want at most %d", most, tt.most)
			}
		})
	}
}

// TestExhaustedAnsweredAtOnce: a caller whose turn comes after its deadline
// is refused without a call, at once, with the budget's wait; the refusal
// is not remembered for the key.
func TestExhaustedAnsweredAtOnce(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: time.Hour}
	never := func(context.Context, time.Duration) error { t.Error("a caller waited"); return nil }
	bud := budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: time.Minute}, budget.NewLocal(clock.Now), clock.Now)
	br := New(Options{Sleep: never, Now: clock.Now, FetchTimeout: 30 * time.Second})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = bud
	bs := bindings(p, 3)
	if _, _, err := br.Get(context.Background(), bs[0]); err != nil {
		t.Fatal(err)
	}
	clock.Add(10 * time.Second)
	for _, b := range bs[1:] {
		_, _, err := br.Get(context.Background(), b)
		if !errors.Is(err, budget.ErrExhausted) || Called(err) || RetryAfterOf(err) != 50*time.Second {
			t.Fatalf("%s: %v (called %t, retry after %s), want exhausted, not called, retry after 50s", b.Merchant, err, Called(err), RetryAfterOf(err))
		}
		if bo, ok := BackoffOf(err); !ok || !bo.Budget() || bo.Source() || bo == (Backoff{SourceID: "bank#1"}) {
			t.Errorf("%s: the refusal names %+v, want the budget's backoff, apart from the source's", b.Merchant, bo)
		}
	}
	if n := src.calls(); n != 1 {
		t.Errorf("%d calls, want 1", n)
	}
	clock.Add(50 * time.Second)
	if _, _, err := br.Get(context.Background(), bs[1]); err != nil {
		t.Fatalf("once the budget has room: %v", err)
	}
}

// TestTokensMintedTogetherRefreshSpread: tokens minted together for callers
// get refresh points spread over their refresh window; with a budget, no
// second holds more planned refreshes than its background share.
func TestTokensMintedTogetherRefreshSpread(t *testing.T) {
	const keys = 400
	life := 100 * time.Second
	for _, withBudget := range []bool{false, true} {
		t.Run(fmt.Sprintf("budget %t", withBudget), func(t *testing.T) {
			clock := newFakeClock()
			src := &callLog{clock: clock, life: life}
			obs := newPlanLog()
			br := New(Options{Now: clock.Now})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			if withBudget {
				// 27/s: 20 refreshes planned per second at most
				// (BackgroundShare), 400 at random over 22.5 s would
				// put more in some seconds. A burst of 400 mints them
				// together.
				p.Budget = budget.New("bank", budget.Limit{Rate: 27, Burst: keys, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
			}
			start, end := clock.Now().Add(75*time.Second), clock.Now().Add(life-2500*time.Millisecond)
			perBucket := map[int]int{} // 2.5 s buckets of the window
			perSecond := map[int64]int{}
			for _, b := range bindings(p, keys) {
				b.Observer = obs
				e, _, err := br.Get(context.Background(), b)
				if err != nil {
					t.Fatal(err)
				}
				at := e.RefreshAt()
				if at.Before(start) || !at.Before(end) {
					t.Fatalf("%s: refresh planned at +%s, want in [+75s, +97.5s)", b.Merchant, at.Sub(clock.Now()))
				}
				if got := e.Token().RefreshAt; !got.Equal(at) || !obs.plannedFor(b.Merchant).Equal(at) {
					t.Fatalf("%s: Token().RefreshAt %v, observer told %v, want %v", b.Merchant, got, obs.plannedFor(b.Merchant), at)
				}
				perBucket[int(at.Sub(start)/(2500*time.Millisecond))]++
				perSecond[at.Unix()]++
			}
			// 9 buckets of 44 on average: each holds at least a few.
			for i := range 9 {
				if perBucket[i] < 15 {
					t.Errorf("bucket %d of the window holds %d of %d refreshes: not spread (%v)", i, perBucket[i], keys, perBucket)
				}
			}
			if withBudget {
				// Refreshes with no room left before their point go to
				// the window's start.
				for s, n := range perSecond {
					if n > 20 && s != start.Unix() {
						t.Errorf("second %d holds %d planned refreshes, want at most 20", s, n)
					}
				}
			}
		})
	}
}

// TestRefreshMintedPlannedLate: a token minted by a refresh-ahead is
// planned at its expiry less late (max(life/40, Leeway+1s)), a second
// earlier when the budget's plan for that second is full.
func TestRefreshMintedPlannedLate(t *testing.T) {
	for _, tt := range []struct {
		name string
		life time.Duration
		late time.Duration
		busy bool
	}{
		{"100s: life/40", 100 * time.Second, 2500 * time.Millisecond, false},
		{"40s: Leeway+1s", 40 * time.Second, 2 * time.Second, false},
		{"1h: life/40", time.Hour, 90 * time.Second, false},
		{"100s, the late second busy", 100 * time.Second, 3500 * time.Millisecond, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &callLog{clock: clock, life: tt.life}
			obs := newPlanLog()
			br := New(Options{Now: clock.Now})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			p.Budget = budget.New("bank", budget.Limit{Rate: 4, Burst: 4, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
			b := NewBindingFor(p, "acme", "org")
			b.Observer = obs
			e, _, err := br.Get(context.Background(), b)
			if err != nil {
				t.Fatal(err)
			}
			clock.Add(e.RefreshAt().Sub(clock.Now()))
			expiry := clock.Now().Add(tt.life) // of the refreshed token
			if tt.busy {
				for range 3 { // the background share of 4/s
					p.Budget.Plan(expiry.Add(-tt.life), expiry.Add(-2500*time.Millisecond))
				}
			}
			if _, r, err := br.Get(context.Background(), b); err != nil || r != RefreshAhead {
				t.Fatalf("at the planned point: %s %v, want a refresh", r, err)
			}
			settle(t, br, b)
			e, _, _ = br.Get(context.Background(), b)
			if e.Token().Value.Reveal() != "tok-acme-2" {
				t.Fatalf("token %s, want the refreshed one", e.Token().Value.Reveal())
			}
			if want := expiry.Add(-tt.late); !e.RefreshAt().Equal(want) || !e.Token().RefreshAt.Equal(want) || !obs.plannedFor("acme").Equal(want) {
				t.Errorf("refresh planned %s before expiry, want %s", expiry.Sub(e.RefreshAt()), tt.late)
			}
		})
	}
}

// TestMintsPerKeyPerLifetime: under steady lookups, each key is minted
// about once per lifetime (planned late after the first refresh), and no
// lookup gets an expired token.
func TestMintsPerKeyPerLifetime(t *testing.T) {
	const keys, lifetimes = 20, 10
	life := 60 * time.Second
	clock := newFakeClock()
	src := &callLog{clock: clock, life: life}
	br := New(Options{Now: clock.Now})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 20, Burst: 20, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
	bs := bindings(p, keys)
	steady := clock.Now().Add(life) // after the first, random, refresh
	var before int
	for clock.Now().Before(steady.Add(lifetimes * life)) {
		if before == 0 && !clock.Now().Before(steady) {
			before = src.calls()
		}
		for _, b := range bs {
			e, _, err := br.Get(context.Background(), b)
			if err != nil || !e.validAt(clock.Now(), br.opts.Leeway) {
				t.Fatalf("%s at +%s: %v, want a valid token", b.Merchant, clock.Now().Sub(steady), err)
			}
			settle(t, br, b)
		}
		clock.Add(500 * time.Millisecond)
	}
	perLifetime := float64(src.calls()-before) / (keys * lifetimes)
	t.Logf("%.3f mints per key per lifetime", perLifetime)
	if perLifetime > 1.05 || perLifetime < 1 {
		t.Errorf("%.3f mints per key per lifetime, want 1 to 1.05", perLifetime)
	}
}

// atPlannedRefresh caches a token (life 100 s) of a binding of provider
// "bank", whose budget allows one request per period, on a broker
// observed by a planLog, and moves the clock to the token's planned
// refresh.
func atPlannedRefresh(t *testing.T, period time.Duration) (*fakeClock, *callLog, *planLog, *Broker, *Profile, *Binding, *Entry) {
	t.Helper()
	clock := newFakeClock()
	src := &callLog{clock: clock, life: 100 * time.Second}
	obs := newPlanLog()
	br := New(Options{Now: clock.Now})
	t.Cleanup(br.Close)
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: period}, budget.NewLocal(clock.Now), clock.Now)
	b := NewBindingFor(p, "acme", "org")
	b.Observer = obs
	e, _, err := br.Get(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	clock.Add(e.RefreshAt().Sub(clock.Now()))
	return clock, src, obs, br, p, b, e
}

// TestRefreshBehind: a refresh-ahead the budget cannot serve before the
// token's end is deferred (tried again at a later lookup, not after the
// failure backoff), told once to the Observer (RefreshBehind) before any caller could
// see an expired token, and callers never get one: past Leeway they wait
// for a token like a cold key.
func TestRefreshBehind(t *testing.T) {
	clock, src, obs, br, p, b, e := atPlannedRefresh(t, 10*time.Minute)
	expiry := e.Token().Expiry
	refused, tries := p.Budget.State().Exhausted, uint64(0)
	for ; clock.Now().Add(br.opts.Leeway).Before(expiry); clock.Add(2 * time.Second) { // longer than the defer (at most 1.5 s)
		got, _, err := br.Get(context.Background(), b)
		settle(t, br, b)
		tries++
		if err != nil || got != e {
			t.Fatalf("at -%s: %v, want the cached token", expiry.Sub(clock.Now()), err)
		}
		if told := obs.told(); len(told) != 1 || !told[0].Equal(expiry) {
			t.Fatalf("at -%s: RefreshBehind told %v, want once for %v", expiry.Sub(clock.Now()), told, expiry)
		}
	}
	// Past Leeway the token is not served: the caller asks as for a cold
	// key, and the budget refuses at once.
	clock.Add(expiry.Add(-br.opts.Leeway / 2).Sub(clock.Now()))
	if got, _, err := br.Get(context.Background(), b); !errors.Is(err, budget.ErrExhausted) || got != nil {
		t.Fatalf("past Leeway: %v, want the budget's refusal and no token", err)
	}
	// Each lookup while the token was served tried the refresh again.
	if n := p.Budget.State().Exhausted - refused; n != tries+1 {
		t.Errorf("the budget refused %d requests, want one per lookup (%d)", n, tries+1)
	}
	if n := src.calls(); n != 1 {
		t.Errorf("%d calls, want 1", n)
	}
}

// awaitWaiting waits until n lookups or checks wait for the fetch of key
// (waitFor), then yields a while so that each reaches the fetch in flight
// (the count comes just before it joins).
func awaitWaiting(t *testing.T, br *Broker, key string, n int) {
	t.Helper()
	waitUntil(t, func() bool {
		br.mu.Lock()
		defer br.mu.Unlock()
		return br.waiting[key] == n
	})
	for range 100 {
		runtime.Gosched()
	}
}

// waitUntil polls cond (goroutines reaching a point), failing after 10s.
func waitUntil(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Error("condition not reached in 10s")
			return
		}
		time.Sleep(100 * time.Microsecond)
	}
}

// TestCallerBeforeRefresh: while a caller of one key waits for budget, a
// refresh-ahead of another key of the provider gets none and calls
// nothing; the caller is served first.
func TestCallerBeforeRefresh(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: 100 * time.Second}
	asleep, release := make(chan time.Duration, 1), make(chan struct{})
	sleep := func(ctx context.Context, d time.Duration) error {
		asleep <- d
		select {
		case <-release:
			clock.Add(d)
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	br := New(Options{Sleep: sleep, Now: clock.Now, BudgetWait: 30 * time.Second})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: 100 * time.Second}, budget.NewLocal(clock.Now), clock.Now)
	bs := bindings(p, 2)
	warm, cold := bs[0], bs[1]
	e, _, err := br.Get(context.Background(), warm)
	if err != nil {
		t.Fatal(err)
	}
	clock.Add(e.RefreshAt().Sub(clock.Now()))
	served := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), cold)
		served <- err
	}()
	<-asleep // the caller waits its turn, at most 25 s
	if _, r, err := br.Get(context.Background(), warm); err != nil || r != RefreshAhead {
		t.Fatalf("warm key: %s %v, want the cached token and a refresh", r, err)
	}
	settle(t, br, warm)
	if n := src.calls(); n != 1 {
		t.Fatalf("%d calls while the caller waits, want 1 (the refresh got no budget)", n)
	}
	close(release)
	if err := <-served; err != nil {
		t.Fatalf("cold key: %v", err)
	}
	if n := src.calls(); n != 2 {
		t.Fatalf("%d calls, want 2", n)
	}
}

// boundedSource is a callLog whose calls are bounded (CallBounded) and
// fail with errs[i] at call i+1 (nil: a token).
type boundedSource struct {
	callLog
	bound time.Duration
	errs  []error
}

func (s *boundedSource) CallTimeout() time.Duration { return s.bound }

func (s *boundedSource) Token(ctx context.Context, req Request) (Token, error) {
	tok, err := s.callLog.Token(ctx, req)
	if n := s.calls(); n <= len(s.errs) && s.errs[n-1] != nil {
		return Token{}, s.errs[n-1]
	}
	return tok, err
}

// TestBudgetWaitBounds: a caller queues for budget only as long as
// BudgetWait allows and as leaves the token API call its bound before the
// fetch's deadline; beyond either it is refused at once with the queue's
// wait, without a call.
func TestBudgetWaitBounds(t *testing.T) {
	for _, tt := range []struct {
		name       string
		period     time.Duration // between two requests of the budget
		budgetWait time.Duration
		bound      time.Duration // the source's call timeout
		served     bool
	}{
		{"within BudgetWait", 4 * time.Second, 0, 10 * time.Second, true},
		{"beyond the default BudgetWait", 10 * time.Second, 0, 10 * time.Second, false},
		{"a longer BudgetWait", 10 * time.Second, 15 * time.Second, 10 * time.Second, true},
		{"leaves the call its bound", 25 * time.Second, time.Minute, 10 * time.Second, false},
		{"the bound fits", 19 * time.Second, time.Minute, 10 * time.Second, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, bound: tt.bound}
			slept := time.Duration(0)
			sleep := func(_ context.Context, d time.Duration) error {
				slept += d
				clock.Add(d)
				return nil
			}
			br := New(Options{Sleep: sleep, Now: clock.Now, FetchTimeout: 30 * time.Second, BudgetWait: tt.budgetWait})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: tt.period}, budget.NewLocal(clock.Now), clock.Now)
			bs := bindings(p, 2)
			if _, _, err := br.Get(context.Background(), bs[0]); err != nil {
				t.Fatal(err)
			}
			_, _, err := br.Get(context.Background(), bs[1])
			if tt.served {
				if err != nil || src.calls() != 2 || slept != tt.period {
					t.Fatalf("%v, %d calls after %s asleep; want a token after %s", err, src.calls(), slept, tt.period)
				}
				return
			}
			if !errors.Is(err, budget.ErrExhausted) || Called(err) || RetryAfterOf(err) != tt.period || slept != 0 {
				t.Fatalf("%v (called %t, retry after %s, asleep %s), want exhausted at once, retry after %s", err, Called(err), RetryAfterOf(err), slept, tt.period)
			}
			if n := src.calls(); n != 1 {
				t.Errorf("%d calls, want 1", n)
			}
		})
	}
}

// TestDeadlineAfterBudgetWait: a call that runs out of time after its
// caller waited for budget counts neither against the source's breaker
// nor in the key's failure memory; the same error without a wait does.
func TestDeadlineAfterBudgetWait(t *testing.T) {
	for _, tt := range []struct {
		name   string
		period time.Duration // between two requests of the budget
		held   bool
	}{
		{"after a wait", 2 * time.Second, false},
		{"without a wait", time.Millisecond, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			timeout := fmt.Errorf("token API: %w", context.DeadlineExceeded)
			src := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, errs: []error{nil, timeout}}
			sleep := func(_ context.Context, d time.Duration) error {
				clock.Add(d)
				return nil
			}
			br := New(Options{Sleep: sleep, Now: clock.Now, MaxAttempts: 1, BreakerThreshold: 1})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: tt.period}, budget.NewLocal(clock.Now), clock.Now)
			bs := bindings(p, 2)
			if _, _, err := br.Get(context.Background(), bs[0]); err != nil {
				t.Fatal(err)
			}
			clock.Add(time.Second)
			if _, _, err := br.Get(context.Background(), bs[1]); !errors.Is(err, context.DeadlineExceeded) {
				t.Fatalf("%v, want the call's deadline error", err)
			}
			remembered := 0
			br.Backoffs(func(*Binding, error, time.Time, time.Time) { remembered++ })
			if st := br.SourceHealth("bank#1").Breaker; (st == BreakerOpen) != tt.held || (remembered == 1) != tt.held {
				t.Errorf("breaker %v, %d keys remembered; want held against the provider: %t", st, remembered, tt.held)
			}
		})
	}
}

// TestRateLimitedHoldsBudget: a 429 with Retry-After from a provider with a
// budget closes the budget until then (other keys are refused with its
// wait, without a call) and is remembered neither for the source nor for
// the key; without a budget, the source backs off.
func TestRateLimitedHoldsBudget(t *testing.T) {
	for _, withBudget := range []bool{true, false} {
		t.Run(fmt.Sprintf("budget %t", withBudget), func(t *testing.T) {
			clock := newFakeClock()
			limited := &APIError{Provider: "bank", StatusCode: 429, RetryAfter: 30 * time.Second}
			src := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, errs: []error{limited}}
			br := New(Options{Now: clock.Now, MaxAttempts: 1})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			var bud *budget.Budget
			if withBudget {
				bud = budget.New("bank", budget.Limit{Rate: 10, Burst: 10, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
				p.Budget = bud
			}
			bs := bindings(p, 2)
			if _, _, err := br.Get(context.Background(), bs[0]); !errors.Is(err, limited) {
				t.Fatalf("%v, want the 429", err)
			}
			until := br.SourceHealth("bank#1").BackoffUntil
			remembered := 0
			br.Backoffs(func(*Binding, error, time.Time, time.Time) { remembered++ })
			_, _, err := br.Get(context.Background(), bs[1])
			if !withBudget {
				if !until.Equal(clock.Now().Add(30*time.Second)) || remembered != 1 || Called(err) {
					t.Fatalf("source backoff until %v, %d keys remembered, other key: %v; want the source held 30s", until, remembered, err)
				}
				return
			}
			if !until.IsZero() || remembered != 0 {
				t.Errorf("source backoff until %v, %d keys remembered; want neither", until, remembered)
			}
			if st := bud.State(); !st.LoweredUntil.Equal(clock.Now().Add(30*time.Second)) || st.Effective != 0 {
				t.Errorf("budget %+v, want closed for 30s", st)
			}
			if !errors.Is(err, budget.ErrExhausted) || Called(err) || RetryAfterOf(err) != 30*time.Second {
				t.Fatalf("other key: %v (called %t, retry after %s), want exhausted for 30s", err, Called(err), RetryAfterOf(err))
			}
			clock.Add(30 * time.Second)
			if _, _, err := br.Get(context.Background(), bs[1]); err != nil || src.calls() != 2 {
				t.Fatalf("once the budget opened: %v after %d calls", err, src.calls())
			}
		})
	}
}

// TestBareRateLimitHoldsSharedBudget: a 429 without Retry-After from a
// provider whose budget two brokers (two sidecars) share through one
// Store holds the budget as long as the source backoff it starts
// (FailureTTL, doubled at the next consecutive one): the other broker
// makes no call while it lasts, and is refused with its wait.
func TestBareRateLimitHoldsSharedBudget(t *testing.T) {
	clock := newFakeClock()
	store := budget.NewLocal(clock.Now)
	limit := budget.Limit{Rate: 10, Burst: 10, Period: time.Second}
	sidecar := func(src Source) (*Broker, *Binding) {
		br := New(Options{Now: clock.Now, MaxAttempts: 1, BudgetWait: time.Millisecond})
		t.Cleanup(br.Close)
		p := NewProfile("bank#1", src, nil, "", 0)
		p.Budget = budget.New("bank", limit, store, clock.Now)
		return br, NewBindingFor(p, "m0", "org-0")
	}
	limited := &APIError{Provider: "bank", StatusCode: 429}
	srcA := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, errs: []error{limited, limited}}
	srcB := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}}
	brA, bA := sidecar(srcA)
	brB, bB := sidecar(srcB)
	for i, hold := range []time.Duration{DefaultFailureTTL, 2 * DefaultFailureTTL} {
		if _, _, err := brA.Get(context.Background(), bA); !errors.Is(err, limited) || srcA.calls() != i+1 {
			t.Fatalf("429 %d: %v after %d calls, want the 429 after %d", i+1, err, srcA.calls(), i+1)
		}
		_, _, err := brB.Get(context.Background(), bB)
		if !errors.Is(err, budget.ErrExhausted) || Called(err) || RetryAfterOf(err) != hold || srcB.calls() != 0 {
			t.Fatalf("429 %d: the other sidecar got %v (retry after %s) after %d calls, want exhausted for %s without a call",
				i+1, err, RetryAfterOf(err), srcB.calls(), hold)
		}
		clock.Add(hold)
	}
	if _, _, err := brB.Get(context.Background(), bB); err != nil || srcB.calls() != 1 {
		t.Fatalf("once the hold ended: %v after %d calls, want a token after one", err, srcB.calls())
	}
}

// closingSource is a callLog whose every call, while it is out, sees its
// budget closed for closeFor (another key's 429 with Retry-After, the
// provider's rate-limit headers read by the budget's Transport), then
// fails with err.
type closingSource struct {
	callLog
	budget   *budget.Budget
	closeFor time.Duration
	err      error
}

func (s *closingSource) Token(ctx context.Context, req Request) (Token, error) {
	_, _ = s.callLog.Token(ctx, req)
	s.budget.Hold(s.clock.Now(), s.closeFor)(ctx)
	return Token{}, s.err
}

// TestRefusedRetryAfterIsBudgetsWhenLonger: a 429 without a usable
// Retry-After holds the source for FailureTTL, but its budget, closed
// meanwhile for a minute, serves no token request before then: the
// caller that got the 429, and the callers of other keys refused by the
// source's hold, are told the budget's wait (what is left of the
// minute), not the shorter hold; once the hold ends, the budget refuses
// with the same wait, without a call.
func TestRefusedRetryAfterIsBudgetsWhenLonger(t *testing.T) {
	clock := newFakeClock()
	bud := budget.New("bank", budget.Limit{Rate: 10, Burst: 10, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
	src := &closingSource{callLog: callLog{clock: clock, life: time.Hour}, budget: bud, closeFor: time.Minute,
		err: &APIError{Provider: "bank", StatusCode: 429}}
	br := New(Options{Now: clock.Now, MaxAttempts: 1, BudgetWait: time.Millisecond})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = bud
	bs := bindings(p, 3)
	start := clock.Now()
	_, _, err := br.Get(context.Background(), bs[0])
	if !Called(err) || RetryAfterOf(err) != time.Minute {
		t.Fatalf("the 429's caller: %v (called %t), retry after %s; want the budget's minute", err, Called(err), RetryAfterOf(err))
	}
	if until := br.SourceHealth("bank#1").BackoffUntil; !until.Equal(start.Add(DefaultFailureTTL)) {
		t.Fatalf("source held until %v, want FailureTTL (%s)", until, DefaultFailureTTL)
	}
	for i, step := range []struct {
		after    time.Duration // since the 429
		byBudget bool
	}{{time.Second, false}, {DefaultFailureTTL, true}} {
		clock.Add(start.Add(step.after).Sub(clock.Now()))
		_, _, err := br.Get(context.Background(), bs[i+1])
		bo, _ := BackoffOf(err)
		if Called(err) || bo.Budget() != step.byBudget || RetryAfterOf(err) != time.Minute-step.after {
			t.Fatalf("%s after the 429: %v (called %t, budget's refusal %t), retry after %s; want %s without a call",
				step.after, err, Called(err), bo.Budget(), RetryAfterOf(err), time.Minute-step.after)
		}
	}
	if src.calls() != 1 {
		t.Fatalf("%d calls, want 1", src.calls())
	}
}

// TestRateLimitedToldBudgetsHold: a 429 whose Retry-After closes the
// provider's budget tells its caller the budget's closing, the time until
// a token request may be made: the Retry-After, or MaxHold when the
// provider asks for longer (the budget's cap), as the next callers are
// told. The 429's caller is answered the provider's refusal, not a
// backoff's (BackoffOf reports none, so its refusal is logged on its own,
// apart from the budget's refusals of the next callers).
func TestRateLimitedToldBudgetsHold(t *testing.T) {
	for _, tc := range []struct {
		retryAfter, want time.Duration
	}{
		{30 * time.Second, 30 * time.Second},
		{time.Hour, budget.MaxHold},
	} {
		t.Run(tc.retryAfter.String(), func(t *testing.T) {
			clock := newFakeClock()
			limited := &APIError{Provider: "bank", StatusCode: 429, RetryAfter: tc.retryAfter}
			src := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, errs: []error{limited}}
			br := New(Options{Now: clock.Now, MaxAttempts: 1, BudgetWait: time.Millisecond})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			p.Budget = budget.New("bank", budget.Limit{Rate: 10, Burst: 10, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
			bs := bindings(p, 2)
			_, _, err := br.Get(context.Background(), bs[0])
			if !errors.Is(err, limited) || !Called(err) || RetryAfterOf(err) != tc.want {
				t.Fatalf("the 429's caller: %v (called %t), retry after %s; want the 429, retry after %s", err, Called(err), RetryAfterOf(err), tc.want)
			}
			if bo, ok := BackoffOf(err); ok {
				t.Fatalf("the 429's caller: a backoff of %s (budget's refusal %t), want none", bo.SourceID, bo.Budget())
			}
			clock.Add(time.Second)
			_, _, err = br.Get(context.Background(), bs[1])
			if !errors.Is(err, budget.ErrExhausted) || RetryAfterOf(err) != tc.want-time.Second {
				t.Fatalf("the next caller: %v, retry after %s; want exhausted, retry after %s", err, RetryAfterOf(err), tc.want-time.Second)
			}
		})
	}
}

// TestProbeDoesNotQueue: the half-open breaker's probe is not held in the
// budget's queue: without room at once it is refused by the budget and the
// probe released undecided, so that once the budget has room the next
// probe goes at once, not a Cooldown after the refused one.
func TestProbeDoesNotQueue(t *testing.T) {
	clock := newFakeClock()
	down := &APIError{Provider: "bank", StatusCode: 503}
	src := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, errs: []error{down}}
	never := func(_ context.Context, d time.Duration) error {
		t.Error("the probe waited for budget")
		clock.Add(d)
		return nil
	}
	br := New(Options{Sleep: never, Now: clock.Now, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: 10 * time.Second, FailureTTL: -1, BudgetWait: time.Minute})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: 15 * time.Second}, budget.NewLocal(clock.Now), clock.Now)
	bs := bindings(p, 2)
	if _, _, err := br.Get(context.Background(), bs[0]); !errors.Is(err, down) || br.SourceHealth("bank#1").Breaker != BreakerOpen {
		t.Fatalf("%v, breaker %v; want the failure and the breaker open", err, br.SourceHealth("bank#1").Breaker)
	}
	clock.Add(10 * time.Second)
	if _, _, err := br.Get(context.Background(), bs[1]); !errors.Is(err, budget.ErrExhausted) || RetryAfterOf(err) != 5*time.Second {
		t.Fatalf("probe without budget: %v (retry after %s), want exhausted for 5s", err, RetryAfterOf(err))
	}
	// The budget has room 5 s later, before a probe still held would let
	// the breaker try again (a Cooldown after it was let through).
	clock.Add(5 * time.Second)
	if _, _, err := br.Get(context.Background(), bs[1]); err != nil || br.SourceHealth("bank#1").Breaker != BreakerClosed || src.calls() != 2 {
		t.Fatalf("probe with budget: %v, breaker %v, %d calls; want a token and the breaker closed", err, br.SourceHealth("bank#1").Breaker, src.calls())
	}
}

// TestBreakerOpenedDuringBudgetWait: a caller that waited for budget while
// another call opened the breaker is refused by the breaker, without a
// call.
func TestBreakerOpenedDuringBudgetWait(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: time.Hour}
	gate := make(chan struct{})
	down := &APIError{Provider: "bank", StatusCode: 503}
	src.set(gate, down)
	asleep, release := make(chan struct{}), make(chan struct{})
	sleep := func(ctx context.Context, d time.Duration) error {
		close(asleep)
		<-release
		clock.Add(d)
		return nil
	}
	br := New(Options{Sleep: sleep, Now: clock.Now, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: time.Minute, BudgetWait: time.Minute})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: 10 * time.Second}, budget.NewLocal(clock.Now), clock.Now)
	bs := bindings(p, 2)
	failed := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), bs[0])
		failed <- err
	}()
	waitUntil(t, func() bool { return src.calls.Load() == 1 })
	waited := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), bs[1])
		waited <- err
	}()
	<-asleep
	close(gate)
	if err := <-failed; !errors.Is(err, down) || br.SourceHealth("bank#1").Breaker != BreakerOpen {
		t.Fatalf("%v, breaker %v; want the failure and the breaker open", err, br.SourceHealth("bank#1").Breaker)
	}
	close(release)
	var ue *UnavailableError
	if err := <-waited; !errors.As(err, &ue) || Called(err) {
		t.Fatalf("after the wait: %v (called %t), want the open breaker's refusal", err, Called(err))
	}
	if n := src.calls.Load(); n != 1 {
		t.Errorf("%d calls, want 1", n)
	}
}

// gatedStore is a budget's in-process store whose next AllowN, once
// armed, says so on entered and goes on when release is closed: the
// caller asking it stays at the head of the budget's queue meanwhile.
// With refuse, that AllowN then refuses the request (the bucket was spent
// meanwhile).
type gatedStore struct {
	budget.Store
	armed            atomic.Bool
	refuse           bool
	entered, release chan struct{}
}

func (s *gatedStore) AllowN(ctx context.Context, key string, l budget.Limit, n int) (budget.Result, error) {
	if s.armed.CompareAndSwap(true, false) {
		close(s.entered)
		<-s.release
		if s.refuse {
			return budget.Result{RetryAfter: 100 * time.Millisecond}, nil
		}
	}
	return s.Store.AllowN(ctx, key, l, n)
}

// TestProbeQueuedBehindCallerGoesOut: the half-open breaker's probe that
// queued for a budget it shares with another source (behind that
// source's caller, served at once) is not refused by its own probe when
// its turn comes: it calls the token API, and its answer closes the
// breaker.
func TestProbeQueuedBehindCallerGoesOut(t *testing.T) {
	clock := newFakeClock()
	down := &APIError{Provider: "bank", StatusCode: 503}
	probed := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, errs: []error{down}}
	other := &callLog{clock: clock, life: time.Hour}
	never := func(context.Context, time.Duration) error {
		t.Error("a caller waited on the clock for budget")
		return errors.New("waited")
	}
	br := New(Options{Sleep: never, Now: clock.Now, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: 10 * time.Second, FailureTTL: -1, BudgetWait: time.Minute})
	defer br.Close()
	store := &gatedStore{Store: budget.NewLocal(clock.Now), entered: make(chan struct{}), release: make(chan struct{})}
	shared := budget.New("bank", budget.Limit{Rate: 10, Burst: 10, Period: time.Second}, store, clock.Now)
	p := NewProfile("bank#1", probed, nil, "", 0)
	q := NewProfile("bank#2", other, nil, "", 0)
	p.Budget, q.Budget = shared, shared
	bs, cs := bindings(p, 2), bindings(q, 1)
	if _, _, err := br.Get(context.Background(), bs[0]); !errors.Is(err, down) || br.SourceHealth("bank#1").Breaker != BreakerOpen {
		t.Fatalf("%v, breaker %v; want the failure and the breaker open", err, br.SourceHealth("bank#1").Breaker)
	}
	clock.Add(10 * time.Second)
	store.armed.Store(true)
	ahead := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), cs[0])
		ahead <- err
	}()
	<-store.entered // the other source's caller is at the head of the queue
	probe := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), bs[1])
		probe <- err
	}()
	waitUntil(t, func() bool { return shared.State().Waiting == 2 }) // the probe queued behind it
	close(store.release)
	if err := <-ahead; err != nil {
		t.Fatalf("the caller ahead: %v, want a token", err)
	}
	err := <-probe
	if h := br.SourceHealth("bank#1"); err != nil || h.Breaker != BreakerClosed || probed.calls() != 2 {
		t.Fatalf("the probe: %v after %d calls, breaker %v; want a token and the breaker closed", err, probed.calls(), h.Breaker)
	}
}

// TestRefreshBehindSparseLookups: a refresh the budget deferred with room
// before the token's end is not reported; when no lookup comes until the
// token is past expiry less Leeway, the first lookup then reports it, once.
func TestRefreshBehindSparseLookups(t *testing.T) {
	clock, src, obs, br, p, b, e := atPlannedRefresh(t, 500*time.Millisecond)
	if _, err := p.Budget.Take(context.Background(), budget.Foreground, time.Time{}, nil); err != nil {
		t.Fatal(err) // another key's caller spends the budget
	}
	if _, r, err := br.Get(context.Background(), b); err != nil || r != RefreshAhead {
		t.Fatalf("%s %v, want the cached token and a refresh", r, err)
	}
	settle(t, br, b)
	if told := obs.told(); len(told) != 0 || src.calls() != 1 {
		t.Fatalf("RefreshBehind told %v after %d calls, want nothing yet (the budget has room before the end)", told, src.calls())
	}
	clock.Add(e.Token().Expiry.Add(-br.opts.Leeway / 2).Sub(clock.Now()))
	for range 2 {
		if _, _, err := br.Get(context.Background(), b); err != nil {
			t.Fatal(err)
		}
	}
	if told := obs.told(); len(told) != 1 || !told[0].Equal(e.Token().Expiry) {
		t.Errorf("RefreshBehind told %v, want once for %v", told, e.Token().Expiry)
	}
}

// TestAdoptedRefreshAtClamped: a refresh time planned elsewhere (an
// adopted token) is kept within the token's refresh window and before its
// expiry less Leeway and a second.
func TestAdoptedRefreshAtClamped(t *testing.T) {
	clock := newFakeClock()
	br := New(Options{Now: clock.Now})
	defer br.Close()
	p := NewProfile("bank#1", &callLog{clock: clock, life: time.Hour}, nil, "", 0)
	b := NewBindingFor(p, "acme", "org")
	now := clock.Now()
	expiry := now.Add(100 * time.Second)
	for _, tt := range []struct {
		name            string
		refreshAt, want time.Time
	}{
		{"in the window", now.Add(90 * time.Second), now.Add(90 * time.Second)},
		{"before the window", now.Add(time.Second), now.Add(75 * time.Second)},
		{"past expiry less Leeway", expiry.Add(-time.Second / 2), expiry.Add(-2 * time.Second)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tok := Token{Value: "tok", IssuedAt: now, Expiry: expiry, RefreshAt: tt.refreshAt}
			if got := br.newEntry(b, tok, OriginShared).RefreshAt(); !got.Equal(tt.want) {
				t.Errorf("RefreshAt %v, want %v", got, tt.want)
			}
		})
	}
}

// TestRefreshPlannedOnlyForMinted: the Observer is told of the planned
// refresh of a token the broker minted, not of one it adopted from the
// shared tier (planned where it was minted).
func TestRefreshPlannedOnlyForMinted(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: time.Hour}
	shared := newMemShared()
	minter, adopter := newPlanLog(), newPlanLog()
	p := NewProfile("bank#1", src, nil, "", 0)
	for _, obs := range []*planLog{minter, adopter} {
		br := New(Options{Now: clock.Now, Shared: shared})
		defer br.Close()
		b := NewBindingFor(p, "acme", "org")
		b.Observer = obs
		if _, _, err := br.Get(context.Background(), b); err != nil {
			t.Fatal(err)
		}
	}
	if src.calls() != 1 || shared.adopted != 1 {
		t.Fatalf("%d calls, %d adopted; want one mint and one adoption", src.calls(), shared.adopted)
	}
	if minter.plannedFor("acme").IsZero() || !adopter.plannedFor("acme").IsZero() {
		t.Errorf("planned: minter %v, adopter %v; want the minter's plan only", minter.plannedFor("acme"), adopter.plannedFor("acme"))
	}
}

// spentBudget returns a broker on clock waiting in sleep, and two
// bindings of src whose provider's budget (one request per 10 s) the
// first one's token has spent.
func spentBudget(t *testing.T, clock *fakeClock, src Source, sleep func(context.Context, time.Duration) error) (*Broker, *Profile, []*Binding) {
	t.Helper()
	br := New(Options{Sleep: sleep, Now: clock.Now, BudgetWait: time.Minute})
	t.Cleanup(br.Close)
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: 10 * time.Second}, budget.NewLocal(clock.Now), clock.Now)
	bs := bindings(p, 2)
	if _, _, err := br.Get(context.Background(), bs[0]); err != nil {
		t.Fatal(err)
	}
	return br, p, bs
}

// lookupLeaves starts a lookup of b, cancels it once ready has a value
// (its fetch is under way) and checks that it returned the cancellation.
func lookupLeaves(t *testing.T, br *Broker, b *Binding, ready <-chan struct{}) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	gone := make(chan error, 1)
	go func() {
		_, _, err := br.Get(ctx, b)
		gone <- err
	}()
	<-ready
	cancel()
	if err := <-gone; !errors.Is(err, context.Canceled) {
		t.Fatalf("%v, want the caller's cancellation", err)
	}
}

// TestFetchLeavesQueueWhenCallersGone: a fetch waiting for budget gives
// up its place in the queue once every lookup waiting for it has gone; a
// later lookup starts a fetch of its own.
func TestFetchLeavesQueueWhenCallersGone(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: time.Hour}
	asleep := make(chan struct{}, 1)
	sleep := func(ctx context.Context, d time.Duration) error {
		asleep <- struct{}{}
		<-ctx.Done() // the budget's wait ends only when its fetch gives up
		return ctx.Err()
	}
	br, p, bs := spentBudget(t, clock, src, sleep)
	lookupLeaves(t, br, bs[1], asleep)
	waitUntil(t, func() bool { return p.Budget.State().Waiting == 0 })
	clock.Add(10 * time.Second)
	if _, _, err := br.Get(context.Background(), bs[1]); err != nil || src.calls() != 2 {
		t.Fatalf("a later lookup: %v after %d calls, want a token", err, src.calls())
	}
}

// gatedBound is a callLog whose fetch, once armed, stops where it reads
// the call bound (CallBounded, before the fetch registers itself): it
// says so on entered and goes on when release is closed.
type gatedBound struct {
	callLog
	armed            atomic.Bool
	entered, release chan struct{}
}

func (s *gatedBound) CallTimeout() time.Duration {
	if s.armed.CompareAndSwap(true, false) {
		close(s.entered)
		<-s.release
	}
	return 0
}

// TestFetchGivesUpWhenCallersLeftBeforeItStarted: a fetch whose every
// lookup left before it registered itself does not wait for budget: it
// gives up at once and calls nothing.
func TestFetchGivesUpWhenCallersLeftBeforeItStarted(t *testing.T) {
	clock := newFakeClock()
	src := &gatedBound{callLog: callLog{clock: clock, life: time.Hour}, entered: make(chan struct{}), release: make(chan struct{})}
	sleep := func(context.Context, time.Duration) error {
		t.Error("the fetch waited for budget, though no lookup waits for it")
		return errors.New("waited")
	}
	br, _, bs := spentBudget(t, clock, src, sleep)
	src.armed.Store(true)
	lookupLeaves(t, br, bs[1], src.entered)
	// The fetch is held before it registers itself: the test waits for
	// its outcome without being a lookup.
	fetched := br.group.DoChan(bs[1].key, func() (any, error) {
		t.Error("no fetch in flight to join")
		return nil, errors.New("no fetch in flight")
	})
	close(src.release)
	if res := <-fetched; !errors.Is(res.Err, context.Canceled) || src.calls() != 1 {
		t.Fatalf("the fetch: %v after %d calls, want it given up without a call", res.Err, src.calls())
	}
}

// gatedSleep is a wait for budget that says so on asleep and ends when
// release is closed, as its fetch then stands: given up, or served after
// moving clock by the wait.
func gatedSleep(clock *fakeClock) (sleep func(context.Context, time.Duration) error, asleep, release chan struct{}) {
	asleep, release = make(chan struct{}, 2), make(chan struct{})
	sleep = func(ctx context.Context, d time.Duration) error {
		asleep <- struct{}{}
		<-release
		if err := ctx.Err(); err != nil {
			return err
		}
		clock.Add(d)
		return nil
	}
	return sleep, asleep, release
}

// TestLookupJoinsAbandonedFetch: a lookup that joins a fetch after every
// lookup waiting for it has gone (so the fetch has given up its wait for
// budget) is not answered with that fetch's cancellation: it asks again
// and is served by a fetch of its own.
func TestLookupJoinsAbandonedFetch(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: time.Hour}
	sleep, asleep, release := gatedSleep(clock)
	br, _, bs := spentBudget(t, clock, src, sleep)
	lookupLeaves(t, br, bs[1], asleep)
	served := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), bs[1])
		served <- err
	}()
	awaitWaiting(t, br, bs[1].key, 1) // the second lookup waits for the abandoned fetch
	close(release)
	if err := <-served; err != nil || src.calls() != 2 {
		t.Fatalf("the lookup that joined the abandoned fetch: %v after %d calls, want a token", err, src.calls())
	}
}

// TestCallBoundLongerThanFetch: a source whose call bound is longer than
// the fetch's timeout leaves no time to queue: a caller is served when the
// budget has room at once, and otherwise refused at once with a positive
// Retry-After (never 0, which would send no header at all).
func TestCallBoundLongerThanFetch(t *testing.T) {
	clock := newFakeClock()
	never := func(context.Context, time.Duration) error { t.Error("a caller waited"); return nil }
	src := &boundedSource{callLog: callLog{clock: clock, life: time.Hour}, bound: 5 * time.Second}
	br := New(Options{Sleep: never, Now: clock.Now, FetchTimeout: 3 * time.Second})
	defer br.Close()
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: 10 * time.Second}, budget.NewLocal(clock.Now), clock.Now)
	bs := bindings(p, 2)
	if _, _, err := br.Get(context.Background(), bs[0]); err != nil {
		t.Fatalf("first caller, budget with room: %v, want a token", err)
	}
	_, _, err := br.Get(context.Background(), bs[1])
	if !errors.Is(err, budget.ErrExhausted) || RetryAfterOf(err) <= 0 {
		t.Fatalf("second caller: %v (retry after %s), want exhausted with a positive retry after", err, RetryAfterOf(err))
	}
}

// TestCheckKeepsJoinedFetchInQueue: a Check that joins a lookup's fetch
// waiting for budget waits for it like a lookup: the lookup leaving does
// not make the fetch give up its place in the queue, and the check gets
// the fetch's token.
func TestCheckKeepsJoinedFetchInQueue(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: time.Hour}
	sleep, asleep, release := gatedSleep(clock)
	br, _, bs := spentBudget(t, clock, src, sleep)
	spent := src.calls() // the call that spent the budget
	type checked struct {
		c   Checked
		err error
	}
	done := make(chan checked, 1)
	joined := make(chan struct{})
	go func() {
		<-asleep // the lookup's fetch waits for budget
		go func() {
			c, err := br.Check(context.Background(), bs[1])
			done <- checked{c, err}
		}()
		awaitWaiting(t, br, bs[1].key, 2) // the lookup and the check
		close(joined)
	}()
	lookupLeaves(t, br, bs[1], joined)
	close(release)
	res := <-done
	if res.err != nil || res.c.Entry == nil || !res.c.Joined || src.calls() != spent+1 {
		t.Fatalf("the check: %+v, %v after %d calls (%d before the lookup); want the joined fetch's token, after its one call", res.c, res.err, src.calls(), spent)
	}
}

// TestCallerJoiningRefusedRefresh: a caller (a lookup whose token is past
// its end, or a Check) that joins the refresh-ahead of its key in flight
// is not answered with the budget's refusal of the refresh (a background
// request never waits): it asks as a caller, waits its turn and gets a
// token of its own fetch.
func TestCallerJoiningRefusedRefresh(t *testing.T) {
	for _, tt := range []struct {
		name string
		ask  func(*Broker, *Binding) (*Entry, error)
	}{
		{"a lookup", func(br *Broker, b *Binding) (*Entry, error) {
			e, _, err := br.Get(context.Background(), b)
			return e, err
		}},
		{"a check", func(br *Broker, b *Binding) (*Entry, error) {
			c, err := br.Check(context.Background(), b)
			if err == nil && (c.Calls != 1 || c.Joined) {
				err = fmt.Errorf("%d calls, joined %t; want its own call", c.Calls, c.Joined)
			}
			return c.Entry, err
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &callLog{clock: clock, life: 100 * time.Second}
			br := New(Options{Now: clock.Now, BudgetWait: 30 * time.Second})
			defer br.Close()
			store := &gatedStore{Store: budget.NewLocal(clock.Now), refuse: true, entered: make(chan struct{}), release: make(chan struct{})}
			p := NewProfile("bank#1", src, nil, "", 0)
			p.Budget = budget.New("bank", budget.Limit{Rate: 10, Burst: 10, Period: time.Second}, store, clock.Now)
			b := bindings(p, 1)[0]
			e, _, err := br.Get(context.Background(), b)
			if err != nil {
				t.Fatal(err)
			}
			clock.Add(e.RefreshAt().Sub(clock.Now()))
			store.armed.Store(true)
			if _, r, err := br.Get(context.Background(), b); err != nil || r != RefreshAhead {
				t.Fatalf("in the refresh window: %s %v, want the cached token and a refresh", r, err)
			}
			<-store.entered // the refresh asks its budget
			clock.Add(e.Token().Expiry.Sub(clock.Now()) - br.opts.Leeway/2)
			got := make(chan error, 1)
			go func() {
				e2, err := tt.ask(br, b)
				if err == nil && e2 == e {
					err = errors.New("the expired token")
				}
				got <- err
			}()
			awaitWaiting(t, br, b.key, 1)
			close(store.release)
			if err := <-got; err != nil {
				t.Fatalf("the caller: %v, want a new token of its own fetch", err)
			}
			if n := src.calls(); n != 2 {
				t.Errorf("%d token API calls, want 2 (the mint and the caller's)", n)
			}
		})
	}
}

// TestCallerJoiningFetchOfShorterDeadline: a caller that joins a fetch
// whose budget refused it for the deadline of the request that started
// it (too close for its turn) is not answered with that refusal when its
// own wait reaches the turn: it waits its turn in a fetch of its own. The
// request that started the fetch is refused at once.
func TestCallerJoiningFetchOfShorterDeadline(t *testing.T) {
	clock := newFakeClock()
	src := &callLog{clock: clock, life: time.Hour}
	sleep := func(_ context.Context, d time.Duration) error {
		clock.Add(d)
		return nil
	}
	br := New(Options{Sleep: sleep, Now: clock.Now, BudgetWait: 2 * time.Minute, FetchTimeout: 2 * time.Minute})
	defer br.Close()
	store := &gatedStore{Store: budget.NewLocal(clock.Now), entered: make(chan struct{}), release: make(chan struct{})}
	p := NewProfile("bank#1", src, nil, "", 0)
	p.Budget = budget.New("bank", budget.Limit{Rate: 1, Burst: 1, Period: time.Minute}, store, clock.Now)
	bs := bindings(p, 2)
	if _, _, err := br.Get(context.Background(), bs[0]); err != nil {
		t.Fatal(err) // spends the budget: the next turn is in a minute
	}
	store.armed.Store(true)
	short, cancel := context.WithTimeout(context.Background(), 30*time.Second) // a turn by 29 s at most
	defer cancel()
	refused := make(chan error, 1)
	go func() {
		_, _, err := br.Get(short, bs[1])
		refused <- err
	}()
	<-store.entered // the fetch of the short request asks its budget
	served := make(chan error, 1)
	go func() {
		_, _, err := br.Get(context.Background(), bs[1])
		served <- err
	}()
	awaitWaiting(t, br, bs[1].key, 2)
	close(store.release)
	if err := <-refused; !errors.Is(err, budget.ErrExhausted) {
		t.Errorf("the request that started the fetch: %v, want refused at once", err)
	}
	if err := <-served; err != nil {
		t.Fatalf("the caller that joined it: %v, want a token after its turn", err)
	}
	if n := src.calls(); n != 2 {
		t.Errorf("%d token API calls, want 2", n)
	}
}
