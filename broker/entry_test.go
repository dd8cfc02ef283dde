package broker

import (
	"context"
	"fmt"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"
)

// TestEntryAccessors: Header is "Bearer <token>" (the token's bytes stored
// once: the value is a slice of it), Token().ID the ID, Fingerprint the
// fingerprint of the value, FingerprintValue the same as a plain string.
func TestEntryAccessors(t *testing.T) {
	for _, id := range []string{"", "6f1d2c3e-0000-4000-8000-1234567890ab"} {
		t.Run("id="+id, func(t *testing.T) {
			const value = "eyJhbGciOiJSUzI1NiJ9.payload.sig"
			src := SourceFunc(func(context.Context, Request) (Token, error) {
				return Token{Value: Secret(strings.Clone(value)), Type: "Bearer", ID: strings.Clone(id), Expiry: time.Now().Add(time.Hour)}, nil
			})
			br := New(Options{})
			defer br.Close()
			e, _, err := br.Get(context.Background(), NewBinding("src", src, Request{Merchant: "m1", Organisation: "org1"}))
			if err != nil {
				t.Fatal(err)
			}
			tok := e.Token()
			if e.Header() != "Bearer "+value || tok.Value.Reveal() != value || tok.ID != id {
				t.Fatalf("header %q, value %q, id %q: want %q, %q, %q", e.Header(), tok.Value.Reveal(), tok.ID, "Bearer "+value, value, id)
			}
			if unsafe.StringData(tok.Value.Reveal()) != unsafe.StringData(e.Header()[len("Bearer "):]) {
				t.Error("the token value is not a slice of the header string")
			}
			if fp := Fingerprint(value); e.Fingerprint() != fp || e.FingerprintValue() != any(fp) || tok.Fingerprint() != fp {
				t.Errorf("fingerprint %q, value %v, want %q", e.Fingerprint(), e.FingerprintValue(), fp)
			}
			if e.Origin() != OriginMinted {
				t.Errorf("origin %q, want %q", e.Origin(), OriginMinted)
			}
		})
	}
}

// TestNormaliseScopesSharesNormalisedInput: normalised scopes are
// returned themselves (bindings of one scope list share it); any other
// list is normalised into a new slice and left unmodified.
func TestNormaliseScopesSharesNormalisedInput(t *testing.T) {
	tests := []struct {
		in, want []string
		shared   bool
	}{
		{[]string{"accounts", "payments"}, []string{"accounts", "payments"}, true},
		{[]string{"payments"}, []string{"payments"}, true},
		{[]string{"payments", "accounts"}, []string{"accounts", "payments"}, false},
		{[]string{"accounts", "accounts"}, []string{"accounts"}, false},
		{[]string{" accounts"}, []string{"accounts"}, false},
		{[]string{"accounts", ""}, []string{"accounts"}, false},
		{nil, nil, true},
	}
	for _, tt := range tests {
		in := slices.Clone(tt.in)
		got := NormaliseScopes(in)
		if !slices.Equal(got, tt.want) || !slices.Equal(in, tt.in) {
			t.Errorf("NormaliseScopes(%q) = %q (input now %q), want %q", tt.in, got, in, tt.want)
		}
		if shared := len(got) > 0 && len(in) > 0 && &got[0] == &in[0]; shared != (tt.shared && len(in) > 0) {
			t.Errorf("NormaliseScopes(%q) shares the input: %t, want %t", tt.in, shared, tt.shared)
		}
	}
}

// TestBindingInitInPlace: a Binding filled in place (InitFor), as
// embedded in a larger struct, has the key and scopes NewBinding computes.
func TestBindingInitInPlace(t *testing.T) {
	src := &countingSource{}
	req := Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"payments", "accounts"}, Lifetime: time.Hour}
	nb := NewBinding("src", src, req)
	var a, c struct {
		Binding
		extra int
	}
	a.InitFor(NewProfile("src", src, req.Scopes, req.Audience, req.Lifetime), req.Merchant, req.Organisation)
	c.InitFor(nb.Profile, nb.Merchant, nb.Organisation)
	if a.Key() != nb.Key() || c.Key() != nb.Key() || !slices.Equal(a.Scopes, []string{"accounts", "payments"}) {
		t.Fatalf("keys %q %q, want %q; scopes %q", a.Key(), c.Key(), nb.Key(), a.Scopes)
	}
}

