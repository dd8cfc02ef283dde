package outbound

import (
	"cmp"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// wantATH is the ath of token (RFC 9449 §4.2), computed here as the RFC
// says: base64url(SHA-256(token)).
func wantATH(token string) string {
	sum := sha256.Sum256([]byte(token))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}

// TestDPoPSign: the token goes in Authorization with its proof, which
// names the request as the upstream receives it (Host header over the
// URL's host, the escaped path, no query), hashes the token, replaces any
// Authorization and DPoP header, and carries the nonce the upstream's
// origin (the URL's, not the Host header's) last sent; a binding without a
// token sends neither header.
func TestDPoPSign(t *testing.T) {
	k := dpoptest.NewKey(t)
	now := time.Unix(1_800_000_000, 0)
	tests := []struct {
		name      string
		method    string
		url       string
		host      string // req.Host; "" none
		token     string // SetToken; "" none
		nonces    map[string]string
		wantHTU   string // "" no token, no proof
		wantNonce string
	}{
		{name: "URL host", method: "GET", url: "http://upstream.test:8443/accounts?x=1", token: "DPoP tok-1",
			wantHTU: "http://upstream.test:8443/accounts"},
		{name: "Host header", method: "POST", url: "https://10.0.0.1:8443/pay", host: "api.bank.test", token: "DPoP tok-1",
			wantHTU: "https://api.bank.test/pay"},
		{name: "default port, escaped path", method: "GET", url: "https://api.bank.test:443/a%2Fb/c", token: "DPoP tok-1",
			wantHTU: "https://api.bank.test/a%2Fb/c"},
		{name: "upper case", method: "GET", url: "HTTP://RS.Test:80/A", token: "DPoP tok-1", wantHTU: "http://rs.test/A"},
		{name: "empty path", method: "GET", url: "http://rs.test", token: "DPoP tok-1", wantHTU: "http://rs.test/"},
		{name: "remembered nonce", method: "GET", url: "http://rs.test/x", token: "DPoP tok-1",
			nonces: map[string]string{"http://rs.test": "n-42"}, wantHTU: "http://rs.test/x", wantNonce: "n-42"},
		{name: "nonce of the upstream, not of the Host header", method: "GET", url: "http://10.0.0.1:8080/x", host: "rs.test",
			token: "DPoP tok-1", nonces: map[string]string{"http://rs.test": "host-n", "http://10.0.0.1:8080": "up-n"},
			wantHTU: "http://rs.test/x", wantNonce: "up-n"},
		{name: "no token: no credential", method: "GET", url: "http://rs.test/x"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			req := httptest.NewRequest(tt.method, tt.url, nil)
			req.Host = tt.host
			req.URL.Scheme = strings.ToLower(req.URL.Scheme)
			req.Header.Set("Authorization", "Bearer caller")
			req.Header.Set("DPoP", "caller-proof")
			d := NewDPoP(k)
			if tt.token != "" {
				d.SetToken(tt.token, wantATH(strings.TrimPrefix(tt.token, "DPoP ")))
			}
			for origin, n := range tt.nonces {
				u, err := url.Parse(origin)
				if err != nil {
					t.Fatal(err)
				}
				k.SetNonce(dpop.ResourceServer, u, n)
			}
			if err := d.Sign(req, "", "", now); err != nil {
				t.Fatal(err)
			}
			if !d.Signed() {
				t.Error("Signed = false after Sign")
			}
			proofs, auth := req.Header.Values("DPoP"), req.Header.Values("Authorization")
			if tt.wantHTU == "" {
				if len(proofs) != 0 || len(auth) != 0 || d.Carries("") {
					t.Fatalf("DPoP %q, Authorization %q: want neither", proofs, auth)
				}
				return
			}
			if len(proofs) != 1 || len(auth) != 1 || auth[0] != tt.token || !d.Carries(tt.token) {
				t.Fatalf("DPoP %q, Authorization %q: want one proof and %q", proofs, auth, tt.token)
			}
			p, err := dpoptest.Verify(proofs[0])
			if err != nil {
				t.Fatal(err)
			}
			want := dpoptest.Proof{Alg: dpop.EdDSA, JKT: k.Thumbprint(), JTI: p.JTI, HTM: tt.method, HTU: tt.wantHTU,
				IAT: now.Unix(), ATH: wantATH("tok-1"), Nonce: tt.wantNonce}
			if p != want {
				t.Errorf("proof %+v\nwant  %+v", p, want)
			}
		})
	}
}

