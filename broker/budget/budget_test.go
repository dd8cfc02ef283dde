package budget

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// newClock returns a clock that tests move, at a fixed start.
func newClock() *clocktest.Clock {
	return clocktest.New(time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC))
}

// advance is a sleep that moves c by d at once.
func advance(c *clocktest.Clock) func(context.Context, time.Duration) error {
	return func(_ context.Context, d time.Duration) error {
		c.Add(d)
		return nil
	}
}

// gatedSleep is a sleep that reports each wait on asleep and returns once
// released, having moved the clock by the wait.
type gatedSleep struct {
	c       *clocktest.Clock
	asleep  chan time.Duration
	release chan struct{}
}

func newGatedSleep(c *clocktest.Clock) *gatedSleep {
	return &gatedSleep{c: c, asleep: make(chan time.Duration, 16), release: make(chan struct{})}
}

func (g *gatedSleep) sleep(ctx context.Context, d time.Duration) error {
	g.asleep <- d
	select {
	case <-g.release:
		g.c.Add(d)
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func limit(rate, burst int, period time.Duration) Limit {
	return Limit{Rate: rate, Burst: burst, Period: period}
}

func TestParseRate(t *testing.T) {
	for _, tt := range []struct {
		in      string
		want    Limit
		wantErr bool
	}{
		{in: "20/s", want: limit(20, 20, time.Second)},
		{in: " 1200 / m ", want: limit(1200, 20, time.Minute)},
		{in: "72000/h", want: limit(72000, 20, time.Hour)},
		{in: "1/m", want: limit(1, 1, time.Minute)},
		{in: "5/10s", want: limit(5, 1, 10*time.Second)},
		{in: "3/500ms", want: limit(3, 6, 500*time.Millisecond)},
		{in: "20", wantErr: true},
		{in: "0/s", wantErr: true},
		{in: "-1/s", wantErr: true},
		{in: "1.5/s", wantErr: true},
		{in: "20/day", wantErr: true},
		{in: "20/0s", wantErr: true},
		{in: "2000000000/s", wantErr: true},
		{in: "1000000000/1ms", wantErr: true},
	} {
		got, err := ParseRate(tt.in)
		if (err != nil) != tt.wantErr || got != tt.want {
			t.Errorf("ParseRate(%q) = %v, %v; want %v, error %v", tt.in, got, err, tt.want, tt.wantErr)
		}
	}
	if got := limit(20, 20, time.Second).Share(3); got != limit(20, 6, 3*time.Second) {
		t.Errorf("Share(3) = %v", got)
	}
}

// TestLocalStoreRate: the in-process bucket lets a full burst through at
// once, then the rate, whatever the callers ask.
func TestLocalStoreRate(t *testing.T) {
	for _, tt := range []struct {
		name string
		l    Limit
		// every step requests `ask` at once, then the clock moves by step.
		ask, steps int
		step       time.Duration
		want       int
	}{
		{"burst then nothing", limit(10, 10, time.Second), 100, 1, 0, 10},
		{"burst then the rate", limit(10, 10, time.Second), 5, 20, 100 * time.Millisecond, 10 + 19},
		{"burst of one", limit(10, 1, time.Second), 5, 20, 100 * time.Millisecond, 20},
		{"per minute", limit(60, 1, time.Minute), 3, 120, 500 * time.Millisecond, 60},
		{"within the rate", limit(10, 2, time.Second), 1, 50, 200 * time.Millisecond, 50},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			s := NewLocal(c.Now)
			got := 0
			for range tt.steps {
				for range tt.ask {
					res, err := s.AllowN(context.Background(), "p", tt.l, 1)
					if err != nil {
						t.Fatal(err)
					}
					if res.Allowed > 0 {
						got++
					} else if res.RetryAfter <= 0 {
						t.Fatalf("refused with RetryAfter %s", res.RetryAfter)
					}
				}
				c.Add(tt.step)
			}
			if got != tt.want {
				t.Errorf("allowed %d, want %d", got, tt.want)
			}
		})
	}
}

// TestForegroundRateAndBurst: callers one after another are served at the
// rate after the burst, each waiting what the bucket says, and the budget
// counts them.
func TestForegroundRateAndBurst(t *testing.T) {
	c := newClock()
	sleep := advance(c)
	b := New("bank", limit(5, 2, time.Second), NewLocal(c.Now), c.Now)
	start := c.Now()
	var at []time.Duration
	for range 12 {
		if _, err := b.Take(context.Background(), Foreground, c.Now().Add(time.Minute), sleep); err != nil {
			t.Fatal(err)
		}
		at = append(at, c.Now().Sub(start))
	}
	// A burst of 2, then one per 200ms.
	for i, d := range at {
		want := time.Duration(max(0, i-1)) * 200 * time.Millisecond
		if d != want {
			t.Errorf("request %d served at +%s, want +%s", i, d, want)
		}
	}
	st := b.State()
	if st.Used != 12 || st.Exhausted != 0 || st.WaitTotal != 2*time.Second || st.Waiting != 0 || st.Rate != 5 || st.Burst != 2 {
		t.Errorf("State = %+v", st)
	}
}

