package module

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tokenbroker/caddy-token-broker/broker/callers"
	"github.com/tokenbroker/caddy-token-broker/integration/jwttest"
)

// mustProvision provisions p, allowing payments to act for acme when p
// has no allow rule.
func mustProvision(t *testing.T, p *CallerPolicy) *callers.Policy {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if p.Allow == nil {
		p.Allow = map[string][]string{"payments": {"acme"}}
	}
	policy, err := p.provision(ctx)
	if err != nil {
		t.Fatal(err)
	}
	return policy
}

func TestParseCallers(t *testing.T) {
	tests := []struct {
		name, input, wantErr string
		want                 *CallerPolicy
	}{
		{"full", `callers {
			issuer https://k8s
			audience tb
			ca_file /ca.pem
			jwks_url https://k8s/keys
			refresh_interval 1m
			header Proxy-Authorization
			allow sa:a acme
		}`, "", &CallerPolicy{Issuer: "https://k8s", Audience: "tb", CAFile: "/ca.pem", JWKSURL: "https://k8s/keys",
			RefreshInterval: caddy.Duration(time.Minute), Header: "Proxy-Authorization", Allow: map[string][]string{"sa:a": {"acme"}}}},
		{"jwks_file", "callers {\nissuer https://k8s\naudience tb\njwks_file /k.json\nallow sa:a *\n}", "",
			&CallerPolicy{Issuer: "https://k8s", Audience: "tb", JWKSFile: "/k.json", Allow: map[string][]string{"sa:a": {"*"}}}},
		{"header not redacted", "callers {\nissuer https://k8s\naudience tb\nheader X-Caller-JWT\n}", "callers header 'X-Caller-JWT': the caller JWT can only be in Authorization or Proxy-Authorization, which Caddy's logs redact, at Testfile:4", nil},
		{"refresh_interval zero", "callers {\nissuer https://k8s\naudience tb\nrefresh_interval 0s\n}", "Testfile:4", nil},
		{"jwks_file with ca_file", "callers {\nissuer https://k8s\naudience tb\njwks_file /k\nca_file /c\n}", "drop jwks_url and ca_file", nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d := caddyfile.NewTestDispenser(tt.input)
			d.Next()
			got, err := parseCallers(d)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			gj, _ := json.Marshal(got)
			wj, _ := json.Marshal(tt.want)
			if string(gj) != string(wj) {
				t.Fatalf("got %s\nwant %s", gj, wj)
			}
		})
	}
}

// localIssuer signs caller JWTs with an ES256 key whose public half is in
// a jwks_file.
type localIssuer struct {
	signer   jose.Signer
	jwksFile string
}

func newLocalIssuer(t *testing.T) *localIssuer {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: "k1"}},
		(&jose.SignerOptions{}).WithType("at+jwt"))
	if err != nil {
		t.Fatal(err)
	}
	set, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: "k1", Algorithm: "ES256", Use: "sig"}}})
	path := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(path, set, 0o600); err != nil {
		t.Fatal(err)
	}
	return &localIssuer{signer: signer, jwksFile: path}
}

func (l *localIssuer) token(t *testing.T, sub, aud string, exp time.Time) string {
	s, err := jwt.Signed(l.signer).Claims(jwt.Claims{Issuer: "https://issuer.example", Subject: sub, Audience: jwt.Audience{aud},
		Expiry: jwt.NewNumericDate(exp), IssuedAt: jwt.NewNumericDate(time.Now().Add(-time.Minute))}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// TestCallerChallenge checks RFC 6750 §3.1: without credentials the
// challenge carries no error code; a presented token that fails gets
// error="invalid_token"; other refusals carry no challenge.
func TestCallerChallenge(t *testing.T) {
	li := newLocalIssuer(t)
	p := mustProvision(t, &CallerPolicy{Issuer: "https://issuer.example", Audience: "token-broker", JWKSFile: li.jwksFile,
		Allow: map[string][]string{"payments": {"acme"}}})
	good := li.token(t, "payments", "token-broker", time.Now().Add(time.Hour))
	const noCode, invalid = `Bearer realm="token_broker"`, `Bearer realm="token_broker", error="invalid_token"`
	tests := []struct {
		name          string
		authorization []string
		merchant      string
		wantStatus    int
		wantChallenge string
	}{
		{"no credentials", nil, "acme", 401, noCode},
		{"another scheme", []string{"Basic dXNlcjpwYXNz"}, "acme", 401, noCode},
		{"Bearer without token", []string{"Bearer"}, "acme", 401, noCode},
		{"Bearer and spaces", []string{"Bearer   "}, "acme", 401, noCode},
		{"garbage", []string{"Bearer not.a.jwt"}, "acme", 401, invalid},
		{"expired", []string{"Bearer " + li.token(t, "payments", "token-broker", time.Now().Add(-time.Minute))}, "acme", 401, invalid},
		{"wrong audience", []string{"Bearer " + li.token(t, "payments", "other", time.Now().Add(time.Hour))}, "acme", 401, invalid},
		{"forged", []string{"Bearer " + jwttest.Forge(t, good, 1, "")}, "acme", 401, invalid},
		{"lower-case scheme", []string{"bearer " + good}, "acme", 200, ""},
		{"allowed", []string{"Bearer " + good}, "acme", 200, ""},
		{"merchant not allowed", []string{"Bearer " + good}, "globex", 403, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, okSource(&calls), "json")
			h.callers = p
			req := httptest.NewRequest("GET", "/tpp/payments", nil)
			req.Header.Set("X-Merchant-Id", tt.merchant)
			for _, v := range tt.authorization {
				req.Header.Add("Authorization", v)
			}
			rec, got, _ := serve(t, h, req)
			status := rec.Code
			if got != nil {
				status = 200
				if v := got.Header.Values("Authorization"); len(v) != 1 || v[0] != "Bearer "+testToken {
					t.Fatalf("upstream Authorization = %q", v)
				}
			}
			if status != tt.wantStatus || rec.Header().Get("WWW-Authenticate") != tt.wantChallenge {
				t.Fatalf("got %d WWW-Authenticate %q, want %d %q", status, rec.Header().Get("WWW-Authenticate"), tt.wantStatus, tt.wantChallenge)
			}
		})
	}

	// Keys unavailable: 503 and no challenge, the token is not at fault.
	down := httptest.NewServer(http.NotFoundHandler())
	down.Close()
	pd := mustProvision(t, &CallerPolicy{Issuer: "https://issuer.example", Audience: "token-broker", JWKSURL: down.URL + "/keys"})
	var calls atomic.Int64
	h := newTestHandler(t, okSource(&calls), "json")
	h.callers = pd
	req := httptest.NewRequest("GET", "/tpp/payments", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	req.Header.Set("Authorization", "Bearer "+good)
	rec, _, _ := serve(t, h, req)
	if rec.Code != 503 || rec.Header().Get("WWW-Authenticate") != "" || !strings.Contains(rec.Body.String(), "caller_keys_unavailable") {
		t.Fatalf("keys down: %d %q %s", rec.Code, rec.Header().Get("WWW-Authenticate"), rec.Body)
	}
}
