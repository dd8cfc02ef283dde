package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// scriptedSource answers every call with err, or a token living life on the
// fake clock when err is nil.
type scriptedSource struct {
	clock *fakeClock
	life  time.Duration
	calls atomic.Int64
	mu    sync.Mutex
	err   error
}

func (s *scriptedSource) set(err error) { s.mu.Lock(); s.err = err; s.mu.Unlock() }

func (s *scriptedSource) Token(_ context.Context, req Request) (Token, error) {
	n := s.calls.Add(1)
	s.mu.Lock()
	err := s.err
	s.mu.Unlock()
	if err != nil {
		return Token{}, err
	}
	now := s.clock.Now()
	return Token{Value: Secret(fmt.Sprintf("tok-%s-%d", req.Merchant, n)), IssuedAt: now, Expiry: now.Add(s.life)}, nil
}

// Classify stands in for the providers' sources: a 401 or OAuth's
// invalid_client refuses the source's credential.
func (s *scriptedSource) Classify(err error) Class {
	var ae *APIError
	if errors.As(err, &ae) && (ae.Code == "invalid_client" || ae.StatusCode == http.StatusUnauthorized) {
		return ClassCredential
	}
	return DefaultClass(err)
}

// settle waits until no refresh-ahead of b's cached entry is in flight, so
// that a scripted sequence of lookups is deterministic. It waits for a
// goroutine, not for time to pass.
func settle(t *testing.T, br *Broker, b *Binding) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		v, ok := br.cache.Get(b.key)
		if !ok || !v.(*Entry).refreshing.Load() {
			return
		}
		if time.Now().After(deadline) {
			t.Fatal("refresh-ahead still in flight after 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

var noSleep = func(context.Context, time.Duration) error { return nil }

// A minute of traffic (a lookup every 100 ms) against a provider that keeps
// failing, foreground (cold key) and refresh-ahead (warm key, in its
// window): the token API is called at most a handful of times, Retry-After
// is honoured, and callers keep getting the same answer.
func TestOnePolicyForEveryCall(t *testing.T) {
	rateLimited := &APIError{Provider: "oauth2", StatusCode: http.StatusTooManyRequests, Code: "slow_down", RetryAfter: 60 * time.Second}
	invalidClient := &APIError{Provider: "oauth2", StatusCode: http.StatusUnauthorized, Code: "invalid_client"}
	down := &APIError{Provider: "oauth2", StatusCode: http.StatusServiceUnavailable}
	tests := []struct {
		name     string
		err      error
		warm     bool // a cached token in its refresh window, valid for the whole minute
		maxCalls int64
	}{
		{"refresh-ahead: 429 Retry-After 60", rateLimited, true, 1},
		{"refresh-ahead: invalid_client", invalidClient, true, 5},
		// 5 fetches of up to 3 attempts each (temporary errors are
		// retried within a fetch).
		{"refresh-ahead: 503", down, true, 15},
		{"foreground: 429 Retry-After 60", rateLimited, false, 1},
		{"foreground: invalid_client", invalidClient, false, 5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: 4000 * time.Second}
			// No breaker: this is about the per-key policy.
			br := New(Options{Now: clock.Now, Sleep: noSleep, BreakerThreshold: -1})
			b := NewBinding("bank#1", src, Request{Merchant: "acme", Scopes: []string{"accounts"}})
			ctx := context.Background()
			if tt.warm {
				e, _, err := br.Get(ctx, b)
				if err != nil {
					t.Fatal(err)
				}
				clock.Add(e.RefreshAt().Sub(clock.Now())) // planned at most 3900 s: 100 s left
			}
			src.set(tt.err)
			before := src.calls.Load()
			for i := range 600 {
				e, _, err := br.Get(ctx, b)
				if tt.warm {
					if err != nil || e.Token().Value.Reveal() != "tok-acme-1" {
						t.Fatalf("lookup %d: %v, want the cached token", i, err)
					}
				} else if !errors.Is(err, tt.err) {
					t.Fatalf("lookup %d: %v, want %v", i, err, tt.err)
				}
				settle(t, br, b)
				clock.Add(100 * time.Millisecond)
			}
			if got := src.calls.Load() - before; got < 1 || got > tt.maxCalls {
				t.Fatalf("token API calls in a minute = %d, want 1..%d", got, tt.maxCalls)
			}
		})
	}
}