// TestPriorities: a caller waiting goes before background refresh; a
// background request leaves a reserve in the bucket; a caller that cannot
// be served before its deadline is refused at once with the queue's wait.
func TestPriorities(t *testing.T) {
	c := newClock()
	g := newGatedSleep(c)
	sleep := g.sleep
	b := New("bank", limit(4, 4, time.Second), NewLocal(c.Now), c.Now)
	ctx := context.Background()
	deadline := func(d time.Duration) time.Time { return c.Now().Add(d) }

	// Background takes 3 of the burst of 4 and leaves 1 for callers.
	for i := range 3 {
		if _, err := b.Take(ctx, Background, time.Time{}, sleep); err != nil {
			t.Fatalf("background %d: %v", i, err)
		}
	}
	var ee *ExhaustedError
	if _, err := b.Take(ctx, Background, time.Time{}, sleep); !errors.As(err, &ee) || !errors.Is(err, ErrExhausted) || ee.RetryAfter != 250*time.Millisecond || ee.Provider != "bank" {
		t.Fatalf("background past the reserve: %v, want exhausted for 250ms", err)
	}
	if _, err := b.Take(ctx, Foreground, deadline(time.Second), sleep); err != nil {
		t.Fatalf("caller on the reserve: %v", err)
	}

	// The bucket is empty: a caller waits 250ms, at the head of the queue.
	done := make(chan error, 1)
	go func() {
		_, err := b.Take(ctx, Foreground, deadline(time.Second), sleep)
		done <- err
	}()
	if d := <-g.asleep; d != 250*time.Millisecond {
		t.Fatalf("head waits %s, want 250ms", d)
	}
	// Meanwhile background gets nothing, however full the bucket.
	c.Add(time.Hour)
	if _, err := b.Take(ctx, Background, time.Time{}, sleep); !errors.As(err, &ee) {
		t.Fatalf("background while a caller waits: %v", err)
	}
	c.Add(-time.Hour)
	// A caller behind it whose deadline comes before its turn is refused
	// at once with the queue's estimate: the head at +250ms, then one
	// interval per caller ahead.
	_, err := b.Take(ctx, Foreground, deadline(400*time.Millisecond), sleep)
	if !errors.As(err, &ee) || ee.RetryAfter != 500*time.Millisecond {
		t.Fatalf("caller past its deadline: %v, want exhausted for 500ms", err)
	}
	if st := b.State(); st.Waiting != 1 {
		t.Errorf("Waiting = %d, want 1", st.Waiting)
	}
	// One whose deadline allows it queues behind the head.
	second := make(chan error, 1)
	go func() {
		_, err := b.Take(ctx, Foreground, deadline(time.Second), sleep)
		second <- err
	}()
	waitFor(t, func() bool { return b.State().Waiting == 2 })
	close(g.release)
	if err := <-done; err != nil {
		t.Fatalf("head: %v", err)
	}
	if d := <-g.asleep; d != 250*time.Millisecond {
		t.Fatalf("second waits %s, want 250ms", d)
	}
	if err := <-second; err != nil {
		t.Fatalf("second: %v", err)
	}
	if st := b.State(); st.Used != 6 || st.Exhausted != 3 || st.Waiting != 0 {
		t.Errorf("State = %+v", st)
	}
}

// TestHeadRefusedPastDeadline: the head of the queue is refused when the
// bucket's wait ends after its deadline, and the next caller takes its
// turn.
func TestHeadRefusedPastDeadline(t *testing.T) {
	c := newClock()
	sleep := advance(c)
	b := New("bank", limit(1, 1, time.Second), NewLocal(c.Now), c.Now)
	ctx := context.Background()
	if _, err := b.Take(ctx, Foreground, time.Time{}, sleep); err != nil {
		t.Fatal(err)
	}
	var ee *ExhaustedError
	if _, err := b.Take(ctx, Foreground, c.Now().Add(500*time.Millisecond), sleep); !errors.As(err, &ee) || ee.RetryAfter != time.Second {
		t.Fatalf("got %v, want exhausted for 1s", err)
	}
	if _, err := b.Take(ctx, Foreground, c.Now().Add(2*time.Second), sleep); err != nil {
		t.Fatalf("next caller: %v", err)
	}
	// A caller whose context ends leaves the queue uncounted.
	cctx, cancel := context.WithCancel(ctx)
	cancel()
	if _, err := b.Take(cctx, Foreground, time.Time{}, sleep); !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled caller: %v", err)
	}
	if st := b.State(); st.Used != 2 || st.Exhausted != 1 || st.Waiting != 0 {
		t.Errorf("State = %+v", st)
	}
}

