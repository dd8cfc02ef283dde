package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"testing"
	"time"
)

// A 429 with Retry-After throttles the source's API key, and a bad
// credential fails every organisation: with 50 keys of one source and a
// lookup every 100 ms for a minute (refresh-ahead and cold keys alike),
// the source is called once for the 429 and a handful of times for the
// bad credential. A Nuapay 403 (one organisation) stays per key, and so does
// any error of a source that does not classify it as its credential's.
func TestSourceBackoffAcrossKeys(t *testing.T) {
	tests := []struct {
		name     string
		err      error
		warm     bool
		maxCalls int64
		minCalls int64
		plain    bool // the source does not classify its errors
	}{
		{"429 Retry-After 60", &APIError{Provider: "nuapay", StatusCode: http.StatusTooManyRequests, RetryAfter: 60 * time.Second}, false, 1, 1, false},
		{"429 Retry-After 60, refresh-ahead", &APIError{Provider: "oauth2", StatusCode: http.StatusTooManyRequests, Code: "slow_down", RetryAfter: 60 * time.Second}, true, 1, 1, false},
		{"invalid_client", &APIError{Provider: "oauth2", StatusCode: http.StatusUnauthorized, Code: "invalid_client"}, false, 6, 1, false},
		{"Nuapay 401", &APIError{Provider: "nuapay", StatusCode: http.StatusUnauthorized}, true, 6, 1, false},
		{"Nuapay 403 stays per key", &APIError{Provider: "nuapay", StatusCode: http.StatusForbidden}, false, 1000, 50, false},
		// The core knows no provider's codes: only the source says its
		// credential was refused.
		{"invalid_client from a source that does not classify stays per key", &APIError{Provider: "oauth2", StatusCode: http.StatusUnauthorized, Code: "invalid_client"}, false, 1000, 50, true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: 400 * time.Second}
			br := New(Options{Now: clock.Now, Sleep: noSleep})
			var source Source = src
			if tt.plain {
				source = SourceFunc(src.Token)
			}
			var bs []*Binding
			for i := range 50 {
				bs = append(bs, NewBinding("nuapay#1", source, Request{Merchant: fmt.Sprint("m", i), Organisation: fmt.Sprint("org", i)}))
			}
			if tt.warm {
				for _, b := range bs {
					if _, _, err := br.Get(context.Background(), b); err != nil {
						t.Fatal(err)
					}
				}
				clock.Add(350 * time.Second) // every key in its refresh window
				src.calls.Store(0)
			}
			src.set(tt.err)
			for i := range 600 {
				b := bs[i%len(bs)]
				br.Get(context.Background(), b)
				settle(t, br, b)
				clock.Add(100 * time.Millisecond)
			}
			got := src.calls.Load()
			t.Logf("%d calls in a minute", got)
			if got > tt.maxCalls || got < tt.minCalls {
				t.Errorf("calls = %d, want %d..%d", got, tt.minCalls, tt.maxCalls)
			}
		})
	}
}

// The backoff shows in Policy and SourceHealth, and a success ends it.
func TestSourceBackoffVisibleAndForgotten(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: 400 * time.Second}
	br := New(Options{Now: clock.Now, Sleep: noSleep})
	a := NewBinding("nuapay#1", src, Request{Merchant: "a", Organisation: "oa"})
	bb := NewBinding("nuapay#1", src, Request{Merchant: "b", Organisation: "ob"})
	e, _, err := br.Get(context.Background(), a)
	if err != nil {
		t.Fatal(err)
	}
	src.set(&APIError{Provider: "nuapay", StatusCode: http.StatusTooManyRequests, RetryAfter: 30 * time.Second})
	if _, _, err := br.Get(context.Background(), bb); err == nil {
		t.Fatal("want the 429")
	}
	h := br.SourceHealth("nuapay#1")
	until := h.BackoffUntil
	if h.BackoffError == nil || !until.Equal(clock.Now().Add(30*time.Second)) {
		t.Fatalf("SourceHealth = %v, %v", until, h.BackoffError)
	}
	if p := br.Policy(e); !p.SourceBackoffUntil.Equal(until) {
		t.Fatalf("Policy.SourceBackoffUntil = %v, want %v", p.SourceBackoffUntil, until)
	}
	src.set(nil)
	clock.Add(31 * time.Second)
	if _, _, err := br.Get(context.Background(), bb); err != nil {
		t.Fatal(err)
	}
	if until := br.SourceHealth("nuapay#1").BackoffUntil; !until.IsZero() {
		t.Fatal("the source backoff outlived a success")
	}
}