// A failed refresh-ahead does not suspend the next one when the clock goes
// back: the key's backoff lasts only between the failure and its end.
func TestBackwardClockJumpDoesNotSuspendRefresh(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: -1})
	b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})
	ctx := context.Background()
	e, _, err := br.Get(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	clock.Add(e.RefreshAt().Sub(clock.Now()) + time.Minute) // planned before 58.5 min
	src.set(&APIError{Provider: "nuapay", StatusCode: 503})
	br.Get(ctx, b) // starts the refresh, which fails
	settle(t, br, b)
	if got := src.calls.Load(); got != 2 {
		t.Fatalf("calls %d, want 2", got)
	}
	src.set(nil)
	clock.Add(-30 * time.Second) // NTP steps the clock back; still past the planned refresh
	br.Get(ctx, b)
	settle(t, br, b)
	if got := src.calls.Load(); got != 3 {
		t.Fatalf("calls %d after the clock went back, want 3 (the refresh is not suspended)", got)
	}
	if tok, _ := br.Token(ctx, b); tok.Value.Reveal() != "tok-acme-3" {
		t.Fatalf("token %s, want the refreshed tok-acme-3", tok.Value.Reveal())
	}
}

// The observer is told a key backs off once, when its memory starts, and
// that it stops once, when a success, ForgetFailures or the sweep ends it.
func TestBackingOffAlternates(t *testing.T) {
	down := &APIError{Provider: "nuapay", StatusCode: 503}
	tests := []struct {
		name string
		end  func(br *Broker, src *scriptedSource, b *Binding, clock *fakeClock)
	}{
		{"success", func(br *Broker, src *scriptedSource, b *Binding, clock *fakeClock) {
			src.set(nil)
			clock.Add(time.Hour)
			br.Token(context.Background(), b)
		}},
		{"ForgetFailures", func(br *Broker, _ *scriptedSource, _ *Binding, _ *fakeClock) {
			br.ForgetFailures(func(error) bool { return true })
		}},
		{"sweep", func(br *Broker, _ *scriptedSource, _ *Binding, clock *fakeClock) {
			clock.Add(DefaultFailureMax + 2*cleanupInterval)
			br.Token(context.Background(), NewBinding("other", &scriptedSource{clock: clock, life: time.Hour}, Request{Merchant: "x"}))
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			src.set(down)
			obs := &breakerLog{}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: -1})
			b := NewBinding("s", src, Request{Merchant: "acme"})
			b.Observer = obs
			for range 3 {
				br.Token(context.Background(), b)
				clock.Add(10 * time.Second) // past each memory: three failures in a row
			}
			tt.end(br, src, b, clock)
			obs.mu.Lock()
			defer obs.mu.Unlock()
			if obs.backoff[true] != 1 || obs.backoff[false] != 1 {
				t.Fatalf("BackingOff calls %v, want one true and one false", obs.backoff)
			}
		})
	}
}

// Failure memory and breakers keyed by source ID (a new ID per config
// change) are dropped once unused, so they do not grow with reloads.
func TestPolicyStateIsBounded(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	src.set(&APIError{Provider: "nuapay", StatusCode: 503})
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1})
	ctx := context.Background()
	for i := range 100 {
		b := NewBinding(fmt.Sprintf("nuapay#%d", i), src, Request{Merchant: "acme", Scopes: []string{"a"}})
		if _, err := br.Token(ctx, b); err == nil {
			t.Fatal("want a failure")
		}
		clock.Add(time.Second)
	}
	count := func() (keys, sources int) {
		br.pol.mu.Lock()
		defer br.pol.mu.Unlock()
		return len(br.pol.keys), len(br.pol.sources)
	}
	if f, b := count(); f != 100 || b != 100 {
		t.Fatalf("%d failures and %d breakers, want 100 of each", f, b)
	}
	clock.Add(DefaultFailureMax + 2*cleanupInterval)
	src.set(nil)
	b := NewBinding("nuapay#new", src, Request{Merchant: "acme", Scopes: []string{"a"}})
	if _, err := br.Token(ctx, b); err != nil {
		t.Fatal(err)
	}
	if f, b := count(); f != 0 || b > 1 {
		t.Fatalf("%d failures and %d breakers left, want 0 and at most 1", f, b)
	}
}

// breakerLog records fetches and breaker changes.
type breakerLog struct {
	nopObserver
	mu      sync.Mutex
	fetched int
	states  []BreakerState
	backoff map[bool]int
}

func (o *breakerLog) Lookup(*Binding, Result) {}
func (o *breakerLog) Fetched(context.Context, *Binding, Token, time.Duration, bool, error) {
	o.mu.Lock()
	o.fetched++
	o.mu.Unlock()
}
func (o *breakerLog) BreakerChanged(_ string, s BreakerState) {
	o.mu.Lock()
	o.states = append(o.states, s)
	o.mu.Unlock()
}
func (o *breakerLog) BackingOff(_ *Binding, on bool) {
	o.mu.Lock()
	if o.backoff == nil {
		o.backoff = map[bool]int{}
	}
	o.backoff[on]++
	o.mu.Unlock()
}