// failingStore always fails, like an unreachable Redis.
type failingStore struct{}

func (failingStore) AllowN(context.Context, string, Limit, int) (Result, error) {
	return Result{}, errors.New("redis: connection refused")
}

func (failingStore) Hold(context.Context, string, time.Duration) error {
	return errors.New("redis: connection refused")
}

// TestStoreFailureFallsBack: while the store fails, the in-process bucket
// answers under the fallback limit.
func TestStoreFailureFallsBack(t *testing.T) {
	c := newClock()
	b := New("bank", limit(10, 10, time.Second), failingStore{}, c.Now, WithFallback(limit(10, 10, time.Second).Share(5)))
	served := 0
	for range 10 {
		if _, err := b.Take(context.Background(), Foreground, c.Now(), nil); err == nil {
			served++
		}
	}
	if served != 2 {
		t.Errorf("served %d on the fallback, want its burst of 2", served)
	}
}

// TestFallbackLowered: while the store fails, a provider's lowering
// applies to the in-process bucket too when it is below the fallback
// limit.
func TestFallbackLowered(t *testing.T) {
	c := newClock()
	b := New("bank", limit(10, 10, time.Second), failingStore{}, c.Now)
	b.Observe(context.Background(), http.Header{"X-Ratelimit-Remaining": {"1"}, "X-Ratelimit-Reset": {"10"}}, c.Now()) // 1 per 10 s
	served := 0
	for range 10 {
		if _, err := b.Take(context.Background(), Foreground, c.Now(), nil); err == nil {
			served++
		}
	}
	if served != 1 {
		t.Errorf("served %d on the fallback, want the lowered limit's 1", served)
	}
}

// TestObserve: providers' rate-limit headers lower the budget until they
// pass; malformed or absurd values change nothing or are capped.
func TestObserve(t *testing.T) {
	hdr := func(kv ...string) http.Header {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Add(kv[i], kv[i+1])
		}
		return h
	}
	for _, tt := range []struct {
		name      string
		h         http.Header
		effective float64
		lowered   time.Duration // 0: no lowering
	}{
		{"draft structured", hdr("RateLimit", `"default";r=5;t=10`), 0.5, 10 * time.Second},
		{"draft two policies, the tighter wins", hdr("RateLimit", `"burst";r=50;t=1, "daily";r=100;t=1000`), 0.1, MaxHold},
		{"draft dictionary", hdr("RateLimit", `limit=100, remaining=2, reset=4`), 0.5, 4 * time.Second},
		{"draft policy", hdr("RateLimit-Policy", `"default";q=60;w=60`), 1, time.Minute},
		{"draft older policy", hdr("RateLimit-Policy", `30;w=60`), 0.5, time.Minute},
		{"draft early fields", hdr("RateLimit-Remaining", "3", "RateLimit-Reset", "6"), 0.5, 6 * time.Second},
		{"x- with seconds", hdr("X-RateLimit-Remaining", "1", "X-RateLimit-Reset", "2.5"), 0.4, 2500 * time.Millisecond},
		{"x- with a Unix time", hdr("X-RateLimit-Remaining", "4", "X-RateLimit-Reset", "1795435220"), 0.2, 20 * time.Second},
		{"none left closes", hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "30"), 0, 30 * time.Second},
		{"two policies spent, the later reset closes", hdr("RateLimit", `"a";r=0;t=20, "b";r=0;t=40`), 0, 40 * time.Second},
		{"two policies spent, the later reset first", hdr("RateLimit", `"b";r=0;t=40, "a";r=0;t=20`), 0, 40 * time.Second},
		{"absurd reset capped", hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "99999999"), 0, MaxHold},
		{"x- with a Unix time in milliseconds", hdr("X-RateLimit-Remaining", "4", "X-RateLimit-Reset", "1795435220000"), 0.2, 20 * time.Second},
		{"x- with a Unix time in milliseconds, passed", hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "1795435100000"), 10, 0},
		{"plenty left", hdr("X-RateLimit-Remaining", "500", "X-RateLimit-Reset", "10"), 10, 0},
		{"malformed", hdr("X-RateLimit-Remaining", "many", "X-RateLimit-Reset", "-3", "RateLimit", "r=;t=x"), 10, 0},
		{"no headers", hdr(), 10, 0},
		{"reset in the past", hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "1795435100"), 10, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock() // 1795435200 in Unix time
			b := New("bank", limit(10, 10, time.Second), NewLocal(c.Now), c.Now)
			b.Observe(context.Background(), tt.h, c.Now())
			st := b.State()
			var until time.Time
			if tt.lowered > 0 {
				until = c.Now().Add(tt.lowered)
			}
			if st.Effective != tt.effective || !st.LoweredUntil.Equal(until) {
				t.Errorf("Effective %v until %v, want %v until %v", st.Effective, st.LoweredUntil, tt.effective, until)
			}
			c.Add(tt.lowered)
			if st := b.State(); st.Effective != 10 || !st.LoweredUntil.IsZero() {
				t.Errorf("after the reset: Effective %v until %v, want 10 and no lowering", st.Effective, st.LoweredUntil)
			}
		})
	}
}