// TestBindingProfileKeys: a binding under a shared Profile (NewBindingFor,
// InitFor) has the cache key of a binding made alone (NewBinding) and the
// Request its source is asked for; two bindings have the same key exactly
// when their source ID, organisation, scopes (as a set), audience and
// lifetime are the same, and their merchant for a PerMerchant source; a
// key is the profile's 16-byte tag and the organisation.
func TestBindingProfileKeys(t *testing.T) {
	base := Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"payments", "accounts", "payments"}, Audience: "aud", Lifetime: time.Hour}
	for _, tt := range []struct {
		name string
		src  Source
	}{
		{"shared tokens", &countingSource{}},
		{"per merchant", perMerchantSource{&countingSource{}}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			req := base
			p := NewProfile("bank#1", tt.src, req.Scopes, req.Audience, req.Lifetime)
			a := NewBindingFor(p, "m1", "org1")
			var c struct {
				Binding
				extra int
			}
			c.InitFor(p, "m1", "org1")
			alone := NewBinding("bank#1", tt.src, req)
			for _, b := range []*Binding{&c.Binding, alone} {
				if b.Key() != a.Key() {
					t.Errorf("key %q, want %q", b.Key(), a.Key())
				}
			}
			if max := keyTagLen + len("org1") + len("4:m1"); len(a.Key()) > max {
				t.Errorf("key of %d bytes, want at most %d", len(a.Key()), max)
			}
			perMerchant := tt.name == "per merchant"
			for _, v := range []struct {
				name string
				src  string
				req  Request
				same bool
			}{
				{"scopes in another order", "bank#1", Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"accounts", "payments"}, Audience: "aud", Lifetime: time.Hour}, true},
				{"another merchant", "bank#1", Request{Merchant: "m2", Organisation: "org1", Scopes: req.Scopes, Audience: "aud", Lifetime: time.Hour}, !perMerchant},
				{"another source", "bank#2", req, false},
				{"another organisation", "bank#1", Request{Merchant: "m1", Organisation: "org2", Scopes: req.Scopes, Audience: "aud", Lifetime: time.Hour}, false},
				{"other scopes", "bank#1", Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"accounts"}, Audience: "aud", Lifetime: time.Hour}, false},
				{"scopes moved into the audience", "bank#1", Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"accounts"}, Audience: "payments aud", Lifetime: time.Hour}, false},
				{"another audience", "bank#1", Request{Merchant: "m1", Organisation: "org1", Scopes: req.Scopes, Lifetime: time.Hour}, false},
				{"another lifetime", "bank#1", Request{Merchant: "m1", Organisation: "org1", Scopes: req.Scopes, Audience: "aud"}, false},
				{"organisation and merchant cut elsewhere", "bank#1", Request{Merchant: "1m1", Organisation: "org", Scopes: req.Scopes, Audience: "aud", Lifetime: time.Hour}, false},
			} {
				if got := NewBinding(v.src, tt.src, v.req).Key() == a.Key(); got != v.same {
					t.Errorf("%s: same key %t, want %t", v.name, got, v.same)
				}
			}
			want := Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"accounts", "payments"}, Audience: "aud", Lifetime: time.Hour}
			if got := a.Request(); got.Merchant != want.Merchant || got.Organisation != want.Organisation || !slices.Equal(got.Scopes, want.Scopes) ||
				got.Audience != want.Audience || got.Lifetime != want.Lifetime {
				t.Errorf("Request() = %+v, want %+v", got, want)
			}
			if a.Profile != c.Profile || alone.Profile == p {
				t.Error("bindings made from one profile must share it; NewBinding makes its own")
			}
		})
	}
}