// A caller is told the backoff the policy actually applies, not the
// provider's Retry-After: a 429 asking for a day puts the source in
// backoff for MaxRetryAfterMemory, and RetryAfterOf says so, then what is
// left of it; a refusal without Retry-After says how long the key's
// backoff lasts.
func TestRetryAfterIsTheBackoffApplied(t *testing.T) {
	day := 24 * time.Hour
	tests := []struct {
		name  string
		err   error
		later time.Duration // a second lookup this much later
		first time.Duration // RetryAfterOf the first failure
		then  time.Duration // ... and of the second lookup's
	}{
		{"429 Retry-After a day", &APIError{Provider: "nuapay", StatusCode: http.StatusTooManyRequests, RetryAfter: day},
			4 * time.Minute, MaxRetryAfterMemory, MaxRetryAfterMemory - 4*time.Minute},
		{"429 Retry-After an hour (the parse cap)", &APIError{Provider: "oauth2", StatusCode: http.StatusTooManyRequests, RetryAfter: time.Hour},
			9 * time.Minute, MaxRetryAfterMemory, time.Minute},
		{"429 Retry-After 30s", &APIError{Provider: "nuapay", StatusCode: http.StatusTooManyRequests, RetryAfter: 30 * time.Second},
			10 * time.Second, 30 * time.Second, 20 * time.Second},
		{"503 without Retry-After: the key's memory", &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable},
			time.Second, DefaultFailureTTL, DefaultFailureTTL - time.Second},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1})
			b := NewBinding("nuapay#1", src, Request{Merchant: "m", Organisation: "o"})
			src.set(tt.err)
			_, _, err := br.Get(context.Background(), b)
			if got := RetryAfterOf(err); got != tt.first {
				t.Fatalf("first failure: RetryAfterOf = %s, want %s (%v)", got, tt.first, err)
			}
			if !errors.Is(err, tt.err) {
				t.Fatalf("the error %v does not wrap the provider's %v", err, tt.err)
			}
			clock.Add(tt.later)
			_, _, err = br.Get(context.Background(), b)
			if got := RetryAfterOf(err); got != tt.then {
				t.Fatalf("%s later: RetryAfterOf = %s, want %s", tt.later, got, tt.then)
			}
			if n := src.calls.Load(); n != 1 {
				t.Fatalf("token API calls = %d, want 1 (in backoff)", n)
			}
		})
	}
}

// A source backoff that another key starts while a fetch waits between
// its attempts refuses that fetch's next attempt too: a retry is a call
// to the token API like any other. Each case starts the source backoff
// in the wait after key a's first 503, from key b's fetch.
func TestSourceBackoffRefusesRetries(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error // key b's failure
	}{
		{"429 Retry-After 60", &APIError{Provider: "nuapay", StatusCode: http.StatusTooManyRequests, RetryAfter: 60 * time.Second}},
		{"refused credential", &APIError{Provider: "nuapay", StatusCode: http.StatusUnauthorized}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			var calls []string
			unavailable := &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable}
			src := &classifiedSource{SourceFunc(func(_ context.Context, req Request) (Token, error) {
				calls = append(calls, req.Merchant)
				if req.Merchant == "b" {
					return Token{}, tt.err
				}
				return Token{}, unavailable
			})}
			a := NewBinding("nuapay#1", src, Request{Merchant: "a", Organisation: "oa"})
			bb := NewBinding("nuapay#1", src, Request{Merchant: "b", Organisation: "ob"})
			var br *Broker
			waits := 0
			br = New(Options{Now: clock.Now, Sleep: func(context.Context, time.Duration) error {
				if waits++; waits == 1 {
					br.Get(context.Background(), bb)
				}
				return nil
			}})
			_, _, err := br.Get(context.Background(), a)
			if want := []string{"a", "b"}; !slices.Equal(calls, want) {
				t.Fatalf("token API calls %v, want %v: key a's retry ignored the source backoff", calls, want)
			}
			if scope, ok := BackoffOf(err); !ok || !scope.Source() || RetryAfterOf(err) <= 0 {
				t.Fatalf("error %v: backoff %+v %t, Retry-After %s; want the source's", err, scope, ok, RetryAfterOf(err))
			}
			if !errors.Is(err, unavailable) {
				t.Fatalf("error %v does not wrap key a's own failure", err)
			}
		})
	}
}

// classifiedSource is a source whose errors scriptedSource's Classify
// classifies (a 401 refuses its credential).
type classifiedSource struct{ SourceFunc }

// Classify implements Classifier.
func (classifiedSource) Classify(err error) Class { return (*scriptedSource)(nil).Classify(err) }