// TestObserveLocalShare: a provider's answer speaks for the whole API key;
// a budget spending a local share of it (WithLocalShare) is lowered to its
// share of what is left.
func TestObserveLocalShare(t *testing.T) {
	h := http.Header{"X-Ratelimit-Remaining": {"20"}, "X-Ratelimit-Reset": {"10"}} // 2/s for the key
	for _, tt := range []struct {
		name      string
		fleet     int
		opts      []Option
		effective float64
	}{
		{"one sidecar", 1, nil, 2},
		{"shared store", 4, nil, 2},
		{"a share of 4", 4, []Option{WithLocalShare(4)}, 0.5},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			l := limit(10, 10, time.Second)
			if len(tt.opts) > 0 {
				l = l.Share(tt.fleet)
			}
			b := New("bank", l, NewLocal(c.Now), c.Now, tt.opts...)
			b.Observe(context.Background(), h, c.Now())
			if st := b.State(); st.Effective != tt.effective || !st.LoweredUntil.Equal(c.Now().Add(10*time.Second)) {
				t.Errorf("Effective %v until %v, want %v for 10s", st.Effective, st.LoweredUntil, tt.effective)
			}
		})
	}
}

// TestObserveGovernsTake: a lowered budget spreads what is left; a closed
// one refuses callers whose deadline comes first and lets the others wait;
// an answer that restricts nothing ends it.
func TestObserveGovernsTake(t *testing.T) {
	c := newClock()
	sleep := advance(c)
	b := New("bank", limit(10, 10, time.Second), NewLocal(c.Now), c.Now)
	ctx := context.Background()
	b.Observe(context.Background(), http.Header{"X-Ratelimit-Remaining": {"2"}, "X-Ratelimit-Reset": {"10"}}, c.Now())
	start := c.Now()
	for range 2 {
		if _, err := b.Take(ctx, Foreground, start.Add(time.Minute), sleep); err != nil {
			t.Fatal(err)
		}
	}
	if got := c.Now().Sub(start); got != 5*time.Second {
		t.Errorf("2 requests left for 10s served over %s, want 5s", got)
	}
	b.Observe(context.Background(), http.Header{"Ratelimit": {`"d";r=0;t=20`}}, c.Now())
	var ee *ExhaustedError
	if _, err := b.Take(ctx, Background, time.Time{}, sleep); !errors.As(err, &ee) {
		t.Fatalf("background while closed: %v", err)
	}
	if _, err := b.Take(ctx, Foreground, c.Now().Add(10*time.Second), sleep); !errors.As(err, &ee) || ee.RetryAfter != 20*time.Second {
		t.Fatalf("caller before the reset: %v, want exhausted for 20s", err)
	}
	before := c.Now()
	if _, err := b.Take(ctx, Foreground, c.Now().Add(30*time.Second), sleep); err != nil || c.Now().Sub(before) != 20*time.Second {
		t.Fatalf("caller after the reset: %v after %s, want served after 20s", err, c.Now().Sub(before))
	}
	b.Observe(context.Background(), http.Header{"Ratelimit": {`"d";r=0;t=20`}}, c.Now())
	b.Observe(context.Background(), http.Header{"Ratelimit": {`"d";r=1000;t=20`}}, c.Now())
	if _, err := b.Take(ctx, Background, time.Time{}, sleep); !errors.As(err, &ee) {
		t.Fatalf("background after a late answer with room: %v, want the budget still closed", err)
	}
	b.Observe(context.Background(), http.Header{"Ratelimit": {`"d";r=0;t=5`}}, c.Now())
	if st := b.State(); !st.LoweredUntil.Equal(c.Now().Add(20 * time.Second)) {
		t.Errorf("closed until %v after a shorter closing, want %v", st.LoweredUntil, c.Now().Add(20*time.Second))
	}
	c.Add(20 * time.Second)
	if _, err := b.Take(ctx, Background, time.Time{}, sleep); err != nil {
		t.Fatalf("background once the closing ended: %v", err)
	}
}