// TestDroppedEntryUnpinsBinding: a token dropped from the cache (purged,
// or expired and cleaned up) is no longer its binding's last served
// entry, so that an idle binding does not keep it in memory; the
// binding's next lookup fetches a new token.
func TestDroppedEntryUnpinsBinding(t *testing.T) {
	for _, tt := range []struct {
		name string
		drop func(br *Broker, b *Binding, e *Entry)
	}{
		{"purge", func(br *Broker, b *Binding, e *Entry) {
			if br.Reject(b, e.value()) != RejectionPurged {
				t.Fatal("not purged")
			}
		}},
		{"expired and cleaned up", func(br *Broker, b *Binding, e *Entry) {
			// The cache's own expiry is on the real clock: 1ns, then
			// its cleanup until the entry is gone.
			br.cache.Set(b.key, e, time.Nanosecond)
			for deadline := time.Now().Add(10 * time.Second); br.cache.ItemCount() > 0; {
				if time.Now().After(deadline) {
					t.Fatal("entry not cleaned up")
				}
				br.cache.DeleteExpired()
			}
		}},
		{"purge matching", func(br *Broker, _ *Binding, _ *Entry) {
			if len(br.PurgeMerchant("acme")) != 1 {
				t.Fatal("not purged")
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &countingSource{clock: clock, life: time.Hour}
			br := New(Options{Now: clock.Now})
			defer br.Close()
			b := NewBinding("nuapay#1", src, Request{Merchant: "acme", Organisation: "org-acme"})
			e, _, err := br.Get(context.Background(), b)
			if err != nil || b.current.Load() != e {
				t.Fatalf("first lookup: %v", err)
			}
			tt.drop(br, b, e)
			if b.current.Load() != nil {
				t.Error("the binding still holds the dropped entry")
			}
			if e2, r, err := br.Get(context.Background(), b); err != nil || r != Miss || e2 == e || src.calls.Load() != 2 {
				t.Errorf("lookup after the drop: %v, %v, %d token API calls, want a miss and 2", r, err, src.calls.Load())
			}
		})
	}
}

// TestHeapBoundedWithMixedLifetimes: tokens of very different lifetimes
// refreshed side by side (many short-lived tokens, a few long-lived ones
// minted in between) keep heap memory close to the live entries: a
// long-lived token keeps no short-lived, long replaced one alive.
func TestHeapBoundedWithMixedLifetimes(t *testing.T) {
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var m runtime.MemStats
		runtime.ReadMemStats(&m)
		return m.HeapAlloc
	}
	const (
		nShort, nLong = 6400, 600 // 8 % of the tokens live 12 times longer
		ratio, rounds = 12, 24
		tokenBytes    = 1000
	)
	now := time.Now()
	pad := strings.Repeat("x", tokenBytes)
	tok := func(i, r int, life time.Duration) Token {
		return Token{Value: Secret(fmt.Sprintf("%06d-%04d-", i, r) + pad), Type: "Bearer", IssuedAt: now, Expiry: now.Add(life)}
	}
	bindings := func(prefix string, n int) []*Binding {
		out := make([]*Binding, n)
		for i := range out {
			out[i] = NewBinding(prefix, nil, Request{Merchant: fmt.Sprint(prefix, i), Organisation: fmt.Sprint(prefix, i)})
		}
		return out
	}
	br := New(Options{})
	defer br.Close()
	shorts, longs := bindings("s", nShort), bindings("l", nLong)
	base := heap()
	// Each round replaces every short-lived token once and 1/ratio of the
	// long-lived ones, minted in between the short ones as refreshes are.
	every := nShort / (nLong / ratio)
	li := 0
	for r := range rounds {
		for i, b := range shorts {
			br.storeFetched(b, br.newEntry(b, tok(i, r, time.Hour), OriginMinted), now, nil)
			if i%every == 0 {
				b := longs[li%nLong]
				br.storeFetched(b, br.newEntry(b, tok(li, r, ratio*time.Hour), OriginMinted), now, nil)
				li++
			}
		}
	}
	got := heap() - base
	live := uint64(nShort+nLong) * (tokenBytes + 200)
	t.Logf("heap %d KiB for about %d KiB of live entries (x%.1f)", got>>10, live>>10, float64(got)/float64(live))
	if limit := 3 * live; got > limit {
		t.Errorf("heap grew by %d KiB for about %d KiB of live entries (x%.1f), want at most x3: stale entries are kept alive",
			got>>10, live>>10, float64(got)/float64(live))
	}
	runtime.KeepAlive(shorts)
	runtime.KeepAlive(longs)
}

