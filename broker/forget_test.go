package broker

import (
	"context"
	"errors"
	"net/http"
	"slices"
	"testing"
	"time"
)

// TestForgetFailures: a remembered failure answers lookups until it is
// forgotten; then the next lookup fetches at once. Others stay remembered.
func TestForgetFailures(t *testing.T) {
	clock := newFakeClock()
	br := New(Options{Now: clock.Now, FailureTTL: time.Minute})
	fails := func(merchant string) (*countingSource, *Binding, error) {
		err := &RequestError{Merchant: merchant, Field: "refresh_token", Reason: "no refresh token is stored"}
		src := &countingSource{clock: clock, life: time.Hour}
		src.set(nil, err)
		return src, NewBinding("s-"+merchant, src, Request{Merchant: merchant}), err
	}
	acmeSrc, acme, acmeErr := fails("acme")
	_, globex, globexErr := fails("globex")
	for _, c := range []struct {
		b   *Binding
		err error
	}{{acme, acmeErr}, {globex, globexErr}, {acme, acmeErr}} {
		if _, err := br.Token(context.Background(), c.b); !errors.Is(err, c.err) {
			t.Fatalf("Token = %v", err)
		}
	}
	if got := acmeSrc.calls.Load(); got != 1 {
		t.Fatalf("%d fetches for acme, want 1 (the second lookup is answered from memory)", got)
	}
	acmeSrc.set(nil, nil)
	n := br.ForgetFailures(func(err error) bool {
		var re *RequestError
		return errors.As(err, &re) && re.Merchant == "acme"
	})
	if n != 1 {
		t.Fatalf("forgot %d failures, want 1", n)
	}
	if _, err := br.Token(context.Background(), acme); err != nil {
		t.Fatalf("Token after forgetting = %v", err)
	}
	if _, err := br.Token(context.Background(), globex); !errors.Is(err, globexErr) {
		t.Fatalf("globex's failure was forgotten too: %v", err)
	}
}

// After invalid_client an operator rotates the key and reloads: the source
// ID stays, and ForgetSource drops the key's memory, the source's backoff and
// its breaker, so the next Get calls the new source.
func TestForgetSourceAfterRotation(t *testing.T) {
	clock := newFakeClock()
	bad := &scriptedSource{clock: clock, life: 400 * time.Second}
	bad.set(&APIError{Provider: "nuapay", StatusCode: http.StatusUnauthorized, Code: "invalid_client"})
	br := New(Options{Now: clock.Now, Sleep: noSleep})
	for range 4 {
		br.Get(context.Background(), NewBinding("nuapay#abc", bad, Request{Merchant: "m", Organisation: "o"}))
		clock.Add(time.Second)
	}
	other := NewBinding("nuapay#other", bad, Request{Merchant: "x", Organisation: "o"})
	br.Get(context.Background(), other)
	if n := br.ForgetSource("nuapay#abc"); n != 1 {
		t.Fatalf("ForgetSource dropped %d key failures, want 1", n)
	}
	good := &scriptedSource{clock: clock, life: 400 * time.Second}
	if _, _, err := br.Get(context.Background(), NewBinding("nuapay#abc", good, Request{Merchant: "m", Organisation: "o"})); err != nil {
		t.Fatalf("after ForgetSource: %v", err)
	}
	if good.calls.Load() != 1 {
		t.Fatalf("calls to the new source = %d, want 1", good.calls.Load())
	}
	if until := br.SourceHealth("nuapay#other").BackoffUntil; until.IsZero() {
		t.Fatal("another source's backoff was forgotten")
	}
}

// An open breaker that the policy forgets (ForgetSource after a rotation,
// or the sweep of an idle source) is told closed to the observer that saw
// it open, as SourceHealth then says: the gauge and the operator's view
// do not keep it open while the source is called again.
func TestForgottenOpenBreakerToldClosed(t *testing.T) {
	for _, tt := range []struct {
		name   string
		forget func(br *Broker, clock *fakeClock)
	}{
		{"ForgetSource", func(br *Broker, _ *fakeClock) { br.ForgetSource("nuapay#1") }},
		{"sweep", func(br *Broker, clock *fakeClock) {
			clock.Add(DefaultFailureMax + 2*cleanupInterval)
			br.pol.maybeSweep(clock.Now())
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			src.set(&APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable})
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1})
			obs := &breakerLog{}
			b := NewBinding("nuapay#1", src, Request{Merchant: "m", Organisation: "o"})
			b.Observer = obs
			br.Get(context.Background(), b)
			if got := br.SourceHealth("nuapay#1").Breaker; got != BreakerOpen {
				t.Fatalf("breaker %v, want open", got)
			}
			tt.forget(br, clock)
			if got := br.SourceHealth("nuapay#1").Breaker; got != BreakerClosed {
				t.Fatalf("breaker %v after it was forgotten, want closed", got)
			}
			obs.mu.Lock()
			defer obs.mu.Unlock()
			if want := []BreakerState{BreakerOpen, BreakerClosed}; !slices.Equal(obs.states, want) {
				t.Fatalf("observer told %v, want %v", obs.states, want)
			}
		})
	}
}