// TestHold: a 429's Retry-After closes the budget until then (at most
// MaxHold), never shorter than a closing in force.
func TestHold(t *testing.T) {
	for _, tt := range []struct {
		name  string
		holds []time.Duration
		want  time.Duration
	}{
		{"one", []time.Duration{30 * time.Second}, 30 * time.Second},
		{"a shorter one after", []time.Duration{30 * time.Second, 5 * time.Second}, 30 * time.Second},
		{"a longer one after", []time.Duration{5 * time.Second, 30 * time.Second}, 30 * time.Second},
		{"capped", []time.Duration{time.Hour}, MaxHold},
		{"none", []time.Duration{0}, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			b := New("bank", limit(10, 10, time.Second), NewLocal(c.Now), c.Now)
			for _, d := range tt.holds {
				b.Hold(c.Now(), d)(context.Background())
			}
			var want time.Time
			if tt.want > 0 {
				want = c.Now().Add(tt.want)
			}
			if st := b.State(); !st.LoweredUntil.Equal(want) || (st.Effective == 0) != (tt.want > 0) {
				t.Errorf("closed until %v (effective %v), want %v", st.LoweredUntil, st.Effective, want)
			}
		})
	}
}

// TestLocalStoreHold: a held key refuses every spend until the hold ends
// (the latest one given, a shorter one never shortening it), with the
// hold's rest as RetryAfter and nothing spent; other keys are not held.
func TestLocalStoreHold(t *testing.T) {
	l := limit(10, 10, time.Second)
	for _, tt := range []struct {
		name  string
		holds []time.Duration
		at    time.Duration // after the holds
		key   string
		want  time.Duration // RetryAfter; 0: served
	}{
		{"held", []time.Duration{30 * time.Second}, 0, "bank", 30 * time.Second},
		{"later in the hold", []time.Duration{30 * time.Second}, 20 * time.Second, "bank", 10 * time.Second},
		{"once it ended", []time.Duration{30 * time.Second}, 30 * time.Second, "bank", 0},
		{"a shorter one after", []time.Duration{30 * time.Second, 5 * time.Second}, 10 * time.Second, "bank", 20 * time.Second},
		{"a longer one after", []time.Duration{5 * time.Second, 30 * time.Second}, 10 * time.Second, "bank", 20 * time.Second},
		{"none", []time.Duration{0, -time.Second}, 0, "bank", 0},
		{"another key", []time.Duration{30 * time.Second}, 0, "other", 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			c := newClock()
			s := NewLocal(c.Now)
			for _, d := range tt.holds {
				if err := s.Hold(ctx, "bank", d); err != nil {
					t.Fatal(err)
				}
			}
			c.Add(tt.at)
			res, err := s.AllowN(ctx, tt.key, l, 1)
			if err != nil {
				t.Fatal(err)
			}
			if tt.want == 0 {
				if res.Allowed != 1 || res.Remaining != 9 {
					t.Errorf("got %+v, want served with 9 left", res)
				}
				return
			}
			if res.Allowed != 0 || res.Remaining != 0 || res.RetryAfter != tt.want {
				t.Errorf("got %+v, want refused, retry after %s", res, tt.want)
			}
			c.Add(tt.want)
			if res, err := s.AllowN(ctx, tt.key, l, 1); err != nil || res.Allowed != 1 || res.Remaining != 9 {
				t.Errorf("once the hold ended: %+v %v, want served from a full bucket", res, err)
			}
		})
	}
}

// TestHoldShared: two budgets spending one key of one store (two sidecars
// on one Redis, here in-process): a 429 held by one, or an answer with
// none left that one observed, refuses the other's callers and refreshes
// until the hold ends, without calling the token
// API; a store that fails keeps the holding budget's own closing.
func TestHoldShared(t *testing.T) {
	for _, tt := range []struct {
		name  string
		close func(ctx context.Context, b *Budget, now time.Time) // for 30 s
	}{
		{"a 429's Retry-After", func(ctx context.Context, b *Budget, now time.Time) { b.Hold(now, 30*time.Second)(ctx) }},
		{"an answer with none left", func(ctx context.Context, b *Budget, now time.Time) {
			b.Observe(ctx, http.Header{"X-Ratelimit-Remaining": {"0"}, "X-Ratelimit-Reset": {"30"}}, now)
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			c := newClock()
			s := NewLocal(c.Now)
			l := limit(10, 10, time.Second)
			a, b := New("bank", l, s, c.Now), New("bank", l, s, c.Now)
			tt.close(ctx, a, c.Now())
			var ee *ExhaustedError
			if _, err := b.Take(ctx, Background, time.Time{}, advance(c)); !errors.As(err, &ee) || ee.RetryAfter != 30*time.Second {
				t.Fatalf("refresh on the other budget: %v, want exhausted, retry after 30s", err)
			}
			if _, err := b.Take(ctx, Foreground, c.Now().Add(5*time.Second), advance(c)); !errors.As(err, &ee) || ee.RetryAfter != 30*time.Second {
				t.Fatalf("caller of the other budget: %v, want exhausted, retry after 30s", err)
			}
			start := c.Now()
			if waited, err := b.Take(ctx, Foreground, time.Time{}, advance(c)); err != nil || !waited || c.Now().Sub(start) != 30*time.Second {
				t.Fatalf("caller without a deadline: waited %t %v after %s, want served once the hold ended (30s)", waited, err, c.Now().Sub(start))
			}

			f := New("bank", l, failingStore{}, c.Now)
			tt.close(ctx, f, c.Now())
			if _, err := f.Take(ctx, Background, time.Time{}, advance(c)); !errors.As(err, &ee) {
				t.Fatalf("store failing: refresh %v, want exhausted by the budget's own closing", err)
			}
			c.Add(30 * time.Second)
			if _, err := f.Take(ctx, Background, time.Time{}, advance(c)); err != nil {
				t.Fatalf("store failing, closing ended: refresh %v, want the fallback to serve it", err)
			}
		})
	}
}