// TestDPoPObserve: a nonce from any answer is used by the next proof to
// that upstream origin, not to another one.
func TestDPoPObserve(t *testing.T) {
	k := dpoptest.NewKey(t)
	d := NewDPoP(k)
	d.SetToken("DPoP tok", wantATH("tok"))
	req := httptest.NewRequest("GET", "http://rs.test/a", nil)
	if err := d.Sign(req, "", "", time.Now()); err != nil {
		t.Fatal(err)
	}
	d.Observe(req, http.Header{"Dpop-Nonce": {"fresh"}})
	if err := k.RefusedNonce(dpop.ResourceServer, req.URL); err != nil {
		t.Fatal(err)
	}
	// A nonce over the limit is refused with a *dpop.NonceError that
	// names the resource server and the size, without the nonce; the
	// proofs keep the nonce before it.
	big := strings.Repeat("B", dpop.MaxNonce+1)
	d.Observe(req, http.Header{"Dpop-Nonce": {big}})
	err := k.RefusedNonce(dpop.ResourceServer, req.URL)
	var ne *dpop.NonceError
	if !errors.As(err, &ne) || ne.Server != dpop.ResourceServer || ne.Origin != "http://rs.test" || ne.Size != len(big) || strings.Contains(err.Error(), "BBBB") {
		t.Errorf("Observe of a nonce of %d bytes: %v", len(big), err)
	}
	for _, tc := range []struct{ url, want string }{{"http://rs.test/b", "fresh"}, {"http://other.test/b", ""}} {
		req := httptest.NewRequest("GET", tc.url, nil)
		if err := d.Sign(req, "", "", time.Now()); err != nil {
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

// TestDPoPEnd: once ended, a binding sends no credential, by Sign or
// SignCopy, whatever Authorization and DPoP the request had, and keeps no
// nonce from an answer.
func TestDPoPEnd(t *testing.T) {
	k := dpoptest.NewKey(t)
	d := NewDPoP(k)
	d.SetToken("DPoP tok", wantATH("tok"))
	req := httptest.NewRequest("GET", "http://rs.test/a", nil)
	if err := d.Sign(req, "", "", time.Now()); err != nil || req.Header.Get(DPoPHeader) == "" {
		t.Fatalf("before End: DPoP %q, %v: want a proof", req.Header.Get(DPoPHeader), err)
	}
	d.End()
	for _, tc := range []struct {
		name string
		sign func(*http.Request) (*http.Request, error)
	}{
		{name: "Sign", sign: func(r *http.Request) (*http.Request, error) { return r, d.Sign(r, "", "", time.Now()) }},
		{name: "SignCopy", sign: func(r *http.Request) (*http.Request, error) { return d.SignCopy(r, "", "", time.Now()) }},
	} {
		req := httptest.NewRequest("GET", "http://rs.test/a", nil)
		req.Header.Set("Authorization", "DPoP tok")
		req.Header.Set(DPoPHeader, "caller-proof")
		sent, err := tc.sign(req)
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if a, p := sent.Header.Values("Authorization"), sent.Header.Values(DPoPHeader); len(a) != 0 || len(p) != 0 {
			t.Errorf("%s after End: Authorization %d values, DPoP %d: want neither", tc.name, len(a), len(p))
		}
	}
	d.Observe(req, http.Header{"Dpop-Nonce": {"late"}})
	if n := k.Nonce(dpop.ResourceServer, req.URL); n != "" {
		t.Errorf("nonce %q kept after End, want none", n)
	}
}

// TestDPoPString: a binding describes itself without its token, whatever
// the verb.
func TestDPoPString(t *testing.T) {
	k := dpoptest.NewKey(t)
	d := NewDPoP(k)
	d.SetToken("DPoP tok", wantATH("tok"))
	want := "DPoP EdDSA " + k.Thumbprint()
	for verb, got := range map[string]string{
		"String": d.String(), "%v": fmt.Sprintf("%v", d), "%+v": fmt.Sprintf("%+v", d), "%#v": fmt.Sprintf("%#v", d),
	} {
		if !strings.Contains(got, want) || strings.Contains(got, "tok") || strings.Contains(got, wantATH("tok")) {
			t.Errorf("%s %q, want %q and no token", verb, got, want)
		}
	}
}

// BenchmarkDPoPSign: the work a DPoP-bound request adds in the transport,
// Sign, against the proof alone (Key.Proof with the same claims): the
// difference is the htu written from the URL, the nonce lookup and the
// two header values.
func BenchmarkDPoPSign(b *testing.B) {
	k := dpoptest.NewKey(b)
	now := time.Now()
	tok := strings.Repeat("t", 900)
	req := httptest.NewRequest("GET", "http://upstream.test:8443/accounts/123?from=2026-01-01", nil)
	b.Run("Sign", func(b *testing.B) {
		d := NewDPoP(k)
		d.SetToken("DPoP "+tok, dpop.ATH(tok))
		b.ReportAllocs()
		for b.Loop() {
			if err := d.Sign(req, "", "", now); err != nil {
				b.Fatal(err)
			}
		}
	})
	b.Run("Proof", func(b *testing.B) {
		ath := dpop.ATH(tok)
		b.ReportAllocs()
		for b.Loop() {
			if _, err := k.Proof("GET", "http://upstream.test:8443/accounts/123", ath, "", now); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// TestDPoPSignCopy: the copy carries the token and its proof; the request
// it was made from keeps its own headers.
func TestDPoPSignCopy(t *testing.T) {
	d := NewDPoP(dpoptest.NewKey(t))
	d.SetToken("DPoP tok-1", wantATH("tok-1"))
	req := httptest.NewRequest("GET", "http://upstream.test/accounts", nil)
	req.Header.Set("X-Trace", "1")
	sent, err := d.SignCopy(req, "", "", time.Unix(1_800_000_000, 0))
	if err != nil {
		t.Fatal(err)
	}
	if sent.Header.Get("Authorization") != "DPoP tok-1" || sent.Header.Get(DPoPHeader) == "" || sent.Header.Get("X-Trace") != "1" {
		t.Errorf("the copy's header %v: want the token, a proof and the request's headers", sent.Header)
	}
	if req.Header.Get("Authorization") != "" || req.Header.Get(DPoPHeader) != "" {
		t.Errorf("the request's header %v: want neither the token nor the proof", req.Header)
	}
}

// TestDPoPNoncesPerServer: an authorization server and a resource server
// that answer at one origin (an API gateway's host) each get their own
// nonces back (RFC 9449 §9: a nonce is accepted only by the server that
// issued it): once both handed one out, neither challenges again.
func TestDPoPNoncesPerServer(t *testing.T) {
	k := dpoptest.NewKey(t)
	ok := http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})
	as := &dpoptest.Gate{Nonce: "as-nonce", Next: ok}
	rs := &dpoptest.Gate{Nonce: "rs-nonce", ResourceServer: true, Next: ok}
	mux := http.NewServeMux()
	mux.Handle("/token", as)
	mux.Handle("/accounts", rs)
	srv := httptest.NewServer(mux)
	defer srv.Close()

	tokenClient := &http.Client{Transport: dpop.Transport(srv.Client().Transport, k)}
	token := func() int {
		resp, err := tokenClient.Post(srv.URL+"/token", "application/x-www-form-urlencoded", strings.NewReader("grant_type=client_credentials"))
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		return resp.StatusCode
	}
	api := func() int {
		d := NewDPoP(k)
		d.SetToken("DPoP tok", wantATH("tok"))
		req := httptest.NewRequest("GET", srv.URL+"/accounts", nil)
		req.RequestURI = ""
		sent, err := d.SignCopy(req, "", "", time.Now())
		if err != nil {
			t.Fatal(err)
		}
		resp, err := srv.Client().Do(sent)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		d.Observe(sent, resp.Header)
		return resp.StatusCode
	}
	// Each server hands out its nonce once.
	if s := token(); s != http.StatusBadRequest {
		t.Fatalf("first token request: %d, want the nonce challenge", s)
	}
	if s := api(); s != http.StatusUnauthorized {
		t.Fatalf("first API request: %d, want the nonce challenge", s)
	}
	for i := range 3 {
		if s := token(); s != http.StatusOK {
			t.Errorf("token request %d: %d, want 200 with the authorization server's nonce", i, s)
		}
		if s := api(); s != http.StatusOK {
			t.Errorf("API request %d: %d, want 200 with the resource server's nonce", i, s)
		}
	}
	if as.Challenges.Load() != 1 || rs.Challenges.Load() != 1 {
		t.Errorf("challenges: authorization server %d, resource server %d, want 1 each", as.Challenges.Load(), rs.Challenges.Load())
	}
}

// TestDPoPSignForwarded: the forwarding headers reverse_proxy sets from
// the caller's request to the sidecar (X-Forwarded-Proto, X-Forwarded-Host)
// name the request the proof is for, so that a server behind a gateway it
// trusts, which rebuilds the target URI from them (RFC 9110 §7.1), finds
// the proof's htu (a non-ASCII Host in Punycode, as htu has it); a request
// without them gets none. A value reverse_proxy did not set from the
// caller's request (an operator's header_up) is left as it is, and so are
// Forwarded and X-Forwarded-Prefix.
func TestDPoPSignForwarded(t *testing.T) {
	const caller = "http://sidecar.local:8080" // the caller's request to the sidecar
	for _, tt := range []struct {
		name, url, host string
		caller          string            // default caller
		forwarded       map[string]string // the headers before Sign
		want            map[string]string // after Sign; "" absent
		kept            bool              // the forwarding headers name another URL than htu
	}{
		{name: "https upstream called over http", url: "https://10.0.0.1:8443/pay", host: "api.bank.test",
			forwarded: map[string]string{"X-Forwarded-Proto": "http", "X-Forwarded-Host": "sidecar.local:8080"},
			want:      map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.bank.test"}},
		{name: "http upstream called over https", url: "http://10.0.0.1:8080/pay", host: "rs.test:8080", caller: "https://sidecar.test",
			forwarded: map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "sidecar.test"},
			want:      map[string]string{"X-Forwarded-Proto": "http", "X-Forwarded-Host": "rs.test:8080"}},
		{name: "a Host with non-ASCII letters (header_up Host bänk.example): in Punycode, as sent", url: "https://10.0.0.1:8443/pay", host: "bänk.example",
			forwarded: map[string]string{"X-Forwarded-Proto": "http", "X-Forwarded-Host": "sidecar.local:8080"},
			want:      map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "xn--bnk-qla.example"}},
		{name: "the operator's header_up X-Forwarded-Host and X-Forwarded-Proto", url: "http://10.0.0.1:8080/pay", host: "rs.test:8080", kept: true,
			forwarded: map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.partner.example"},
			want:      map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.partner.example"}},
		{name: "the operator's header_up X-Forwarded-Host only", url: "https://10.0.0.1:8443/pay", host: "api.bank.test", kept: true,
			forwarded: map[string]string{"X-Forwarded-Proto": "http", "X-Forwarded-Host": "gw.partner.example"},
			want:      map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "gw.partner.example"}},
		{name: "Forwarded and X-Forwarded-Prefix are not rewritten", url: "https://10.0.0.1:8443/pay", host: "api.bank.test",
			forwarded: map[string]string{"X-Forwarded-Proto": "http", "X-Forwarded-Host": "sidecar.local:8080",
				"Forwarded": "proto=http;host=sidecar.local:8080", "X-Forwarded-Prefix": "/api"},
			want: map[string]string{"X-Forwarded-Proto": "https", "X-Forwarded-Host": "api.bank.test",
				"Forwarded": "proto=http;host=sidecar.local:8080", "X-Forwarded-Prefix": "/api"}},
		{name: "none sent, none added", url: "https://api.bank.test/pay",
			want: map[string]string{"X-Forwarded-Proto": "", "X-Forwarded-Host": ""}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := NewDPoP(dpoptest.NewKey(t))
			d.SetToken("DPoP tok-1", wantATH("tok-1"))
			req := httptest.NewRequest("POST", tt.url, nil)
			req.Host = tt.host
			for name, v := range tt.forwarded {
				req.Header.Set(name, v)
			}
			scheme, host, _ := strings.Cut(cmp.Or(tt.caller, caller), "://")
			if err := d.Sign(req, scheme, host, time.Now()); err != nil {
				t.Fatal(err)
			}
			for name, v := range tt.want {
				if got := req.Header.Values(name); v == "" && len(got) != 0 || v != "" && (len(got) != 1 || got[0] != v) {
					t.Errorf("%s: %q, want %q", name, got, v)
				}
			}
			p, err := dpoptest.Verify(req.Header.Get(DPoPHeader))
			if err != nil {
				t.Fatal(err)
			}
			if len(tt.forwarded) > 0 && !tt.kept {
				trusted := req.Header.Get("X-Forwarded-Proto") + "://" + req.Header.Get("X-Forwarded-Host") + req.URL.EscapedPath()
				if !dpoptest.SameURL(p.HTU, trusted) {
					t.Errorf("htu %s; a server trusting the forwarding headers rebuilds %s", p.HTU, trusted)
				}
			}
		})
	}
}
