package broker

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// TestAnsweredHoldsAsATokenAnswer: the answer of a call that is not a
// token request (a revocation) told to the failure policy holds the
// provider as the same answer to a token request would: a 429 with
// Retry-After for its Retry-After (the budget's closing with a budget),
// one without and a refused credential for FailureTTL, BreakerThreshold
// 5xx answers open the breaker; the next token request of another key is
// refused without a call, and called once the hold has passed, since the
// key remembers nothing. An answer about one token (404), one 5xx below
// the threshold, an error without an answer and a success hold nothing.
func TestAnsweredHoldsAsATokenAnswer(t *testing.T) {
	const threshold = 2
	ra429 := &APIError{StatusCode: http.StatusTooManyRequests, RetryAfter: time.Minute}
	for _, tc := range []struct {
		name    string
		budget  bool
		answers []error
		held    time.Duration // how long the next token request is refused without a call; 0: called at once
	}{
		{name: "429 Retry-After", answers: []error{ra429}, held: time.Minute},
		{name: "429 Retry-After, budget", budget: true, answers: []error{ra429}, held: time.Minute},
		{name: "429 without Retry-After", answers: []error{&APIError{StatusCode: http.StatusTooManyRequests}}, held: DefaultFailureTTL},
		{name: "invalid_client", answers: []error{&APIError{StatusCode: http.StatusUnauthorized, Code: "invalid_client"}}, held: DefaultFailureTTL},
		{name: "503 up to the threshold", answers: []error{&APIError{StatusCode: 503}, &APIError{StatusCode: 503}}, held: DefaultBreakerCooldown},
		{name: "one 503", answers: []error{&APIError{StatusCode: 503}}},
		{name: "404", answers: []error{&APIError{StatusCode: http.StatusNotFound}, &APIError{StatusCode: http.StatusNotFound}}},
		{name: "no answer", answers: []error{errors.New("the token has no id"), errors.New("the token has no id")}},
		{name: "success", answers: []error{nil, nil}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			br := New(Options{Now: clock.Now, MaxAttempts: 1, BreakerThreshold: threshold})
			defer br.Close()
			p := NewProfile("bank#1", src, nil, "", 0)
			if tc.budget {
				p.Budget = budget.New("bank", budget.Limit{Rate: 100, Burst: 10, Period: time.Second}, budget.NewLocal(clock.Now), clock.Now)
			}
			revoked, next := NewBindingFor(p, "acme", "org-acme"), NewBindingFor(p, "hooli", "org-hooli")
			for _, err := range tc.answers {
				br.Answered(context.Background(), revoked, err)
			}
			_, _, err := br.Get(context.Background(), next)
			switch {
			case tc.held == 0 && (err != nil || src.calls.Load() != 1):
				t.Fatalf("token request: %v, %d calls; want a token from one call", err, src.calls.Load())
			case tc.held > 0 && (err == nil || Called(err) || src.calls.Load() != 0):
				t.Fatalf("token request: %v, %d calls; want it refused without a call", err, src.calls.Load())
			case tc.held > 0 && RetryAfterOf(err) != tc.held:
				t.Fatalf("refused with Retry-After %s, want %s", RetryAfterOf(err), tc.held)
			}
			if tc.held > 0 {
				clock.Add(tc.held)
				if _, _, err := br.Get(context.Background(), revoked); err != nil || src.calls.Load() != 1 {
					t.Fatalf("after the hold: %v, %d calls; want a token from one call", err, src.calls.Load())
				}
			}
		})
	}
}