// The breaker opening mid-retry: each call is reported once, the caller's
// error still carries the provider's answer, the cooldown is the configured
// one whatever Retry-After said, and half-open is reported.
func TestBreakerOpeningMidRetry(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	src.set(&APIError{Provider: "nuapay", StatusCode: 503})
	obs := &breakerLog{}
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 3, BreakerThreshold: 2, BreakerCooldown: 10 * time.Second})
	ctx := context.Background()
	bind := func(m string) *Binding {
		b := NewBinding("s", src, Request{Merchant: m, Organisation: m, Scopes: []string{"a"}})
		b.Observer = obs
		return b
	}
	_, err := br.Token(ctx, bind("acme"))
	var ue *UnavailableError
	var ae *APIError
	if !errors.As(err, &ue) || !errors.As(err, &ae) || ae.StatusCode != 503 {
		t.Fatalf("err %v: want an UnavailableError wrapping the 503", err)
	}
	if ue.RetryAfter != 10*time.Second {
		t.Fatalf("breaker retry after %s, want the 10s cooldown", ue.RetryAfter)
	}
	if calls := src.calls.Load(); calls != 2 || obs.fetched != 2 {
		t.Fatalf("%d calls, %d reported; want 2 and 2", calls, obs.fetched)
	}
	// After the cooldown another key's fetch is the probe.
	clock.Add(11 * time.Second)
	src.set(nil)
	if _, err := br.Token(ctx, bind("globex")); err != nil {
		t.Fatalf("probe after the cooldown: %v", err)
	}
	// A Retry-After of an hour opens the breaker for the cooldown only
	// (the hour is kept in the failing keys' memory).
	src.set(&APIError{Provider: "nuapay", StatusCode: 503, RetryAfter: time.Hour})
	for _, m := range []string{"m1", "m2"} {
		br.Token(ctx, bind(m))
	}
	clock.Add(11 * time.Second)
	src.set(nil)
	if _, err := br.Token(ctx, bind("m3")); err != nil {
		t.Fatalf("probe after the cooldown, despite Retry-After 1h: %v", err)
	}
	if _, err := br.Token(ctx, bind("m1")); !errors.As(err, &ae) || ae.RetryAfter != time.Hour {
		t.Fatalf("m1: %v, want its remembered 503 with Retry-After", err)
	}
	want := []BreakerState{BreakerOpen, BreakerHalfOpen, BreakerClosed, BreakerOpen, BreakerHalfOpen, BreakerClosed}
	if fmt.Sprint(obs.states) != fmt.Sprint(want) {
		t.Fatalf("breaker changes %v, want %v", obs.states, want)
	}
	if obs.backoff[true] != 3 {
		t.Fatalf("backing off reported %v, want three keys on", obs.backoff)
	}
}

// The requested lifetime is part of the cache key.
func TestLifetimeKeysTheCache(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now})
	get := func(life time.Duration) string {
		tok, err := br.Token(context.Background(), NewBinding("s", src, Request{Merchant: "acme", Organisation: "o", Scopes: []string{"a"}, Lifetime: life}))
		if err != nil {
			t.Fatal(err)
		}
		return tok.Value.Reveal()
	}
	short, long, longAgain := get(10*time.Second), get(time.Hour), get(time.Hour)
	if short == long || long != longAgain || src.calls.Load() != 2 {
		t.Fatalf("tokens %s %s %s after %d calls: want one per lifetime", short, long, longAgain, src.calls.Load())
	}
}

// fixedClass is a source that classifies every error as class.
type fixedClass struct {
	*scriptedSource
	class Class
}

func (s fixedClass) Classify(error) Class { return s.class }