// TestPlanSpreads: refreshes planned for one slot spill into the slots
// before it, BackgroundShare of the rate each, and past the range go to
// its start.
func TestPlanSpreads(t *testing.T) {
	for _, tt := range []struct {
		name string
		l    Limit
		n    int
		want map[time.Duration]int // offset before latest -> refreshes planned there
		opts []Option
	}{
		{"8/s shared by 2: 3 per second each", limit(8, 8, time.Second), 10, map[time.Duration]int{0: 3, -time.Second: 3, -2 * time.Second: 3, -3 * time.Second: 1}, []Option{WithSharedBy(2)}},
		{"4/s: 3 per second", limit(4, 4, time.Second), 10, map[time.Duration]int{0: 3, -time.Second: 3, -2 * time.Second: 3, -3 * time.Second: 1}, nil},
		{"1/s: 1 per 2s", limit(1, 1, time.Second), 3, map[time.Duration]int{0: 1, -2 * time.Second: 1, -4 * time.Second: 1}, nil},
		{"full: the earliest", limit(4, 4, time.Second), 20, map[time.Duration]int{0: 3, -time.Second: 3, -2 * time.Second: 3, -3 * time.Second: 3, -4 * time.Second: 3, -5 * time.Second: 5}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			b := New("bank", tt.l, NewLocal(c.Now), c.Now, tt.opts...)
			latest := c.Now().Add(time.Minute + 300*time.Millisecond)
			earliest := latest.Add(-5 * time.Second)
			got := map[time.Duration]int{}
			for range tt.n {
				got[b.Plan(earliest, latest).Sub(latest)]++
			}
			if len(got) != len(tt.want) {
				t.Fatalf("planned %v, want %v", got, tt.want)
			}
			for d, n := range tt.want {
				if got[d] != n {
					t.Errorf("planned %v, want %v", got, tt.want)
					break
				}
			}
		})
	}
}

// TestPlanForgetsPassedSlots: the calendar drops the slots that have
// passed, so that a budget planning refreshes for good keeps about a
// minute of slots, not every slot it ever planned in.
func TestPlanForgetsPassedSlots(t *testing.T) {
	c := newClock()
	b := New("bank", limit(1, 1, time.Second), NewLocal(c.Now), c.Now) // slots of 2 s
	for range 1000 {
		b.Plan(c.Now(), c.Now().Add(time.Second))
		c.Add(time.Second)
	}
	b.mu.Lock()
	kept := len(b.cal.planned)
	b.mu.Unlock()
	if kept > 64 {
		t.Errorf("the calendar keeps %d slots after 500 have passed, want at most a minute of slots and the one ahead", kept)
	}
}

// waitFor polls cond (goroutines reaching a channel), failing after 10s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestTransportObserves: answers through Budget.Transport lower the budget.
func TestTransportObserves(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.Header().Set("RateLimit", `"default";r=1;t=4`)
		w.WriteHeader(http.StatusOK)
	}))
	defer srv.Close()
	c := newClock()
	b := New("bank", limit(10, 10, time.Second), NewLocal(c.Now), c.Now)
	client := &http.Client{Transport: b.Transport(nil)}
	resp, err := client.Get(srv.URL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if st := b.State(); st.Effective != 0.25 || !st.LoweredUntil.Equal(c.Now().Add(4*time.Second)) {
		t.Errorf("State after the answer: %+v, want 0.25/s for 4s", st)
	}
}

func TestLimitString(t *testing.T) {
	for _, tt := range []struct {
		l    Limit
		want string
	}{
		{limit(20, 20, time.Second), "20/s burst 20"},
		{limit(1200, 20, time.Minute), "1200/m burst 20"},
		{limit(5, 1, 10*time.Second), "5/10s burst 1"},
	} {
		if got := tt.l.String(); got != tt.want {
			t.Errorf("%#v: %q, want %q", tt.l, got, tt.want)
		}
	}
}

