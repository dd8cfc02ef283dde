package broker

import (
	"context"
	"slices"
	"strings"
	"testing"
	"time"
	"unsafe"
)

// TestEntryIsOneStringAndItself: the header, the token value and the
// token ID are one string (slices of it), the fingerprint is in the entry,
// and what the accessors return is unchanged: Header is "Bearer <token>"
// without the ID, Token().ID the ID, Fingerprint the fingerprint of the
// value, FingerprintValue the same as a plain string.
func TestEntryIsOneStringAndItself(t *testing.T) {
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
			if id != "" && unsafe.StringData(tok.ID) != unsafe.StringData(e.header[len(e.Header()):]) {
				t.Error("the token ID is not a slice of the header string")
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

// TestBindingInitInPlace: a Binding filled in place (Init, InitFrom), as
// embedded in a larger struct, has the key and scopes NewBinding computes.
func TestBindingInitInPlace(t *testing.T) {
	src := &countingSource{}
	req := Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"payments", "accounts"}, Lifetime: time.Hour}
	nb := NewBinding("src", src, req)
	var a, c struct {
		Binding
		extra int
	}
	a.Init("src", src, req)
	c.InitFrom(nb)
	if a.Key() != nb.Key() || c.Key() != nb.Key() || !slices.Equal(a.Request.Scopes, []string{"accounts", "payments"}) {
		t.Fatalf("keys %q %q, want %q; scopes %q", a.Key(), c.Key(), nb.Key(), a.Request.Scopes)
	}
}
