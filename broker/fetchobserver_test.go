package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync"
	"testing"
	"time"
)

// fetchLog records the observer calls of fetches, in order.
type fetchLog struct {
	nopObserver
	mu      sync.Mutex
	calls   []string // "call" per Fetched, "fetch" per FetchDone
	fetches []Fetch
}

func (o *fetchLog) Lookup(*Binding, Result) {}

func (o *fetchLog) Fetched(context.Context, *Binding, Token, time.Duration, bool, error) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.calls = append(o.calls, "call")
}

func (o *fetchLog) FetchDone(_ context.Context, _ *Binding, f Fetch) {
	o.mu.Lock()
	defer o.mu.Unlock()
	o.calls = append(o.calls, "fetch")
	o.fetches = append(o.fetches, f)
}

// An Observer is told FetchDone once per fetch that called the Source, after
// its last call was reported, with every attempt; not for a fetch the
// policy refused without a call.
func TestFetchObserverOncePerFetch(t *testing.T) {
	down := &APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable}
	for _, tt := range []struct {
		name      string
		answers   []error // of each call; nil: a token
		breaker   int
		fetches   int    // lookups, one after the other
		wantCalls string // the observer's calls
		attempts  []int  // attempts of each reported fetch
		wantErr   []bool // whether each reported fetch failed
	}{
		{"a token at once", []error{nil}, 0, 1, "call fetch", []int{1}, []bool{false}},
		{"two retries then a token", []error{down, down, nil}, 0, 1, "call call call fetch", []int{3}, []bool{false}},
		{"failure, then refused by the key's backoff", []error{down, down, down}, 0, 2, "call call call fetch", []int{3}, []bool{true}},
		{"breaker opens mid-retry", []error{down, down, nil}, 2, 1, "call call fetch", []int{2}, []bool{true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			var mu sync.Mutex
			n := 0
			src := SourceFunc(func(_ context.Context, req Request) (Token, error) {
				mu.Lock()
				defer mu.Unlock()
				err := tt.answers[n]
				n++
				if err != nil {
					return Token{}, err
				}
				return Token{Value: "tok", IssuedAt: clock.Now(), Expiry: clock.Now().Add(time.Hour)}, nil
			})
			obs := &fetchLog{}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 3, BreakerThreshold: tt.breaker})
			b := NewBinding("custom#1", src, Request{Merchant: "acme", Organisation: "1"})
			b.Observer = obs
			for range tt.fetches {
				_, _ = br.Token(context.Background(), b)
			}
			obs.mu.Lock()
			defer obs.mu.Unlock()
			if got := fmt.Sprint(obs.calls); got != "["+tt.wantCalls+"]" {
				t.Fatalf("observer calls %s, want [%s]", got, tt.wantCalls)
			}
			for i, f := range obs.fetches {
				if len(f.Attempts) != tt.attempts[i] || (f.Err != nil) != tt.wantErr[i] || f.Background {
					t.Errorf("fetch %d: %d attempts, err %v, background %v; want %d, failed %v", i, len(f.Attempts), f.Err, f.Background, tt.attempts[i], tt.wantErr[i])
				}
				if f.Err == nil && f.Token.Value != "tok" {
					t.Errorf("fetch %d: no token", i)
				}
				if f.Err != nil && RetryAfterOf(f.Err) <= 0 {
					t.Errorf("fetch %d: %v does not carry the backoff applied", i, f.Err)
				}
				for j, a := range f.Attempts {
					if last := j == len(f.Attempts)-1; (a.Err == nil) != (last && !tt.wantErr[i]) {
						t.Errorf("fetch %d attempt %d: err %v", i, j, a.Err)
					}
				}
			}
		})
	}
}

// BackoffOf names the backoff behind the policy's answers: the key's
// failure memory, or the whole source (its backoff after a refused
// credential, its open breaker); equal for the refusals of one backoff.
func TestBackoffOf(t *testing.T) {
	down := &APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable}
	for _, tt := range []struct {
		name          string
		class         Class
		breaker       int
		failureTTL    time.Duration
		first, second string // the backoff of merchant m0's fetch, then m1's: "", "key" or "source"
	}{
		{"key backoff", ClassTemporary, 0, 0, "key", "key"},
		{"refused credential backs the source off", ClassCredential, 0, 0, "source", "source"},
		{"open breaker backs the source off", ClassTemporary, 1, 0, "key", "source"},
		{"no failure memory", ClassPermanent, 0, -1, "", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: time.Hour}
			src.set(down)
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: tt.breaker, BreakerCooldown: time.Minute, FailureTTL: tt.failureTTL})
			hold := func(m string) (Backoff, string) {
				b := NewBinding("custom#1", fixedClass{src, tt.class}, Request{Merchant: m, Organisation: m})
				_, err := br.Token(context.Background(), b)
				if err == nil {
					t.Fatalf("%s: no error", m)
				}
				h, ok := BackoffOf(err)
				switch {
				case !ok:
					return h, ""
				case h.SourceID != "custom#1":
					t.Fatalf("%s: backoff of source %q", m, h.SourceID)
				case h.Source():
					return h, "source"
				}
				return h, "key"
			}
			h0, s0 := hold("m0")
			h1, s1 := hold("m1")
			again, _ := hold("m0")
			if s0 != tt.first || s1 != tt.second {
				t.Fatalf("backoffs %q, %q; want %q, %q", s0, s1, tt.first, tt.second)
			}
			if again != h0 || (h0 == h1) != (tt.first == tt.second && tt.first != "key") {
				t.Fatalf("backoffs %+v, %+v, m0 again %+v", h0, h1, again)
			}
		})
	}
	if _, ok := BackoffOf(errors.New("other")); ok {
		t.Fatal("a plain error has a backoff")
	}
}

// An open breaker's error, repeated by a key's failure memory, names when
// the breaker lets a probe through, not the time that was left when it
// first refused.
func TestRepeatedBreakerErrorSaysUntilWhen(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	src.set(&APIError{Provider: "custom", StatusCode: http.StatusServiceUnavailable})
	br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1,
		BreakerCooldown: 2 * time.Minute, FailureTTL: time.Hour, FailureMax: time.Hour})
	token := func(m string) error {
		_, err := br.Token(context.Background(), NewBinding("custom#1", fixedClass{src, ClassTemporary}, Request{Merchant: m, Organisation: m}))
		if err == nil {
			t.Fatalf("%s: no error", m)
		}
		return err
	}
	token("m0") // fails and opens the breaker
	want := "not called before " + clock.Now().Add(2*time.Minute).UTC().Format(time.RFC3339)
	for _, advance := range []time.Duration{0, 30 * time.Second, time.Minute} {
		clock.Add(advance)
		if err := token("m1"); !strings.Contains(err.Error(), want) {
			t.Errorf("after %s more: %q, want it to contain %q", advance, err, want)
		}
	}
}