// TestExhaustedErrorText: a refusal says why for its priority.
func TestExhaustedErrorText(t *testing.T) {
	c := newClock()
	b := New("bank", limit(1, 1, time.Minute), NewLocal(c.Now), c.Now)
	ctx := context.Background()
	if _, err := b.Take(ctx, Foreground, time.Time{}, nil); err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		p    Priority
		want string
	}{
		{Foreground, "no room before the request's deadline"},
		{Background, "a refresh-ahead gets none"},
	} {
		_, err := b.Take(ctx, tt.p, c.Now().Add(time.Second), nil)
		var ee *ExhaustedError
		if !errors.As(err, &ee) || ee.Priority != tt.p || !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%s: %v, want an exhausted error saying %q", tt.p, err, tt.want)
		}
	}
}

// TestTakeWaited: Take reports whether the request waited its turn.
func TestTakeWaited(t *testing.T) {
	c := newClock()
	sleep := advance(c)
	b := New("bank", limit(1, 1, time.Second), NewLocal(c.Now), c.Now)
	for i, want := range []bool{false, true} {
		if waited, err := b.Take(context.Background(), Foreground, time.Time{}, sleep); err != nil || waited != want {
			t.Errorf("request %d: waited %t, %v; want waited %t", i+1, waited, err, want)
		}
	}
}

// denyingStore refuses every request without saying when to come back,
// as redis_rate can when a request needs more than the burst.
type denyingStore struct{}

func (denyingStore) AllowN(context.Context, string, Limit, int) (Result, error) {
	return Result{}, nil
}

func (denyingStore) Hold(context.Context, string, time.Duration) error { return nil }

// TestRefusalSaysWhen: a refused caller is always told a positive wait,
// also when the store does not say when and the deadline has passed: a
// zero would send no Retry-After at all.
func TestRefusalSaysWhen(t *testing.T) {
	c := newClock()
	sleep := advance(c)
	b := New("bank", limit(1, 1, time.Second), denyingStore{}, c.Now)
	var ee *ExhaustedError
	if _, err := b.Take(context.Background(), Foreground, c.Now().Add(-time.Second), sleep); !errors.As(err, &ee) || ee.RetryAfter <= 0 {
		t.Fatalf("got %v, want exhausted with a positive retry after", err)
	}
}

// blockingStore answers when its caller's context ends, with the
// context's error, like a Redis call cut short by the caller.
type blockingStore struct{ called chan struct{} }

func (s blockingStore) AllowN(ctx context.Context, _ string, _ Limit, _ int) (Result, error) {
	close(s.called)
	<-ctx.Done()
	return Result{}, ctx.Err()
}

func (blockingStore) Hold(context.Context, string, time.Duration) error { return nil }

// TestCancelledDuringStoreCall: a caller whose context ends while the
// store answers gets its context's error; the in-process fallback, which
// answers for a failing store, spends nothing for it.
func TestCancelledDuringStoreCall(t *testing.T) {
	for _, p := range []Priority{Foreground, Background} {
		t.Run(p.String(), func(t *testing.T) {
			c := newClock()
			s := blockingStore{called: make(chan struct{})}
			b := New("bank", limit(1, 1, time.Second), s, c.Now)
			ctx, cancel := context.WithCancel(context.Background())
			go func() {
				<-s.called
				cancel()
			}()
			if _, err := b.Take(ctx, p, time.Time{}, advance(c)); !errors.Is(err, context.Canceled) {
				t.Fatalf("Take = %v, want %v", err, context.Canceled)
			}
			if st := b.State(); st.Used != 0 || st.Waiting != 0 {
				t.Errorf("State = %+v, want nothing used, nobody waiting", st)
			}
			if res, _ := b.fallback.AllowN(context.Background(), "bank", limit(1, 1, time.Second), 0); res.Remaining != 1 {
				t.Errorf("the fallback bucket holds %d, want its whole burst of 1", res.Remaining)
			}
		})
	}
}

// TestFallbackLoweredFleetShare: in a fleet sharing the store
// (WithSharedBy), a provider's lowering speaks for the whole API key;
// while the store fails, each sidecar's in-process bucket spends its
// share of the lowered rate, so that the fleet together stays within it.
func TestFallbackLoweredFleetShare(t *testing.T) {
	c := newClock()
	l := limit(10, 10, time.Second)
	b := New("bank", l, failingStore{}, c.Now, WithFallback(l.Share(5)), WithSharedBy(5))
	sleep := advance(c)
	start := c.Now()
	served := 0
	for c.Now().Sub(start) < 100*time.Second {
		// 1 per 10 s left for the whole key, said again as it passes.
		b.Observe(context.Background(), http.Header{"X-Ratelimit-Remaining": {"1"}, "X-Ratelimit-Reset": {"10"}}, c.Now())
		if _, err := b.Take(context.Background(), Foreground, c.Now().Add(time.Second), sleep); err == nil {
			served++
		}
		c.Add(time.Second)
	}
	// The key allows 10 in 100 s; one sidecar's share is 2 (and the one
	// its bucket held at the start).
	if served > 3 {
		t.Errorf("one of 5 sidecars served %d in 100 s on the fallback, want at most its share of the lowered rate, 3", served)
	}
}

