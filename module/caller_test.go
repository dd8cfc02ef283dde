package module

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// fakeClock is a clock the test moves.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Now()} }

func (c *fakeClock) now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) advance(d time.Duration) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.t = c.t.Add(d)
}

// provisioned provisions p with clock (nil: the real one).
func provisioned(t *testing.T, p *CallerPolicy, clock *fakeClock) (*CallerPolicy, error) {
	t.Helper()
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	t.Cleanup(cancel)
	if clock != nil {
		p.now = clock.now
	}
	if p.Allow == nil {
		p.Allow = map[string][]string{"payments": {"acme"}}
	}
	return p, p.provision(ctx)
}

func mustProvision(t *testing.T, p *CallerPolicy, clock *fakeClock) *CallerPolicy {
	t.Helper()
	p, err := provisioned(t, p, clock)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// authn runs authenticate on a request carrying the value in Authorization
// ("" for none).
func authn(p *CallerPolicy, authorization string) (string, *callerError) {
	r := httptest.NewRequest("GET", "/", nil)
	if authorization != "" {
		r.Header.Set("Authorization", authorization)
	}
	return p.authenticate(r)
}

// forge changes a JWT's claims (and, if kid is not "", its kid) but keeps
// its signature, which no longer matches.
func forge(t *testing.T, token string, i int, kid string) string {
	t.Helper()
	parts := strings.Split(token, ".")
	if kid != "" {
		var hdr map[string]any
		raw, _ := base64.RawURLEncoding.DecodeString(parts[0])
		if err := json.Unmarshal(raw, &hdr); err != nil {
			t.Fatal(err)
		}
		hdr["kid"] = kid
		b, _ := json.Marshal(hdr)
		parts[0] = base64.RawURLEncoding.EncodeToString(b)
	}
	var claims map[string]any
	raw, _ := base64.RawURLEncoding.DecodeString(parts[1])
	if err := json.Unmarshal(raw, &claims); err != nil {
		t.Fatal(err)
	}
	claims["sub"] = fmt.Sprintf("forged-%d", i)
	b, _ := json.Marshal(claims)
	parts[1] = base64.RawURLEncoding.EncodeToString(b)
	return strings.Join(parts, ".")
}

// TestCallerKeysRefreshRateLimited is issue 12's acceptance: forged tokens
// with a known kid cost at most one key-set fetch per refresh interval,
// made-up kids at most one per unknownKidGap, and a key rotation at the
// issuer is still picked up.
func TestCallerKeysRefreshRateLimited(t *testing.T) {
	iss := startIssuer(t, false, "payments")
	clock := newFakeClock()
	p := mustProvision(t, &CallerPolicy{Issuer: iss.URL, Audience: callerAudience}, clock)
	good := iss.token(t, http.DefaultClient, "payments")

	// refused sends n forged tokens, in parallel or one after the other
	// (go-oidc's RemoteKeySet fetched once per token then).
	refused := func(n int, parallel bool, tok func(i int) string) {
		t.Helper()
		var wg sync.WaitGroup
		var accepted atomic.Int64
		for i := range n {
			wg.Add(1)
			send := func() {
				defer wg.Done()
				if _, cerr := authn(p, "Bearer "+tok(i)); cerr == nil || cerr.code.Status() != http.StatusUnauthorized {
					accepted.Add(1)
				}
			}
			if parallel {
				go send()
			} else {
				send()
			}
		}
		wg.Wait()
		if accepted.Load() != 0 {
			t.Fatalf("%d forged tokens were not refused with 401", accepted.Load())
		}
	}
	fetches := func(want int64) {
		t.Helper()
		if got := iss.JWKSFetches.Load(); got != want {
			t.Fatalf("key-set fetches = %d, want %d", got, want)
		}
	}

	// 100 forged tokens with the issuer's kid: one fetch (the first
	// verification ever), none after.
	refused(100, false, func(i int) string { return forge(t, good, i, "") })
	fetches(1)
	if sub, cerr := authn(p, "Bearer "+good); cerr != nil || sub != "payments" {
		t.Fatalf("good token: %q %+v", sub, cerr)
	}
	fetches(1)

	// Made-up kids: nothing within unknownKidGap of the last fetch, then
	// one fetch for all of them.
	refused(20, true, func(i int) string { return forge(t, good, i, fmt.Sprintf("made-up-%d", i)) })
	fetches(1)
	clock.advance(unknownKidGap)
	refused(20, true, func(i int) string { return forge(t, good, i, fmt.Sprintf("made-up-again-%d", i)) })
	fetches(2)

	// Known kid: after the interval, one fetch again, then none.
	clock.advance(DefaultKeysRefreshInterval - time.Second)
	refused(100, true, func(i int) string { return forge(t, good, 1000+i, "") })
	fetches(2)
	clock.advance(time.Second)
	refused(100, true, func(i int) string { return forge(t, good, 2000+i, "") })
	fetches(3)

	// Rotation: a token signed with the new key is refused only within
	// unknownKidGap of the last fetch, then accepted after one fetch.
	iss.rotate(t)
	rotated := iss.token(t, http.DefaultClient, "payments")
	if _, cerr := authn(p, "Bearer "+rotated); cerr == nil {
		t.Fatal("a new kid was fetched within unknownKidGap of the last fetch")
	}
	fetches(3)
	clock.advance(unknownKidGap)
	if sub, cerr := authn(p, "Bearer "+rotated); cerr != nil || sub != "payments" {
		t.Fatalf("token signed with the rotated key: %q %+v", sub, cerr)
	}
	fetches(4)
	if iss.Discoveries.Load() != 1 {
		t.Fatalf("discoveries = %d, want 1", iss.Discoveries.Load())
	}

	// Keys older than keysMaxAge are fetched again once, so a key the
	// issuer withdrew stops being trusted.
	clock.advance(keysMaxAge)
	if _, cerr := authn(p, "Bearer "+forge(t, rotated, 1, "")); cerr == nil {
		t.Fatal("forged token accepted")
	}
	fetches(5)
}

// TestCallerIssuerTrust: an issuer behind TLS with a CA of its own is
// trusted with ca_file only, and jwks_file needs no request at all.
func TestCallerIssuerTrust(t *testing.T) {
	iss := startIssuer(t, true, "payments")
	good := iss.token(t, trusting(t, iss.CAFile), "payments")
	other := startIssuer(t, true)
	plain := startIssuer(t, false, "payments")
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(jwksFile, plain.jwksJSON(t), 0o600); err != nil {
		t.Fatal(err)
	}
	plainGood := plain.token(t, http.DefaultClient, "payments")

	tests := []struct {
		name       string
		policy     *CallerPolicy
		token      string
		wantStatus int // 0: accepted
		wantCalls  bool
	}{
		{"ca_file, discovery", &CallerPolicy{Issuer: iss.URL, CAFile: iss.CAFile}, good, 0, true},
		{"ca_file, jwks_url", &CallerPolicy{Issuer: iss.URL, CAFile: iss.CAFile, JWKSURL: iss.URL + "/keys"}, good, 0, true},
		{"system roots only", &CallerPolicy{Issuer: iss.URL}, good, http.StatusServiceUnavailable, false},
		{"another CA", &CallerPolicy{Issuer: iss.URL, CAFile: other.CAFile}, good, http.StatusServiceUnavailable, false},
		{"another CA, jwks_url", &CallerPolicy{Issuer: iss.URL, CAFile: other.CAFile, JWKSURL: iss.URL + "/keys"}, good, http.StatusServiceUnavailable, false},
		{"jwks_file", &CallerPolicy{Issuer: plain.URL, JWKSFile: jwksFile}, plainGood, 0, false},
		{"jwks_file, forged", &CallerPolicy{Issuer: plain.URL, JWKSFile: jwksFile}, forge(t, plainGood, 1, ""), http.StatusUnauthorized, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := iss.JWKSFetches.Load() + iss.Discoveries.Load()
			tt.policy.Audience = callerAudience
			p := mustProvision(t, tt.policy, nil)
			sub, cerr := authn(p, "Bearer "+tt.token)
			switch {
			case tt.wantStatus == 0 && (cerr != nil || sub != "payments"):
				t.Fatalf("refused: %+v", cerr)
			case tt.wantStatus != 0 && (cerr == nil || cerr.code.Status() != tt.wantStatus):
				t.Fatalf("got %+v, want status %d", cerr, tt.wantStatus)
			}
			if calls := iss.JWKSFetches.Load() + iss.Discoveries.Load() - before; (calls > 0) != tt.wantCalls {
				t.Fatalf("%d discovery and key-set requests served", calls)
			}
		})
	}
	if n := plain.JWKSFetches.Load() + plain.Discoveries.Load(); n != 0 {
		t.Fatalf("jwks_file: %d requests to the issuer", n)
	}
}

func TestCallerPolicyConfigErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	private, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key, KeyID: "k1", Algorithm: "ES256"}}})
	privateFile := write("private.json", string(private))
	notPEM := write("not.pem", "hello")
	tests := []struct {
		name   string
		policy *CallerPolicy
		want   string
	}{
		{"header not redacted", &CallerPolicy{Header: "X-Caller-Token"}, `header "X-Caller-Token"`},
		{"header Cookie", &CallerPolicy{Header: "Cookie"}, "Caddy's logs redact"},
		{"jwks_file and jwks_url", &CallerPolicy{JWKSFile: privateFile, JWKSURL: "https://x/keys"}, "drop jwks_url"},
		{"jwks_file and ca_file", &CallerPolicy{JWKSFile: privateFile, CAFile: notPEM}, "drop jwks_url and ca_file"},
		{"jwks_file private", &CallerPolicy{JWKSFile: privateFile}, "private or symmetric key"},
		{"jwks_file missing", &CallerPolicy{JWKSFile: filepath.Join(dir, "nope.json")}, "no such file"},
		{"jwks_file empty set", &CallerPolicy{JWKSFile: write("empty.json", `{"keys":[]}`)}, "no usable signing key"},
		{"ca_file not PEM", &CallerPolicy{CAFile: notPEM}, "no PEM certificate"},
		{"negative refresh_interval", &CallerPolicy{RefreshInterval: -1}, "refresh_interval"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.policy.Issuer, tt.policy.Audience = "https://issuer.example", "token-broker"
			_, err := provisioned(t, tt.policy, nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	for _, h := range []string{"authorization", "Proxy-Authorization"} {
		if _, err := provisioned(t, &CallerPolicy{Issuer: "https://i", Audience: "a", Header: h}, nil); err != nil {
			t.Fatalf("header %s: %v", h, err)
		}
	}
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
		Allow: map[string][]string{"payments": {"acme"}}}, nil)
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
		{"forged", []string{"Bearer " + forge(t, good, 1, "")}, "acme", 401, invalid},
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
	pd := mustProvision(t, &CallerPolicy{Issuer: "https://issuer.example", Audience: "token-broker", JWKSURL: down.URL + "/keys"}, nil)
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
