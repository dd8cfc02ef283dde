package broker

import (
	"context"
	"errors"
	"net/http"
	"testing"
	"time"
)

// Check calls the token API whatever is cached, caches what it gets, and
// goes through the failure policy: a key or source in backoff, or an open
// breaker, is not called, and the error says for how long. A failed check
// keeps the cached token.
func TestCheckForcesOneFetchThroughThePolicy(t *testing.T) {
	invalidKey := &APIError{Provider: "nuapay", StatusCode: http.StatusUnauthorized, Code: "40100"}
	down := &APIError{Provider: "nuapay", StatusCode: http.StatusServiceUnavailable}
	tests := []struct {
		name      string
		warm      bool  // a token cached before the check
		before    error // the failure of a lookup before the check (nil: none)
		otherKey  bool  // that lookup is for another key of the source
		err       error // the source's answer to the check
		wantCalls int   // token API calls by the check
		wantErr   error
		wantToken string // the token cached after the check
	}{
		{name: "cold: fetched and cached", wantCalls: 1, wantToken: "tok-acme-1"},
		{name: "warm: a new token replaces the cached one", warm: true, wantCalls: 1, wantToken: "tok-acme-2"},
		{name: "refused credential: the cached token stays", warm: true, err: invalidKey, wantCalls: 1, wantErr: invalidKey, wantToken: "tok-acme-1"},
		{name: "source in backoff: not called", before: invalidKey, wantCalls: 0, wantErr: invalidKey},
		{name: "key in backoff: not called", before: down, wantCalls: 0, wantErr: down},
		{name: "breaker open: not called", before: down, otherKey: true, wantCalls: 0, wantErr: down},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: 400 * time.Second}
			br := New(Options{Now: clock.Now, Sleep: noSleep, MaxAttempts: 1, BreakerThreshold: 1, BreakerCooldown: time.Minute})
			b := NewBinding("nuapay#1", src, Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"a"}})
			ctx := context.Background()
			if tt.warm {
				if _, err := br.Token(ctx, b); err != nil {
					t.Fatal(err)
				}
			}
			if tt.before != nil {
				src.set(tt.before)
				first := b
				if tt.otherKey {
					first = NewBinding("nuapay#1", src, Request{Merchant: "other", Organisation: "org-other", Scopes: []string{"a"}})
				}
				if _, err := br.Token(ctx, first); !errors.Is(err, tt.before) {
					t.Fatalf("lookup before the check: %v, want %v", err, tt.before)
				}
			}
			src.set(tt.err)
			calls := src.calls.Load()
			got, err := br.Check(ctx, b)
			if tt.wantErr == nil && err != nil || tt.wantErr != nil && !errors.Is(err, tt.wantErr) {
				t.Fatalf("Check: %v, want %v", err, tt.wantErr)
			}
			if n := src.calls.Load() - calls; n != int64(tt.wantCalls) || got.Calls != tt.wantCalls || got.Joined {
				t.Fatalf("token API calls = %d, Checked = %+v, want %d calls", n, got, tt.wantCalls)
			}
			if tt.wantCalls == 0 && RetryAfterOf(err) <= 0 {
				t.Fatalf("a check the policy refused must say for how long: %v", err)
			}
			var open *UnavailableError
			if tt.otherKey != errors.As(err, &open) {
				t.Fatalf("Check: %v; an open breaker's refusal is an UnavailableError, and only it", err)
			}
			if err == nil && (got.Entry == nil || got.Entry.Token().Value.Reveal() != tt.wantToken) {
				t.Fatalf("Check's entry = %+v, want %s", got.Entry, tt.wantToken)
			}
			cached := ""
			for _, e := range br.Entries() {
				cached = e.Token().Value.Reveal()
			}
			if cached != tt.wantToken {
				t.Fatalf("cached after the check: %q, want %q", cached, tt.wantToken)
			}
			if tt.wantToken != "" {
				// The token the check cached is served: no more calls.
				src.set(nil)
				calls := src.calls.Load()
				if tok, err := br.Token(ctx, b); err != nil || tok.Value.Reveal() != tt.wantToken || src.calls.Load() != calls {
					t.Fatalf("lookup after the check: %v %v (calls %d), want the checked token without a call", tok.Value.Reveal(), err, src.calls.Load()-calls)
				}
			}
		})
	}
}

// With a shared tier, a check mints even when the tier holds a usable
// token, and stores the new one there.
func TestCheckMintsPastTheSharedTier(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: 400 * time.Second}
	shared := newMemShared()
	br := New(Options{Now: clock.Now, Sleep: noSleep, Shared: shared})
	b := NewBinding("nuapay#1", src, Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"a"}})
	ctx := context.Background()
	if _, err := br.Token(ctx, b); err != nil {
		t.Fatal(err)
	}
	got, err := br.Check(ctx, b)
	if err != nil || got.Calls != 1 || got.Entry.Origin() != OriginMinted {
		t.Fatalf("Check = %+v, %v; want one call, a minted token", got, err)
	}
	shared.mu.Lock()
	stored := shared.tokens[b.key].Value.Reveal()
	shared.mu.Unlock()
	if stored != "tok-acme-2" || shared.adopted != 0 {
		t.Fatalf("shared tier holds %q (adopted %d), want the checked token tok-acme-2", stored, shared.adopted)
	}
}