// TestFallbackKeepsTheCallersReserve: while the store fails, refreshes on
// the in-process bucket leave callers the same reserve as on the store.
func TestFallbackKeepsTheCallersReserve(t *testing.T) {
	c := newClock()
	l := limit(8, 8, time.Second)
	b := New("bank", l, failingStore{}, c.Now, WithFallback(l.Share(2)), WithSharedBy(2)) // fallback burst 4
	served := 0
	for range 4 {
		if _, err := b.Take(context.Background(), Background, time.Time{}, nil); err == nil {
			served++
		}
	}
	if served != 3 {
		t.Errorf("refreshes took %d of the fallback's burst of 4, want 3: one left for callers", served)
	}
	if _, err := b.Take(context.Background(), Foreground, c.Now(), advance(c)); err != nil {
		t.Errorf("caller on the reserve: %v", err)
	}
}

// An answer with none left closes the budget in the step that reads it:
// while it is observed, a caller is refused by the lowering an earlier
// answer set or by the closing, never served by the budget's own limit
// in between. The bucket is spent so that only the full limit has room.
func TestObserveNoneLeftClosesAtOnce(t *testing.T) {
	ctx := context.Background()
	for range 300 {
		c := newClock()
		b := New("bank", limit(10, 10, time.Second), NewLocal(c.Now), c.Now)
		for range 8 {
			if _, err := b.Take(ctx, Foreground, c.Now(), nil); err != nil {
				t.Fatal(err)
			}
		}
		b.Observe(ctx, http.Header{"X-Ratelimit-Remaining": {"5"}, "X-Ratelimit-Reset": {"100"}}, c.Now())
		if _, err := b.Take(ctx, Foreground, c.Now(), nil); err == nil {
			t.Fatal("a caller served under the lowering, want refused")
		}
		start, done := make(chan struct{}), make(chan struct{})
		served := 0
		go func() {
			defer close(done)
			close(start)
			for range 50 {
				if _, err := b.Take(ctx, Foreground, c.Now(), nil); err == nil {
					served++
				}
			}
		}()
		<-start
		b.Observe(ctx, http.Header{"X-Ratelimit-Remaining": {"0"}, "X-Ratelimit-Reset": {"100"}}, c.Now())
		<-done
		if served > 0 {
			t.Fatalf("%d callers served while an answer with none left was observed, want none", served)
		}
	}
}

// TestAccount: an account is 16 hex characters, a fixed fingerprint of
// the credential (the Store keys of every sidecar and every release must
// agree), different for another credential, never the credential itself;
// none for no credential.
func TestAccount(t *testing.T) {
	const key = "api-key-0123456789abcdef"
	// The first 8 bytes of SHA-256 of accountLabel and key, in hex,
	// computed once.
	const want = "970ab5678dbb9d7a"
	a := Account(key)
	if a != want {
		t.Errorf("Account(key) = %q, want %q", a, want)
	}
	for _, other := range []string{"api-key-0123456789abcdeF", key + " ", "client-id"} {
		if Account(other) == a {
			t.Errorf("Account(%q) = Account(key)", other)
		}
	}
	if got := Account(""); got != "" {
		t.Errorf(`Account("") = %q, want ""`, got)
	}
}

// TestLoweringEndsWithinMaxHold: a lowering to fewer requests than one per
// MaxHold (one left of a day's quota) spends its request and lets the
// configured rate serve again once MaxHold has passed: the bucket it spent
// does not close the budget until the provider's reset.
func TestLoweringEndsWithinMaxHold(t *testing.T) {
	for _, tt := range []struct {
		name   string
		header http.Header
	}{
		{"X-RateLimit, a day", http.Header{"X-Ratelimit-Remaining": {"1"}, "X-Ratelimit-Reset": {"86400"}}},
		{"RateLimit, an hour", http.Header{"Ratelimit": {`"d";r=2;t=3600`}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			c := newClock()
			sleep := advance(c)
			b := New("bank", limit(10, 10, time.Second), NewLocal(c.Now), c.Now)
			ctx := context.Background()
			b.Observe(ctx, tt.header, c.Now())
			if _, err := b.Take(ctx, Foreground, c.Now().Add(time.Second), sleep); err != nil {
				t.Fatalf("first request under the lowering: %v", err)
			}
			c.Add(MaxHold)
			start := c.Now()
			if _, err := b.Take(ctx, Foreground, start.Add(time.Second), sleep); err != nil {
				t.Fatalf("request once MaxHold has passed: %v, want served at the configured rate", err)
			}
			if _, err := b.Take(ctx, Background, time.Time{}, sleep); err != nil {
				t.Fatalf("refresh once MaxHold has passed: %v, want served", err)
			}
		})
	}
}