// The source's class of an error, not its shape, decides retries, the
// breaker and the source backoff: the same 503 is retried and opens the
// breaker as temporary, is tried once per memory as permanent, and puts
// the whole source in backoff as a refused credential.
func TestSourceClassGovernsThePolicy(t *testing.T) {
	down := &APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable}
	tests := []struct {
		name        string
		class       Class
		wantCalls   int64 // one fetch of each of 3 keys
		wantBreaker BreakerState
		wantHeld    bool
	}{
		{"temporary", ClassTemporary, 4, BreakerOpen, false}, // 2 attempts twice, then the breaker refuses
		{"permanent", ClassPermanent, 3, BreakerClosed, false},
		{"rate limited", ClassRateLimited, 1, BreakerClosed, true}, // with or without Retry-After, a 429 holds the source; without one it is not retried
		{"credential", ClassCredential, 1, BreakerClosed, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			src.set(down)
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 2, BreakerThreshold: 4})
			for i := range 3 {
				b := NewBinding("custom#1", fixedClass{src, tt.class}, Request{Merchant: fmt.Sprint("m", i), Organisation: fmt.Sprint(i)})
				if _, err := br.Token(context.Background(), b); !errors.Is(err, down) {
					t.Fatalf("fetch %d: %v, want the 503", i, err)
				}
			}
			until := br.SourceHealth("custom#1").BackoffUntil
			if got := src.calls.Load(); got != tt.wantCalls || br.SourceHealth("custom#1").Breaker != tt.wantBreaker || until.IsZero() == tt.wantHeld {
				t.Fatalf("calls %d, breaker %s, source backoff until %v; want %d, %s, backoff %v",
					got, br.SourceHealth("custom#1").Breaker, until, tt.wantCalls, tt.wantBreaker, tt.wantHeld)
			}
		})
	}
}

// orderLog records, in order, the breaker changes, source backoffs and
// fetches told to an observer.
type orderLog struct {
	nopObserver
	mu     sync.Mutex
	events []string
}

func (o *orderLog) add(ev string) { o.mu.Lock(); o.events = append(o.events, ev); o.mu.Unlock() }

func (o *orderLog) Lookup(*Binding, Result) {}
func (o *orderLog) Fetched(context.Context, *Binding, Token, time.Duration, bool, error) {
	o.add("fetched")
}
func (o *orderLog) BreakerChanged(_ string, s BreakerState) { o.add("breaker " + s.String()) }
func (o *orderLog) SourceBackingOff(_ string, on bool)      { o.add(fmt.Sprint("source backoff ", on)) }

// A half-open breaker's probe answered 429 closes the breaker and starts
// the source's backoff: the observer hears the backoff first, then the
// breaker's change with the call's Fetched, so that it never sees the
// source recovered in between.
func TestThrottledProbeToldAfterBackoff(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	src.set(&APIError{Provider: "nuapay", StatusCode: 503})
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: 10 * time.Second})
	defer br.Close()
	obs := &orderLog{}
	b := NewBinding("s", src, Request{Merchant: "acme", Organisation: "acme"})
	b.Observer = obs
	ctx := context.Background()
	br.Token(ctx, b) // the 503 opens the breaker
	clock.Add(time.Minute)
	src.set(&APIError{Provider: "nuapay", StatusCode: 429, RetryAfter: 30 * time.Second})
	obs.mu.Lock()
	obs.events = nil
	obs.mu.Unlock()
	probe := NewBinding("s", src, Request{Merchant: "globex", Organisation: "globex"})
	probe.Observer = obs
	if _, err := br.Token(ctx, probe); err == nil {
		t.Fatal("the probe succeeded, want its 429")
	}
	want := []string{"breaker half-open", "source backoff true", "breaker closed", "fetched"}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if !slices.Equal(obs.events, want) {
		t.Fatalf("events %q, want %q", obs.events, want)
	}
}

// A negative BreakerThreshold disables the breaker: a source failing for
// many keys in a row is still called for each, and its breaker stays
// closed.
func TestBreakerDisabled(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	src.set(&APIError{Provider: "nuapay", StatusCode: 503})
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: -1})
	defer br.Close()
	obs := &breakerLog{}
	for i := range 3 * DefaultBreakerThreshold {
		b := NewBinding("s", src, Request{Merchant: fmt.Sprint("m", i), Organisation: fmt.Sprint(i)})
		b.Observer = obs
		br.Token(context.Background(), b)
	}
	if got := src.calls.Load(); got != 3*DefaultBreakerThreshold {
		t.Fatalf("%d calls, want one per key (%d)", got, 3*DefaultBreakerThreshold)
	}
	obs.mu.Lock()
	defer obs.mu.Unlock()
	if h := br.SourceHealth("s"); h.Breaker != BreakerClosed || len(obs.states) != 0 {
		t.Fatalf("breaker %s, changes told %v; want closed, none", h.Breaker, obs.states)
	}
}