// TestEntryTimesCompareAsTheTokens: an entry's times compare as the
// token's own: on the monotonic clock for an expiry computed from
// time.Now, on the wall clock for an absolute one (a JWT exp, Nuapay's
// expiryTime, a token adopted from the shared tier). A refresh-ahead adopts only a
// token that outlives the one it refreshes, whatever the frames.
func TestEntryTimesCompareAsTheTokens(t *testing.T) {
	now := time.Now() // with a monotonic reading
	wall := func(t time.Time) time.Time { return t.Round(0) }
	br := New(Options{Now: time.Now, RefreshWindow: 0.25})
	defer br.Close()
	b := NewBinding("src", nil, Request{Merchant: "m", Organisation: "o"})
	for _, tc := range []struct {
		name      string
		expiry    time.Time
		validNow  bool
		validLate bool // at expiry + 1s
	}{
		{"expires_in (monotonic)", now.Add(time.Hour), true, false},
		{"absolute expiry (wall clock)", wall(now.Add(time.Hour)), true, false},
		{"absolute, already expired", wall(now.Add(-time.Second)), false, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := br.newEntry(b, Token{Value: "tok", Expiry: tc.expiry, IssuedAt: now}, OriginMinted)
			if got := e.Token().Expiry; !got.Equal(tc.expiry) {
				t.Errorf("Token().Expiry = %v, want %v", got, tc.expiry)
			}
			if got := e.Token().IssuedAt; !got.Equal(now) {
				t.Errorf("Token().IssuedAt = %v, want %v", got, now)
			}
			// Planned in the refresh window, before its last 90s (1h/40).
			start := br.refreshAt(Token{Expiry: tc.expiry, IssuedAt: now})
			if got, end := e.RefreshAt(), tc.expiry.Add(-90*time.Second); got.Before(start) || (got.After(start) && !got.Before(end)) {
				t.Errorf("RefreshAt = %v, want from %v to %v", got, start, end)
			}
			if got := e.validAt(now, 0); got != tc.validNow {
				t.Errorf("validAt(now) = %t, want %t", got, tc.validNow)
			}
			if got := e.validAt(tc.expiry.Add(time.Second), 0); got != tc.validLate {
				t.Errorf("validAt(expiry+1s) = %t, want %t", got, tc.validLate)
			}
		})
	}
	// A refresh-ahead's token must outlive the one it refreshes.
	cur := br.newEntry(b, Token{Value: "cur", Expiry: now.Add(time.Hour), IssuedAt: now.Add(-3 * time.Hour)}, OriginMinted)
	for _, tc := range []struct {
		name   string
		expiry time.Time
		want   bool
	}{
		{"expires 5s before the current token", now.Add(time.Hour - 5*time.Second), false},
		{"the current token's own expiry", now.Add(time.Hour), false},
		{"the current token's own expiry, as an absolute time", wall(now.Add(time.Hour)), false},
		{"outlives it (monotonic)", now.Add(2 * time.Hour), true},
		{"outlives it (absolute)", wall(now.Add(2 * time.Hour)), true},
	} {
		if got := br.usable(cur)(Token{Value: "new", Expiry: tc.expiry}); got != tc.want {
			t.Errorf("%s: usable by the refresh = %t, want %t", tc.name, got, tc.want)
		}
	}
}
