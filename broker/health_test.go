package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"testing"
	"time"
)

// TestSourcesHealth: failed fetches show as failing keys of their source
// (not of another) in SourcesHealth and Backoffs, until their failure
// memory ends; a breaker opened or a
// source in backoff after a bad credential shows too; a source that never failed is
// healthy.
func TestSourcesHealth(t *testing.T) {
	down := &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable}
	badKey := &APIError{Provider: "nuapay", StatusCode: http.StatusUnauthorized}
	tests := []struct {
		name        string
		err         error
		merchants   int
		later       time.Duration // the clock moves on before the report
		wantKeys    int
		wantBreaker BreakerState
		wantHeld    bool
	}{
		{"healthy", nil, 2, 0, 0, BreakerClosed, false},
		{"one key down", down, 1, 0, 1, BreakerClosed, false},
		{"breaker opens", down, 3, 0, 3, BreakerOpen, false},
		{"bad credential puts the source in backoff", badKey, 1, 0, 1, BreakerClosed, true},
		{"failure memory ended", down, 1, time.Hour, 0, BreakerClosed, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			src.set(tt.err)
			other := &scriptedSource{clock: clock, life: time.Hour}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 3})
			for i := range tt.merchants {
				b := NewBinding("s#1", src, Request{Merchant: fmt.Sprintf("m%d", i), Organisation: fmt.Sprint(i), Scopes: []string{"a"}})
				if _, err := br.Token(context.Background(), b); !errors.Is(err, tt.err) {
					t.Fatalf("fetch %d: %v, want %v", i, err, tt.err)
				}
			}
			if _, err := br.Token(context.Background(), NewBinding("o#1", other, Request{Merchant: "x", Scopes: []string{"a"}})); err != nil {
				t.Fatal(err)
			}
			clock.Add(tt.later)
			got := br.SourcesHealth("s#1", "o#1")
			h := got["s#1"]
			if h.FailingKeys != tt.wantKeys || h.Breaker != tt.wantBreaker || !h.BackoffUntil.IsZero() != tt.wantHeld {
				t.Errorf("health %+v, want %d failing keys, breaker %s, source backoff %v", h, tt.wantKeys, tt.wantBreaker, tt.wantHeld)
			}
			if tt.wantKeys > 0 && !errors.Is(h.LastError, tt.err) {
				t.Errorf("last error %v, want %v", h.LastError, tt.err)
			}
			if wantFailing := tt.wantKeys > 0 || tt.wantHeld || tt.wantBreaker != BreakerClosed; h.Failing() != wantFailing {
				t.Errorf("Failing() = %v, want %v", h.Failing(), wantFailing)
			}
			if o := got["o#1"]; o.Failing() {
				t.Errorf("the other source is reported failing: %+v", o)
			}
			if tt.wantHeld && (h.BackoffAt.IsZero() || !h.BackoffAt.Before(h.BackoffUntil)) {
				t.Errorf("source backoff at %s until %s: want its failure's time", h.BackoffAt, h.BackoffUntil)
			}
			// Backoffs visits the same keys, each with its failure, outside
			// the failure policy's lock: visit may call the broker.
			visited := 0
			br.Backoffs(func(b *Binding, err error, at, until time.Time) {
				visited++
				_ = br.SourcesHealth(b.SourceID)
				if b.SourceID != "s#1" || !errors.Is(err, tt.err) || at.After(clock.Now()) || !until.After(clock.Now()) {
					t.Errorf("backoff of %s: %v at %s until %s (now %s)", b.Merchant, err, at, until, clock.Now())
				}
			})
			if visited != tt.wantKeys {
				t.Errorf("Backoffs visited %d keys, want %d", visited, tt.wantKeys)
			}
		})
	}
}

// TestCalled: Called tells a fetch that called the token API, even when
// it left the key in backoff, from one the failure policy refused
// without a call (a key's backoff, a source's, an open breaker).
func TestCalled(t *testing.T) {
	down := &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable}
	badKey := &APIError{Provider: "nuapay", StatusCode: http.StatusUnauthorized}
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 2, FailureTTL: time.Minute})
	fetch := func(merchant string) error {
		_, err := br.Token(context.Background(), NewBinding("s#1", src, Request{Merchant: merchant, Organisation: merchant, Scopes: []string{"a"}}))
		return err
	}
	for _, tt := range []struct {
		name     string
		answer   error
		merchant string
		called   bool
	}{
		{"a token", nil, "m0", true},
		{"a failed call: its key backs off", down, "m1", true},
		{"the key's backoff refuses", nil, "m1", false},
		{"the second failure opens the breaker", down, "m2", true},
		{"the open breaker refuses", nil, "m3", false},
	} {
		src.set(tt.answer)
		if err := fetch(tt.merchant); Called(err) != tt.called {
			t.Errorf("%s: Called(%v) = %v, want %v", tt.name, err, !tt.called, tt.called)
		}
	}
	clock.Add(time.Hour)
	src.set(badKey)
	if err := fetch("m4"); !Called(err) {
		t.Errorf("a refused credential: Called(%v) = false", err)
	}
	if err := fetch("m5"); Called(err) {
		t.Errorf("the source's backoff refuses: Called(%v) = true", err)
	}
}
