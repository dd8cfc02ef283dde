package broker

import (
	"context"
	"testing"
	"time"
)

// A caller provoking 401s at will (the upstream rejects every token for a
// reason that is not the token) causes a handful of token requests per key
// and hour, whatever its pace; a real rejection still purges at once.
func TestRejectionsAreLimitedPerKey(t *testing.T) {
	tests := []struct {
		name     string
		every    time.Duration // a rejection of the served token this often, for an hour
		maxMints int64
	}{
		{"100 rejections in an hour", 36 * time.Second, 4},
		{"a rejection every second", time.Second, 4},
		{"a rejection every 2 minutes", 2 * time.Minute, 8},
		{"a rejection every 11 minutes", 11 * time.Minute, 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &scriptedSource{clock: clock, life: 2 * time.Hour}
			br := New(Options{Now: clock.Now, Sleep: noSleep, RefreshWindow: -1})
			b := NewBinding("nuapay#1", src, Request{Merchant: "m", Organisation: "o"})
			var kept int
			for end := clock.Now().Add(time.Hour); clock.Now().Before(end); clock.Add(tt.every) {
				e, _, err := br.Get(context.Background(), b)
				if err != nil {
					t.Fatal(err)
				}
				switch br.Reject(b, e.Token().Value) {
				case RejectionKept:
					kept++
				case RejectionPurged:
					// The in-request retry with the fresh token is
					// rejected too.
					e, _, err = br.Get(context.Background(), b)
					if err != nil {
						t.Fatal(err)
					}
					if br.Reject(b, e.Token().Value) == RejectionKept {
						kept++
					}
				}
			}
			t.Logf("%d token requests, %d rejections kept the token", src.calls.Load(), kept)
			if got := src.calls.Load(); got > tt.maxMints {
				t.Errorf("token requests in an hour = %d, want at most %d", got, tt.maxMints)
			}
			if kept == 0 {
				t.Error("no rejection kept the token")
			}
		})
	}
}

// A token rejected once is purged at once; the pause shows in Policy; the
// strikes are forgotten after a quiet window, so a later real rejection
// purges again.
func TestRejectionHoldAndReset(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: 3 * time.Hour}
	br := New(Options{Now: clock.Now, Sleep: noSleep, RefreshWindow: -1})
	b := NewBinding("nuapay#1", src, Request{Merchant: "m", Organisation: "o"})
	get := func() *Entry {
		t.Helper()
		e, _, err := br.Get(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		return e
	}
	e1 := get()
	if r := br.Reject(b, e1.Token().Value); r != RejectionPurged {
		t.Fatalf("first rejection: %v, want purged", r)
	}
	if r := br.Reject(b, e1.Token().Value); r != RejectionStale {
		t.Fatalf("second rejection of the purged token: %v, want stale", r)
	}
	e2 := get()
	clock.Add(5 * time.Second)
	if r := br.Reject(b, e2.Token().Value); r != RejectionKept {
		t.Fatalf("rejection of the replacement: %v, want kept", r)
	}
	if p := br.Policy(e2); p.Strikes != 1 || !p.PurgesPausedUntil.Equal(clock.Now().Add(RejectPauseBase)) {
		t.Fatalf("policy = %+v, want 1 strike, purges paused for %s", p, RejectPauseBase)
	}
	if get() != e2 {
		t.Fatal("the kept token is not served")
	}
	// Quiet for the pause and a full pause after it, and older than
	// RejectMinAge: a rejection purges again.
	clock.Add(RejectMinAge + time.Minute)
	if r := br.Reject(b, e2.Token().Value); r != RejectionPurged {
		t.Fatalf("rejection after a quiet window: %v, want purged", r)
	}
	if p := br.Policy(get()); p.Strikes != 0 || !p.PurgesPausedUntil.IsZero() {
		t.Fatalf("policy after reset = %+v", p)
	}
	if src.calls.Load() != 3 {
		t.Fatalf("token requests = %d, want 3", src.calls.Load())
	}
}

// An operator revokes the replacement token too: the request's retry with
// the next token is accepted (Accepted), so the rejection after it purges
// the revoked token at once.
func TestRejectionAfterAcceptedRetryPurges(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now, Sleep: noSleep, RefreshWindow: -1})
	b := NewBinding("nuapay#1", src, Request{Merchant: "m", Organisation: "o"})
	for i := range 3 {
		e, _, err := br.Get(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		if i > 0 {
			br.Accepted(b, e.Token().Value)
		}
		clock.Add(time.Second)
		if r := br.Reject(b, e.Token().Value); r != RejectionPurged {
			t.Fatalf("rejection %d: %v, want purged", i, r)
		}
	}
}