// A call let through while the breaker was closed that ends telling
// nothing (cancelled) after the breaker opened and let its probe out does
// not free the probe's place: the half-open breaker still lets one call
// through at a time.
func TestUnknownOutcomeKeepsTheProbe(t *testing.T) {
	clock := newFakeClock()
	enteredX, releaseX := make(chan struct{}), make(chan struct{})
	enteredZ, releaseZ := make(chan struct{}), make(chan struct{})
	var wCalls atomic.Int64
	src := SourceFunc(func(_ context.Context, req Request) (Token, error) {
		now := clock.Now()
		switch req.Merchant {
		case "x":
			close(enteredX)
			<-releaseX
			return Token{}, context.Canceled
		case "y":
			return Token{}, &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable}
		case "z":
			close(enteredZ)
			<-releaseZ
		case "w":
			wCalls.Add(1)
		}
		return Token{Value: Secret("tok-" + req.Merchant), Expiry: now.Add(time.Hour)}, nil
	})
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: 10 * time.Second})
	binding := func(m string) *Binding {
		return NewBinding("nuapay#1", src, Request{Merchant: m, Organisation: "org-" + m})
	}
	ctx := context.Background()
	doneX, doneZ := make(chan error, 1), make(chan error, 1)
	go func() { _, _, err := br.Get(ctx, binding("x")); doneX <- err }()
	<-enteredX
	if _, _, err := br.Get(ctx, binding("y")); err == nil {
		t.Fatal("y: want the 503")
	}
	clock.Add(10 * time.Second)
	go func() { _, _, err := br.Get(ctx, binding("z")); doneZ <- err }()
	<-enteredZ // the half-open breaker's probe is out
	close(releaseX)
	<-doneX
	_, _, err := br.Get(ctx, binding("w"))
	var ue *UnavailableError
	if !errors.As(err, &ue) || wCalls.Load() != 0 {
		t.Errorf("w: %v after %d calls; want refused while the probe is out", err, wCalls.Load())
	}
	close(releaseZ)
	if err := <-doneZ; err != nil {
		t.Fatalf("the probe: %v", err)
	}
}

// TestRefusedWhileProbeOut: a key refused because another key's fetch
// holds the half-open breaker's probe is called as soon as the probe's
// answer closed the breaker: the refusal told nothing about the key nor
// the provider, and the key does not remember it.
func TestRefusedWhileProbeOut(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: 10 * time.Second})
	defer br.Close()
	binding := func(m string) *Binding {
		return NewBinding("nuapay#1", src, Request{Merchant: m, Organisation: "org-" + m})
	}
	ctx := context.Background()
	down := &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable}
	src.set(nil, down)
	if _, err := br.Token(ctx, binding("x")); !errors.Is(err, down) || br.SourceHealth("nuapay#1").Breaker != BreakerOpen {
		t.Fatalf("x: %v, breaker %s; want the 503 and the breaker open", err, br.SourceHealth("nuapay#1").Breaker)
	}
	clock.Add(10 * time.Second)
	gate := make(chan struct{})
	src.set(gate, nil)
	probe := make(chan error, 1)
	go func() {
		_, err := br.Token(ctx, binding("y"))
		probe <- err
	}()
	waitUntil(t, func() bool { return src.calls.Load() == 2 }) // the probe is out
	w := binding("w")
	var ue *UnavailableError
	if _, err := br.Token(ctx, w); !errors.As(err, &ue) || src.calls.Load() != 2 {
		t.Fatalf("w while the probe is out: %v after %d calls, want refused by the breaker", err, src.calls.Load())
	}
	close(gate)
	if err := <-probe; err != nil || br.SourceHealth("nuapay#1").Breaker != BreakerClosed {
		t.Fatalf("the probe: %v, breaker %s; want a token and the breaker closed", err, br.SourceHealth("nuapay#1").Breaker)
	}
	if _, err := br.Token(ctx, w); err != nil || src.calls.Load() != 3 {
		t.Fatalf("w once the breaker closed: %v after %d calls, want a token of its own call", err, src.calls.Load())
	}
}

func TestDoubled(t *testing.T) {
	const huge = time.Duration(1<<63 - 1)
	for _, c := range []struct {
		base, limit time.Duration
		n           int
		want        time.Duration
	}{
		{2 * time.Second, time.Minute, 0, 2 * time.Second},
		{2 * time.Second, time.Minute, 1, 2 * time.Second},
		{2 * time.Second, time.Minute, 3, 8 * time.Second},
		{2 * time.Second, time.Minute, 5, 32 * time.Second},
		{2 * time.Second, time.Minute, 6, time.Minute},
		{2 * time.Second, time.Minute, 200, time.Minute},
		{time.Hour, time.Minute, 1, time.Minute},
		{time.Hour, huge, 100, huge},
		{time.Nanosecond, huge, 62, 1 << 61},
		{time.Nanosecond, huge, 200, huge},
	} {
		if got := doubled(c.base, c.limit, c.n); got != c.want {
			t.Errorf("doubled(%v, %v, %d) = %v, want %v", c.base, c.limit, c.n, got, c.want)
		}
	}
}
