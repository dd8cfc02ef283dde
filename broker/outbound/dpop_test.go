package outbound

import (
	"crypto/ed25519"
	"crypto/rand"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop/dpoptest"
)

func testKey(t testing.TB) *dpop.Key {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := dpop.NewKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestDPoPSign: the proof names the request as the upstream receives it
// (Host header over the URL's host, the escaped path, no query), hashes
// the token the request carries, replaces any DPoP header, and carries the
// nonce the origin last sent; a request without a DPoP token leaves
// without a DPoP header.
func TestDPoPSign(t *testing.T) {
	k := testKey(t)
	now := time.Unix(1_800_000_000, 0)
	tests := []struct {
		name      string
		method    string
		url       string
		host      string // req.Host; "" none
		auth      string
		nonce     string // remembered for the origin first
		wantHTU   string // "" no proof
		wantNonce string
	}{
		{name: "URL host", method: "GET", url: "http://127.0.0.1:8080/accounts?x=1", auth: "DPoP tok-1",
			wantHTU: "http://127.0.0.1:8080/accounts"},
		{name: "Host header", method: "POST", url: "https://10.0.0.1:8443/pay", host: "api.bank.test", auth: "DPoP tok-1",
			wantHTU: "https://api.bank.test/pay"},
		{name: "default port, escaped path", method: "GET", url: "https://api.bank.test:443/a%2Fb/c", auth: "DPoP tok-1",
			wantHTU: "https://api.bank.test/a%2Fb/c"},
		{name: "empty path", method: "GET", url: "http://rs.test", auth: "dpop tok-1", wantHTU: "http://rs.test/"},
		{name: "remembered nonce", method: "GET", url: "http://rs.test/x", auth: "DPoP tok-1", nonce: "n-42",
			wantHTU: "http://rs.test/x", wantNonce: "n-42"},
		{name: "bearer token: no proof", method: "GET", url: "http://rs.test/x", auth: "Bearer tok-1"},
		{name: "no token: no proof", method: "GET", url: "http://rs.test/x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(tt.method, tt.url, nil)
			req.Host = tt.host
			if tt.auth != "" {
				req.Header.Set("Authorization", tt.auth)
			}
			req.Header.Set("DPoP", "caller-proof")
			d := AcquireDPoP(k)
			defer d.Release()
			if tt.nonce != "" {
				d.Observe("http://rs.test", http.Header{"Dpop-Nonce": {tt.nonce}})
			}
			origin, err := d.Sign(req, now)
			if err != nil {
				t.Fatal(err)
			}
			if !d.Signed() {
				t.Error("Signed = false after Sign")
			}
			proofs := req.Header.Values("DPoP")
			if tt.wantHTU == "" {
				if len(proofs) != 0 || origin != "" {
					t.Fatalf("DPoP %q, origin %q: want none", proofs, origin)
				}
				return
			}
			if len(proofs) != 1 {
				t.Fatalf("DPoP %q: want one proof", proofs)
			}
			p, err := dpoptest.Verify(proofs[0])
			if err != nil {
				t.Fatal(err)
			}
			want := dpoptest.Proof{Alg: dpop.EdDSA, JKT: k.Thumbprint(), JTI: p.JTI, HTM: tt.method, HTU: tt.wantHTU,
				IAT: now.Unix(), ATH: dpop.ATH("tok-1"), Nonce: tt.wantNonce}
			if p != want {
				t.Errorf("proof %+v\nwant  %+v", p, want)
			}
		})
	}
}

// TestDPoPObserve: a nonce from any answer is used by the next proof to
// that origin, not to another one.
func TestDPoPObserve(t *testing.T) {
	d := AcquireDPoP(testKey(t))
	defer d.Release()
	req := httptest.NewRequest("GET", "http://rs.test/a", nil)
	req.Header.Set("Authorization", "DPoP tok")
	origin, err := d.Sign(req, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	d.Observe(origin, http.Header{"Dpop-Nonce": {"fresh"}})
	for _, tc := range []struct{ url, want string }{{"http://rs.test/b", "fresh"}, {"http://other.test/b", ""}} {
		req := httptest.NewRequest("GET", tc.url, nil)
		req.Header.Set("Authorization", "DPoP tok")
		if _, err := d.Sign(req, time.Now()); err != nil {
			t.Fatal(err)
		}
		p, err := dpoptest.Verify(req.Header.Get("DPoP"))
		if err != nil {
			t.Fatal(err)
		}
		if p.Nonce != tc.want {
			t.Errorf("%s: nonce %q, want %q", tc.url, p.Nonce, tc.want)
		}
	}
}

// BenchmarkDPoPSign: the work a DPoP-bound request adds in the transport,
// Sign, against the proof alone (Key.Proof with the same claims): the
// difference is the htu, ath and nonce lookup.
func BenchmarkDPoPSign(b *testing.B) {
	k := testKey(b)
	now := time.Now()
	req := httptest.NewRequest("GET", "http://127.0.0.1:8080/accounts/123?from=2026-01-01", nil)
	req.Header.Set("Authorization", "DPoP "+strings.Repeat("t", 900))
	b.Run("Sign", func(b *testing.B) {
		d := AcquireDPoP(k)
		defer d.Release()
		b.ReportAllocs()
		for b.Loop() {
			if _, err := d.Sign(req, now); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Proof", func(b *testing.B) {
		ath := dpop.ATH(strings.Repeat("t", 900))
		b.ReportAllocs()
		for b.Loop() {
			if _, err := k.Proof("GET", "http://127.0.0.1:8080/accounts/123", ath, "", now); err != nil {
				b.Fatal(err)
			}
		}
	})
}
