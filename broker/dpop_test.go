package broker

import (
	"context"
	"strings"
	"testing"
	"time"
	"unsafe"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// dpopSource is a source whose tokens are bound to key (nil: bearer).
type dpopSource struct {
	SourceFunc
	key *dpop.Key
}

func (s dpopSource) DPoPKey() *dpop.Key { return s.key }

// TestDPoPEntryHeader: a token of type DPoP (any case) is cached with the
// header "DPoP <token>", others with "Bearer <token>"; the value is a
// slice of the header, and a hit allocates nothing.
func TestDPoPEntryHeader(t *testing.T) {
	const value = "eyJhbGciOiJFUzI1NiJ9.payload.sig"
	for _, tc := range []struct{ typ, prefix string }{
		{"Bearer", "Bearer "}, {"bearer", "Bearer "}, {"", "Bearer "}, {"DPoP", "DPoP "}, {"dpop", "DPoP "},
	} {
		t.Run(tc.typ, func(t *testing.T) {
			src := SourceFunc(func(context.Context, Request) (Token, error) {
				return Token{Value: Secret(strings.Clone(value)), Type: tc.typ, Expiry: time.Now().Add(time.Hour)}, nil
			})
			br := New(Options{})
			defer br.Close()
			b := NewBinding("src", src, Request{Merchant: "m1", Organisation: "org1"})
			e, _, err := br.Get(context.Background(), b)
			if err != nil {
				t.Fatal(err)
			}
			if e.Header() != tc.prefix+value || e.Token().Value.Reveal() != value || e.Token().Type != tc.typ && tc.typ != "" {
				t.Errorf("header %q, value %q, type %q", e.Header(), e.Token().Value.Reveal(), e.Token().Type)
			}
			if unsafe.StringData(e.Token().Value.Reveal()) != unsafe.StringData(e.Header()[len(tc.prefix):]) {
				t.Error("the token value is not a slice of the header string")
			}
			if br.Reject(b, Secret(value)) != RejectionPurged {
				t.Error("Purge by value did not find the token")
			}
			if _, _, err := br.Get(context.Background(), b); err != nil {
				t.Fatal(err)
			}
			if n := testing.AllocsPerRun(100, func() {
				if e, _, err := br.Get(context.Background(), b); err != nil || len(e.Header()) == 0 {
					t.Fatal(err)
				}
			}); n != 0 {
				t.Errorf("a hit allocates %v times", n)
			}
		})
	}
}

// TestDPoPProfile: a DPoP source's profiles carry its key, and the key's
// thumbprint is part of the cache key: sidecars with different keys never
// share a token, even under one source ID.
func TestDPoPProfile(t *testing.T) {
	k1, k2 := dpoptest.NewKey(t), dpoptest.NewKey(t)
	req := Request{Merchant: "m1", Organisation: "org1", Scopes: []string{"payments"}}
	bearer := NewBinding("bank#1", dpopSource{}, req)
	b1 := NewBinding("bank#1", dpopSource{key: k1}, req)
	b1again := NewBindingFor(NewProfile("bank#1", dpopSource{key: k1}, req.Scopes, "", 0), "m1", "org1")
	b2 := NewBinding("bank#1", dpopSource{key: k2}, req)
	plain := NewBinding("bank#1", SourceFunc(nil), req)
	if bearer.DPoP != nil || b1.DPoP != k1 || b2.DPoP != k2 {
		t.Fatalf("Profile.DPoP: bearer %v, b1 %v, b2 %v", bearer.DPoP, b1.DPoP, b2.DPoP)
	}
	if b1.Key() != b1again.Key() || bearer.Key() != plain.Key() {
		t.Error("equal profiles have different keys")
	}
	if b1.Key() == b2.Key() || b1.Key() == bearer.Key() {
		t.Error("tokens bound to different keys (or to none) share a cache key")
	}
}
