package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// retryNowSource answers its calls with answers in turn (nil: a token)
// and classifies its nonce answer ClassRetryNow, as a DPoP source does a
// nonce challenge that brought a new nonce.
type retryNowSource struct {
	clock   *fakeClock
	nonce   error
	mu      sync.Mutex
	answers []error
	calls   int
}

func (s *retryNowSource) Token(context.Context, Request) (Token, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	err := s.answers[s.calls]
	s.calls++
	if err != nil {
		return Token{}, err
	}
	return Token{Value: "tok", IssuedAt: s.clock.Now(), Expiry: s.clock.Now().Add(time.Hour)}, nil
}

func (s *retryNowSource) Classify(err error) Class {
	if errors.Is(err, s.nonce) {
		return ClassRetryNow
	}
	return DefaultClass(err)
}

func (s *retryNowSource) called() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.calls
}

// An answer classified ClassRetryNow is sent again at once within its
// attempt: without a backoff's sleep, not counted as an attempt, by the
// breaker nor by the failure memory, every call taking budget and told to
// the observers (the answer asking for it as a *RetryNowError); the same
// answer to the call sent again is a temporary failure.
func TestRetryNowSentAgainAtOnce(t *testing.T) {
	nonce := &APIError{Provider: "custom", StatusCode: http.StatusBadRequest, Code: "use_dpop_nonce"}
	down := &APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable}
	for _, tt := range []struct {
		name      string
		answers   []error
		wantErr   error
		wantCalls int
		sleeps    int
		breaker   BreakerState
	}{
		{"a token after the second call", []error{nonce, nil}, nil, 2, 0, BreakerClosed},
		{"each attempt sent again once", []error{nonce, down, nonce, nil}, nil, 4, 1, BreakerClosed},
		{"the same answer again is temporary", []error{nonce, nonce, nonce, nonce}, nonce, 4, 1, BreakerOpen},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &retryNowSource{clock: clock, nonce: nonce, answers: tt.answers}
			sleeps := 0
			sleep := func(context.Context, time.Duration) error { sleeps++; return nil }
			br := New(Options{Now: clock.Now, Sleep: sleep, MaxAttempts: 2, BreakerThreshold: 2})
			defer br.Close()
			p := NewProfile("custom#1", src, nil, "", 0)
			p.Budget = budget.New("custom", budget.Limit{Rate: 100, Burst: 20, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
			b := NewBindingFor(p, "acme", "1")
			obs := &fetchLog{}
			b.Observer = obs
			_, err := br.Token(context.Background(), b)
			if !errors.Is(err, tt.wantErr) || tt.wantErr == nil && err != nil {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			h := br.SourcesHealth("custom#1")["custom#1"]
			if src.called() != tt.wantCalls || sleeps != tt.sleeps || h.Breaker != tt.breaker || (h.FailingKeys > 0) != (tt.wantErr != nil) {
				t.Errorf("%d calls, %d sleeps, breaker %s, %d failing keys; want %d, %d, %s, failing %t",
					src.called(), sleeps, h.Breaker, h.FailingKeys, tt.wantCalls, tt.sleeps, tt.breaker, tt.wantErr != nil)
			}
			if used := p.Budget.State().Used; used != uint64(tt.wantCalls) {
				t.Errorf("budget used %d, want %d: one per call", used, tt.wantCalls)
			}
			obs.mu.Lock()
			defer obs.mu.Unlock()
			if len(obs.fetches) != 1 || len(obs.fetches[0].Attempts) != tt.wantCalls || len(obs.calls) != tt.wantCalls+1 {
				t.Fatalf("observer told %v, fetches %d; want every call and one fetch with %d attempts", obs.calls, len(obs.fetches), tt.wantCalls)
			}
			// Each attempt's first call was answered ClassRetryNow: it is
			// told as no failure, a *RetryNowError with the answer; the
			// call sent again as it ended.
			for i, a := range obs.fetches[0].Attempts {
				if IsRetryNow(a.Err) != (i%2 == 0) || !errors.Is(a.Err, tt.answers[i]) || tt.answers[i] == nil && a.Err != nil {
					t.Errorf("call %d told %v; want %v, as a RetryNowError: %t", i+1, a.Err, tt.answers[i], i%2 == 0)
				}
			}
		})
	}
}

