package broker

import (
	"context"
	"slices"
	"sync"
	"testing"
	"time"
)

// memShared is an in-memory SharedCache for tests: one lock for the whole
// fleet, tokens kept in a map, purges announced to every node.
type memShared struct {
	mu      sync.Mutex // the fleet lock, held while minting
	tokens  map[string]Token
	onPurge []*func(key, fingerprint string)
	mints   int
	adopted int
}

func newMemShared() *memShared { return &memShared{tokens: map[string]Token{}} }

func (s *memShared) Fetch(ctx context.Context, key string, usable func(Token) bool, mint func(context.Context) (Token, error)) (Token, bool, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if tok, ok := s.tokens[key]; ok && usable(tok) {
		s.adopted++
		return tok, true, nil
	}
	s.mints++
	tok, err := mint(ctx)
	if err != nil {
		return Token{}, false, err
	}
	s.tokens[key] = tok
	return tok, false, nil
}

func (s *memShared) Purge(_ context.Context, key, fingerprint string) error {
	s.mu.Lock()
	if tok, ok := s.tokens[key]; ok && (fingerprint == "" || tok.Fingerprint() == fingerprint) {
		delete(s.tokens, key)
	}
	hooks := slices.Clone(s.onPurge)
	s.mu.Unlock()
	for _, fn := range hooks {
		(*fn)(key, fingerprint)
	}
	return nil
}

func (s *memShared) OnPurge(fn func(key, fingerprint string)) func() {
	hook := &fn
	s.mu.Lock()
	s.onPurge = append(s.onPurge, hook)
	s.mu.Unlock()
	return func() {
		s.mu.Lock()
		s.onPurge = slices.DeleteFunc(s.onPurge, func(h *func(key, fingerprint string)) bool { return h == hook })
		s.mu.Unlock()
	}
}

// Two brokers sharing a tier: one mint for both; the second adopts the
// token (reported as Adopted, listed as shared); a purge on one drops the
// token from the other's memory too; a refresh-ahead adopts only a token
// that outlives the one being refreshed.
func TestSharedCacheTwoBrokersOneMint(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: 100 * time.Second}
	shared := newMemShared()
	obs := newObserver()
	a := New(Options{Now: clock.Now, Shared: shared})
	b := New(Options{Now: clock.Now, Shared: shared})
	req := Request{Merchant: "acme", Organisation: "o", Scopes: []string{"a"}}
	ba, bb := NewBinding("s", src, req), NewBinding("s", src, req)
	ba.Observer, bb.Observer = obs, obs
	ctx := context.Background()

	ea, ra, err := a.Get(ctx, ba)
	if err != nil || ra != Miss || ea.Origin() != OriginMinted {
		t.Fatalf("a: %v %s %v, want a minted miss", ea, ra, err)
	}
	eb, rb, err := b.Get(ctx, bb)
	if err != nil || rb != Adopted || eb.Origin() != OriginShared || eb.Token().Value != ea.Token().Value {
		t.Fatalf("b: %s %v, want the adopted token", rb, err)
	}
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("token API calls = %d, want 1 for two brokers", n)
	}
	if _, rb, _ := b.Get(ctx, bb); rb != Hit {
		t.Fatalf("b again: %s, want a hit from memory", rb)
	}

	// A 401 on a's token: purged in a, in the tier, and in b.
	if a.Reject(ba, ea.Token().Value) != RejectionPurged {
		t.Fatal("purge failed")
	}
	if len(b.Entries()) != 0 {
		t.Fatal("b still holds the purged token")
	}
	eb, rb, err = b.Get(ctx, bb)
	if err != nil || rb != Miss || eb.Token().Value == ea.Token().Value || src.calls.Load() != 2 {
		t.Fatalf("b after the purge: %s %v, calls %d; want a new mint", rb, err, src.calls.Load())
	}
	// a adopts b's new token.
	if ea, ra, _ = a.Get(ctx, ba); ra != Adopted || ea.Token().Value != eb.Token().Value {
		t.Fatalf("a after the purge: %s, want b's token adopted", ra)
	}
	if !ea.RefreshAt().Equal(eb.RefreshAt()) {
		t.Fatalf("a adopted b's token planned for %v, want b's plan %v", ea.RefreshAt(), eb.RefreshAt())
	}

	// Refresh-ahead: b refreshes first (mint); a, at the same planned
	// point, must adopt b's new token, not its own old one from the tier.
	clock.Add(eb.RefreshAt().Sub(clock.Now()))
	if _, rb, _ = b.Get(ctx, bb); rb != RefreshAhead {
		t.Fatalf("b in the window: %s", rb)
	}
	settle(t, b, bb)
	if n := src.calls.Load(); n != 3 {
		t.Fatalf("calls %d, want 3 after b's refresh", n)
	}
	if _, ra, _ = a.Get(ctx, ba); ra != RefreshAhead {
		t.Fatalf("a in the window: %s", ra)
	}
	settle(t, a, ba)
	ea, _, _ = a.Get(ctx, ba)
	eb, _, _ = b.Get(ctx, bb)
	if n := src.calls.Load(); n != 3 || ea.Token().Value != eb.Token().Value || ea.Origin() != OriginShared {
		t.Fatalf("calls %d, a's token origin %s: want a to adopt b's refreshed token", n, ea.Origin())
	}

	// PurgeMatching also purges the tier and the other node.
	if out := a.PurgeMerchant("acme"); len(out) != 1 {
		t.Fatalf("purged %d", len(out))
	}
	if len(b.Entries()) != 0 || len(shared.tokens) != 0 {
		t.Fatal("PurgeMatching did not reach the tier and the other node")
	}
}