// A half-open breaker's probe answered ClassRetryNow stays the probe for
// the call sent again, whose outcome decides the breaker.
func TestRetryNowKeepsTheProbe(t *testing.T) {
	nonce := &APIError{Provider: "custom", StatusCode: http.StatusBadRequest, Code: "use_dpop_nonce"}
	down := &APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable}
	for _, last := range []error{nil, down} {
		t.Run(fmt.Sprint("then ", last), func(t *testing.T) {
			clock := newFakeClock()
			src := &retryNowSource{clock: clock, nonce: nonce, answers: []error{down, nonce, last}}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: time.Second, FailureTTL: -1})
			defer br.Close()
			b := NewBinding("custom#1", src, Request{Merchant: "acme", Organisation: "1"})
			if _, err := br.Token(context.Background(), b); !errors.Is(err, down) || br.SourceHealth("custom#1").Breaker != BreakerOpen {
				t.Fatalf("first fetch: %v, breaker %s; want the 503, open", err, br.SourceHealth("custom#1").Breaker)
			}
			clock.Add(2 * time.Second)
			_, err := br.Token(context.Background(), b)
			want := BreakerClosed
			if last != nil {
				want = BreakerOpen
			}
			if !errors.Is(err, last) || last == nil && err != nil || src.called() != 3 || br.SourceHealth("custom#1").Breaker != want {
				t.Errorf("probe: %v after %d calls, breaker %s; want %v after 3, %s", err, src.called(), br.SourceHealth("custom#1").Breaker, last, want)
			}
		})
	}
}

// A budget refusing the second call of an attempt answered ClassRetryNow
// ends the fetch as it ends one it refuses before that attempt: in the
// first attempt with its refusal, not recorded; in a later one with the
// error of the call before, recorded. The observer is told the call
// answered ClassRetryNow as no failure either way.
func TestRetryNowRefusedByBudget(t *testing.T) {
	nonce := &APIError{Provider: "custom", StatusCode: http.StatusBadRequest, Code: "use_dpop_nonce"}
	down := &APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable}
	for _, tt := range []struct {
		name     string
		answers  []error
		wantErr  error
		recorded bool
	}{
		{"in the first attempt", []error{nonce}, budget.ErrExhausted, false},
		{"after a temporary failure", []error{down, nonce}, down, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &retryNowSource{clock: clock, nonce: nonce, answers: tt.answers}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 2})
			defer br.Close()
			p := NewProfile("custom#1", src, nil, "", 0)
			burst := len(tt.answers) // room for the calls made, not for the one sent again
			p.Budget = budget.New("custom", budget.Limit{Rate: 1, Burst: burst, Period: time.Minute}, budget.NewLocal(clock.Now), clock.Now)
			b := NewBindingFor(p, "acme", "1")
			obs := &fetchLog{}
			b.Observer = obs
			_, err := br.Token(context.Background(), b)
			if !errors.Is(err, tt.wantErr) || errors.Is(err, nonce) {
				t.Fatalf("err = %v, want %v", err, tt.wantErr)
			}
			if h := br.SourcesHealth("custom#1")["custom#1"]; src.called() != len(tt.answers) || (h.FailingKeys > 0) != tt.recorded {
				t.Errorf("%d calls, %d failing keys; want %d, recorded %t", src.called(), h.FailingKeys, len(tt.answers), tt.recorded)
			}
			obs.mu.Lock()
			defer obs.mu.Unlock()
			if len(obs.fetches) != 1 || len(obs.fetches[0].Attempts) != len(tt.answers) {
				t.Fatalf("fetches %+v; want one with %d attempts", obs.fetches, len(tt.answers))
			}
			if a := obs.fetches[0].Attempts; !IsRetryNow(a[len(a)-1].Err) {
				t.Errorf("the call answered ClassRetryNow told as %v, want a RetryNowError", a[len(a)-1].Err)
			}
		})
	}
}