// A token in the tier that is expired (or about to be) is not adopted.
func TestSharedCacheRefusesUnusableTokens(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	shared := newMemShared()
	br := New(Options{Now: clock.Now, Shared: shared})
	b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})
	shared.tokens[b.Key()] = Token{Value: "stale", IssuedAt: clock.Now(), Expiry: clock.Now().Add(500 * time.Millisecond)}
	e, r, err := br.Get(context.Background(), b)
	if err != nil || r != Miss || e.Token().Value == "stale" || src.calls.Load() != 1 {
		t.Fatalf("%s %v: want a mint instead of the token inside the leeway", r, err)
	}
}

// lostPurges is a shared tier whose purges do not reach it (Redis timed out
// on the purge, or a lookup read it before the purge landed): the rejected
// token is still stored there.
type lostPurges struct{ *memShared }

func (lostPurges) Purge(context.Context, string, string) error { return nil }

// A token an upstream rejected is never adopted back from the shared tier:
// the next lookup mints, and the rejected token does not come back to earn
// the key a strike (which would keep serving it: kept).
func TestRejectedTokenNotAdoptedBack(t *testing.T) {
	clock := newFakeClock()
	src := &scriptedSource{clock: clock, life: time.Hour}
	shared := lostPurges{newMemShared()}
	br := New(Options{Now: clock.Now, Shared: shared})
	b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})
	first, _, err := br.Get(context.Background(), b)
	if err != nil {
		t.Fatal(err)
	}
	rejected := first.Token().Value
	if got := br.Reject(b, rejected); got != RejectionPurged {
		t.Fatalf("first rejection: %s, want purged", got)
	}
	for i := range 3 {
		e, _, err := br.Get(context.Background(), b)
		if err != nil {
			t.Fatal(err)
		}
		if e.Token().Value == rejected {
			t.Fatalf("lookup %d: the rejected token was adopted back from the shared tier", i)
		}
	}
	if got := br.Reject(b, rejected); got == RejectionKept {
		t.Fatal("a late rejection of the purged token paused the key's purges")
	}
	if src.calls.Load() != 2 {
		t.Fatalf("token API calls = %d, want 2 (the first token and its replacement)", src.calls.Load())
	}
}

// TestDrop: Drop forgets a token in this broker's memory only (the
// shared tier keeps it: the next lookup adopts it, no mint), and keeps a
// token that was served to another merchant's binding with the same key
// or that is another merchant's.
func TestDrop(t *testing.T) {
	for _, tt := range []struct {
		name     string
		served   []string // merchants served the key's token, in order; the first fetches it
		drop     string   // the merchant whose binding is dropped
		dropped  bool
		wantMint int // mints of the shared tier after the drop and one more lookup
	}{
		{"own token", []string{"m1"}, "m1", true, 0},
		{"served to another merchant", []string{"m1", "m2"}, "m1", false, 0},
		{"another merchant's", []string{"m1", "m2"}, "m2", false, 0},
		{"nothing cached", nil, "m1", false, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			shared := newMemShared()
			br := New(Options{Now: clock.Now, Shared: shared})
			defer br.Close()
			src := &countingSource{clock: clock, life: time.Hour}
			p := NewProfile("s", src, []string{"a"}, "", 0)
			bindings := map[string]*Binding{"m1": NewBindingFor(p, "m1", "o"), "m2": NewBindingFor(p, "m2", "o")}
			ctx := context.Background()
			for _, m := range tt.served {
				if _, _, err := br.Get(ctx, bindings[m]); err != nil {
					t.Fatal(err)
				}
			}
			mints := shared.mints
			if got := br.Drop(bindings[tt.drop]); got != tt.dropped {
				t.Fatalf("Drop = %t, want %t", got, tt.dropped)
			}
			want := len(tt.served) > 0 && !tt.dropped
			if _, cached := br.cache.Get(bindings[tt.drop].Key()); cached != want {
				t.Errorf("token cached after Drop: %t, want %t", cached, want)
			}
			if _, _, err := br.Get(ctx, bindings[tt.drop]); err != nil {
				t.Fatal(err)
			}
			if n := shared.mints - mints; n != tt.wantMint {
				t.Errorf("%d mints after the drop, want %d (a dropped token is adopted from the shared tier)", n, tt.wantMint)
			}
			if tt.dropped && shared.adopted == 0 {
				t.Error("the dropped token was not adopted from the shared tier: Drop must not purge it there")
			}
		})
	}
}

// A closed broker stops hearing the shared tier's purges: the tier, which
// outlives it across reloads, keeps no callback of it.
func TestCloseStopsHearingPurges(t *testing.T) {
	shared := newMemShared()
	kept := New(Options{Shared: shared})
	defer kept.Close()
	closed := New(Options{Shared: shared})
	closed.Close()
	closed.Close() // a second Close is harmless
	shared.mu.Lock()
	defer shared.mu.Unlock()
	if len(shared.onPurge) != 1 {
		t.Fatalf("%d purge callbacks registered, want 1 (the open broker's)", len(shared.onPurge))
	}
}
