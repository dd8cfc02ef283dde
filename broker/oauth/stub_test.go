package oauth

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// unsignedJWT is a JWT-shaped token with the given exp (the signature is
// never checked: the broker only reads exp).
func testJWT(t *testing.T, exp time.Time) string {
	t.Helper()
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("0123456789abcdef0123456789abcdef")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jwt.Signed(s).Claims(jwt.Claims{Subject: "partner", Expiry: jwt.NewNumericDate(exp)}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// stub is a token endpoint answering with a fixed status, headers and body,
// and recording the last request.
type stub struct {
	mu     sync.Mutex
	status int
	header http.Header
	body   string
	form   url.Values
	auth   string
	calls  atomic.Int64
}

func (s *stub) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	s.calls.Add(1)
	r.ParseForm()
	s.mu.Lock()
	s.form, s.auth = r.PostForm, r.Header.Get("Authorization")
	status, body, header := s.status, s.body, s.header
	s.mu.Unlock()
	for k, v := range header {
		w.Header()[k] = v
	}
	if w.Header().Get("Content-Type") == "" {
		w.Header().Set("Content-Type", "application/json")
	}
	w.WriteHeader(status)
	fmt.Fprint(w, body)
}

func startStub(t *testing.T, s *stub) *httptest.Server {
	srv := httptest.NewServer(s)
	t.Cleanup(srv.Close)
	return srv
}

// TestOneIDShape: OneID's /v1/token answers, and how long each token is
// kept.
func TestOneIDShape(t *testing.T) {
	clock := newClock()
	now := clock.Now()
	jwtExp := now.Add(2 * time.Hour).Truncate(time.Second)
	tokJWT := testJWT(t, jwtExp)
	s := &stub{}
	srv := startStub(t, s)
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/v1/token", ClientID: "partner-1", ClientSecret: secretValue,
		AuthMethod: ClientSecretPost, DefaultLifetime: 7 * time.Minute, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, body string
		lifetime   time.Duration // merchant's cap
		want       time.Time
	}{
		{"expires_in 86400, lower-case bearer", fmt.Sprintf(`{"access_token":%q,"token_type":"bearer","expires_in":86400}`, tokJWT), 0, now.Add(24 * time.Hour)},
		{"expires_in as a string", fmt.Sprintf(`{"access_token":%q,"token_type":"Bearer","expires_in":"86400"}`, tokJWT), 0, now.Add(24 * time.Hour)},
		{"no expires_in: the JWT's exp", fmt.Sprintf(`{"access_token":%q,"token_type":"Bearer"}`, tokJWT), 0, jwtExp},
		{"neither: the default lifetime", `{"access_token":"opaque-token-1","token_type":"BEARER"}`, 0, now.Add(7 * time.Minute)},
		{"expires_in 0 counts as missing", `{"access_token":"opaque-token-1","token_type":"bearer","expires_in":0}`, 0, now.Add(7 * time.Minute)},
		{"a merchant's token_lifetime caps it", fmt.Sprintf(`{"access_token":%q,"token_type":"bearer","expires_in":86400}`, tokJWT), time.Hour, now.Add(time.Hour)},
		{"form-encoded answer", `access_token=opaque-token-2&token_type=bearer&expires_in=60`, 0, now.Add(time.Minute)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s.mu.Lock()
			s.status, s.body, s.header = 200, tc.body, nil
			if strings.HasPrefix(tc.body, "access_token=") {
				s.header = http.Header{"Content-Type": {"application/x-www-form-urlencoded"}}
			}
			s.mu.Unlock()
			tok, err := src.Token(context.Background(), broker.Request{Merchant: "m", Lifetime: tc.lifetime})
			if err != nil {
				t.Fatal(err)
			}
			if !tok.Expiry.Equal(tc.want) {
				t.Errorf("Expiry = %s, want %s", tok.Expiry, tc.want)
			}
			if tok.Value == "" || tok.Expiry.IsZero() {
				t.Errorf("token %+v", tok)
			}
			s.mu.Lock()
			defer s.mu.Unlock()
			if s.form.Get("grant_type") != "client_credentials" || s.form.Get("client_id") != "partner-1" || s.form.Get("client_secret") != secretValue || s.auth != "" {
				t.Errorf("request form %v, Authorization %q", s.form, s.auth)
			}
		})
	}
}

// TestTokenResponses: parameters sent, and every kind of failure as a
// typed error without secrets.
// basicCred is the Basic credential of TestTokenResponses' client.
var basicCred = base64.StdEncoding.EncodeToString([]byte(url.QueryEscape("id:with/specials") + ":" + url.QueryEscape(secretValue)))

func TestTokenResponses(t *testing.T) {
	s := &stub{}
	srv := startStub(t, s)
	clock := newClock()
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token?tenant=a", ClientID: "id:with/specials", ClientSecret: secretValue,
		Audience: "https://default-aud.example", Resource: "https://api.example", Params: map[string]string{"acr_values": "x"}, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	const tok = "at-VALUE-1234"
	for _, tc := range []struct {
		name   string
		status int
		header http.Header
		body   string
		code   string // "" for success
		temp   bool
		retry  time.Duration
		class  broker.Class
	}{
		{"success", 200, nil, `{"access_token":"` + tok + `","token_type":"Bearer","expires_in":3600,"scope":"a b"}`, "", false, 0, 0},
		{"invalid_client", 401, nil, `{"error":"invalid_client","error_description":"bad secret ` + secretValue + `"}`, "invalid_client", false, 0, broker.ClassCredential},
		{"echoes the Basic header", 401, nil, `{"error":"invalid_client","error_description":"got Basic ` + basicCred + `"}`, "invalid_client", false, 0, broker.ClassCredential},
		{"echoes the form-encoded secret", 400, nil, `{"error":"invalid_request","error_description":"client_secret=` + url.QueryEscape(secretValue) + `"}`, "invalid_request", false, 0, broker.ClassPermanent},
		{"invalid_scope", 400, nil, `{"error":"invalid_scope"}`, "invalid_scope", false, 0, broker.ClassPermanent},
		{"200 with error", 200, nil, `{"error":"access_denied","error_description":"nope"}`, "access_denied", false, 0, broker.ClassPermanent},
		{"429 Retry-After", 429, http.Header{"Retry-After": {"7"}}, `{"error":"slow_down"}`, "slow_down", true, 7 * time.Second, broker.ClassRateLimited},
		{"503 HTML", 503, http.Header{"Content-Type": {"text/html"}}, `<html>down</html>`, "", true, 0, broker.ClassTemporary},
		{"DPoP token", 200, nil, `{"access_token":"` + tok + `","token_type":"DPoP","expires_in":60}`, "unsupported_token_type", false, 0, broker.ClassPermanent},
		{"MAC token", 200, nil, `{"access_token":"` + tok + `","token_type":"mac","expires_in":60}`, "unsupported_token_type", false, 0, broker.ClassPermanent},
		{"CR LF in token", 200, nil, `{"access_token":"` + tok + `\r\nX-Evil: 1","token_type":"Bearer"}`, "invalid_token_value", false, 0, broker.ClassPermanent},
		{"no access_token", 200, nil, `{"token_type":"Bearer"}`, "malformed_response", false, 0, broker.ClassPermanent},
		{"not JSON", 200, nil, `{"access_token":` + tok, "malformed_response", false, 0, broker.ClassPermanent},
		{"body over 1 MiB", 200, nil, `{"access_token":"` + strings.Repeat("a", httpclient.MaxResponseBytes) + `"}`, "response_too_large", false, 0, broker.ClassPermanent},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s.mu.Lock()
			s.status, s.header, s.body = tc.status, tc.header, tc.body
			s.mu.Unlock()
			got, err := src.Token(context.Background(), broker.Request{Merchant: "m", Scopes: []string{"b", "a"}})
			if tc.code == "" && tc.status == 200 {
				if err != nil {
					t.Fatal(err)
				}
				if got.Value.Reveal() != tok || !got.Expiry.Equal(clock.Now().Add(time.Hour)) || strings.Join(got.Scopes, " ") != "a b" {
					t.Errorf("token %+v", got)
				}
				s.mu.Lock()
				defer s.mu.Unlock()
				want := "Basic " + base64.StdEncoding.EncodeToString([]byte(url.QueryEscape("id:with/specials")+":"+url.QueryEscape(secretValue)))
				if s.auth != want {
					t.Errorf("Authorization %q, want %q (RFC 6749 §2.3.1)", s.auth, want)
				}
				for k, v := range map[string]string{"grant_type": "client_credentials", "scope": "b a", "audience": "https://default-aud.example",
					"resource": "https://api.example", "acr_values": "x", "client_secret": ""} {
					if s.form.Get(k) != v {
						t.Errorf("form %s = %q, want %q", k, s.form.Get(k), v)
					}
				}
				return
			}
			var ae *broker.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("err = %T %v", err, err)
			}
			if ae.Code != tc.code || ae.StatusCode != tc.status || ae.Provider != "oauth2" || ae.RetryAfter != tc.retry || broker.IsTemporary(err) != tc.temp {
				t.Errorf("APIError %+v (temporary %v)", ae, broker.IsTemporary(err))
			}
			if c := src.Classify(err); c != tc.class {
				t.Errorf("class %d, want %d", c, tc.class)
			}
			checkNoSecrets(t, err, tok, basicCred, url.QueryEscape(secretValue))
			if len(err.Error()) > 2000 {
				t.Errorf("error of %d bytes", len(err.Error()))
			}
		})
	}

	// The request's audience wins over the configured one.
	s.mu.Lock()
	s.status, s.header, s.body = 200, nil, `{"access_token":"x1","token_type":"Bearer","expires_in":60}`
	s.mu.Unlock()
	if _, err := src.Token(context.Background(), broker.Request{Merchant: "m", Audience: "https://merchant-aud.example"}); err != nil {
		t.Fatal(err)
	}
	if s.form.Get("audience") != "https://merchant-aud.example" || s.form.Has("scope") {
		t.Errorf("form %v", s.form)
	}
}

// TestAssertions: a private_key_jwt assertion per request, with the claims
// of RFC 7523 §3, for every supported key encoding and algorithm.
func TestAssertions(t *testing.T) {
	s := &stub{status: 200, body: `{"access_token":"x","token_type":"Bearer","expires_in":60}`}
	srv := startStub(t, s)
	rsaK, ecK := testRSAKey(t), testECKey(t)
	for _, tc := range []struct {
		name, format, alg, kid string
		key                    cryptoSigner
		wantAlg                string
	}{
		{"RSA PKCS#1 default PS256", "pkcs1", "", "k1", rsaK, PS256},
		{"RSA PKCS#8 RS256", "pkcs8", RS256, "k1", rsaK, RS256},
		{"EC SEC1 default ES256", "sec1", "", "", ecK, ES256},
		{"EC PKCS#8 ES256", "pkcs8", ES256, "k2", ecK, ES256},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, err := ParsePrivateKey(append([]byte("junk\n"), keyPEM(t, tc.key, tc.format)...))
			if err != nil {
				t.Fatal(err)
			}
			signer := mustSigner(t, key, tc.alg, tc.kid)
			clock := newClock()
			src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", ClientID: "jwt-client", AuthMethod: PrivateKeyJWT, Signer: signer, Now: clock.Now})
			if err != nil {
				t.Fatal(err)
			}
			seen := map[string]bool{}
			for range 2 {
				if _, err := src.Token(context.Background(), broker.Request{Merchant: "m"}); err != nil {
					t.Fatal(err)
				}
				s.mu.Lock()
				form := s.form
				s.mu.Unlock()
				if form.Get("client_assertion_type") != ClientAssertionType || form.Has("client_secret") {
					t.Fatalf("form %v", form)
				}
				parsed, err := jwt.ParseSigned(form.Get("client_assertion"), []jose.SignatureAlgorithm{jose.SignatureAlgorithm(tc.wantAlg)})
				if err != nil {
					t.Fatalf("assertion: %v", err)
				}
				var c jwt.Claims
				if err := parsed.Claims(key.Public(), &c); err != nil {
					t.Fatalf("assertion signature: %v", err)
				}
				h := parsed.Headers[0]
				wantKid := tc.kid
				if wantKid == "" { // the key's RFC 7638 thumbprint
					tp, err := (&jose.JSONWebKey{Key: key.Public()}).Thumbprint(crypto.SHA256)
					if err != nil {
						t.Fatal(err)
					}
					wantKid = base64.RawURLEncoding.EncodeToString(tp)
				}
				if h.KeyID != wantKid || h.KeyID == "" || h.Algorithm != tc.wantAlg {
					t.Errorf("header kid %q alg %q", h.KeyID, h.Algorithm)
				}
				if c.Issuer != "jwt-client" || c.Subject != "jwt-client" || len(c.Audience) != 1 || c.Audience[0] != srv.URL+"/token" ||
					c.ID == "" || seen[c.ID] || !c.IssuedAt.Time().Equal(clock.Now()) || c.Expiry.Time().Sub(c.IssuedAt.Time()) != AssertionLifetime {
					t.Errorf("claims %+v", c)
				}
				seen[c.ID] = true
			}
		})
	}
}

// TestKeysAndSigners: keys and algorithms that do not fit are refused.
func TestKeysAndSigners(t *testing.T) {
	rsaK, ecK := testRSAKey(t), testECKey(t)
	_, edK, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		pem  []byte
		alg  string
		want string
	}{
		{"no PEM", []byte("hello"), "", "no PEM private key"},
		{"certificate only", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "", "no PEM private key"},
		{"encrypted PKCS#8", []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"), "", "encrypted"},
		{"corrupt key", []byte("-----BEGIN RSA PRIVATE KEY-----\nAAAA\n-----END RSA PRIVATE KEY-----\n"), "", "not a valid key"},
		{"ES256 with RSA", keyPEM(t, rsaK, "pkcs1"), ES256, "does not fit an RSA key"},
		{"PS256 with EC", keyPEM(t, ecK, "sec1"), PS256, "does not fit an EC key"},
		{"none", keyPEM(t, ecK, "sec1"), "none", "does not fit"},
		{"Ed25519", keyPEM(t, edK, "pkcs8"), "", "unsupported private key type ed25519.PrivateKey: use an RSA or EC P-256 key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, err := ParsePrivateKey(tc.pem)
			if err == nil {
				_, err = NewSigner(key, tc.alg, "")
			}
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}

// TestRediscovery: a 404 or a transport failure at the discovered token
// endpoint makes the next call discover again.
func TestRediscovery(t *testing.T) {
	var discoveries atomic.Int64
	var tokenPath atomic.Value
	tokenPath.Store("/old/token")
	mux := http.NewServeMux()
	var srv *httptest.Server
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		discoveries.Add(1)
		json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "token_endpoint": srv.URL + tokenPath.Load().(string),
			"token_endpoint_auth_methods_supported": []string{"client_secret_post"}})
	})
	mux.HandleFunc("/new/token", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"x","token_type":"Bearer","expires_in":60}`)
	})
	mux.HandleFunc("/old/token", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(401)
		fmt.Fprint(w, `{"error":"invalid_client"}`)
	})
	srv = httptest.NewServer(mux)
	defer srv.Close()
	src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// invalid_client: cached endpoints kept, and the hint names the
	// methods the provider lists.
	_, err = src.Token(ctx, broker.Request{})
	var ae *broker.APIError
	if !errors.As(err, &ae) || !strings.Contains(ae.Description, "client_secret_post") || discoveries.Load() != 1 {
		t.Fatalf("Token = %v after %d discoveries", err, discoveries.Load())
	}
	_, _ = src.Token(ctx, broker.Request{})
	if discoveries.Load() != 1 {
		t.Fatalf("an API refusal made the source discover again")
	}
	// The endpoint moves: 404, then the next call discovers again.
	tokenPath.Store("/new/token")
	mux.HandleFunc("/gone/token", http.NotFound)
	src2, _ := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue})
	tokenPath.Store("/gone/token")
	if _, err := src2.Token(ctx, broker.Request{}); !errors.As(err, &ae) || ae.StatusCode != 404 {
		t.Fatalf("Token = %v", err)
	}
	tokenPath.Store("/new/token")
	if _, err := src2.Token(ctx, broker.Request{}); err != nil {
		t.Fatalf("Token after the 404 = %v", err)
	}
	if n := discoveries.Load(); n != 3 {
		t.Errorf("%d discoveries, want 3", n)
	}
}

// failingSigner is a jose.Signer that cannot sign (an HSM that is down).
type failingSigner struct{}

func (failingSigner) Sign([]byte) (*jose.JSONWebSignature, error) {
	return nil, errors.New("the signing device is unavailable")
}

func (failingSigner) Options() jose.SignerOptions { return jose.SignerOptions{} }

// TestRediscoveryOnlyOnTransportErrors: a client assertion that cannot be
// signed fails the token request before anything is sent, and keeps the
// discovered endpoints; a token endpoint that drops the connection makes
// the next call discover again.
func TestRediscoveryOnlyOnTransportErrors(t *testing.T) {
	var discoveries atomic.Int64
	var srv *httptest.Server
	mux := http.NewServeMux()
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		discoveries.Add(1)
		json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "token_endpoint": srv.URL + "/token"})
	})
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			conn.Close()
		}
	})
	srv = httptest.NewServer(mux)
	defer srv.Close()
	ctx := context.Background()

	src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", AuthMethod: PrivateKeyJWT, Signer: &Signer{signer: failingSigner{}}})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := src.Token(ctx, broker.Request{}); err == nil || !strings.Contains(err.Error(), "signing device") {
			t.Fatalf("Token = %v, want the signing failure", err)
		}
	}
	if n := discoveries.Load(); n != 1 {
		t.Errorf("%d discoveries after two failed assertions, want 1", n)
	}

	discoveries.Store(0)
	src, err = NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		if _, err := src.Token(ctx, broker.Request{}); err == nil {
			t.Fatal("Token from a token endpoint that drops the connection succeeded")
		}
	}
	if n := discoveries.Load(); n != 2 {
		t.Errorf("%d discoveries after two dropped connections, want 2", n)
	}
}

// TestMTLSAlias: a client that presents a TLS client certificate uses the
// discovered mtls_endpoint_aliases (RFC 8705 §5) for the token and
// revocation endpoints whatever its client authentication (FAPI:
// private_key_jwt over mTLS), so that its tokens are certificate-bound; a
// client without one uses the plain endpoints.
func TestMTLSAlias(t *testing.T) {
	pki := newPKI(t)
	key := testECKey(t)
	var calls sync.Map // path -> the client certificate's CN ("" without)
	mux := http.NewServeMux()
	srv := httptest.NewUnstartedServer(mux)
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		u := "https://" + r.Host
		json.NewEncoder(w).Encode(map[string]any{"issuer": u, "token_endpoint": u + "/token", "revocation_endpoint": u + "/revoke",
			"mtls_endpoint_aliases": map[string]string{"token_endpoint": u + "/mtls/token", "revocation_endpoint": u + "/mtls/revoke"}})
	})
	record := func(r *http.Request) {
		cn := ""
		if len(r.TLS.PeerCertificates) > 0 {
			cn = r.TLS.PeerCertificates[0].Subject.CommonName
		}
		calls.Store(r.URL.Path, cn)
		r.ParseForm()
	}
	for _, p := range []string{"/token", "/mtls/token"} {
		mux.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) {
			record(r)
			if r.PostForm.Get("client_id") != "fapi" || r.PostForm.Has("client_secret") {
				http.Error(w, `{"error":"invalid_request"}`, 400)
				return
			}
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"access_token":"x","token_type":"Bearer","expires_in":60}`)
		})
	}
	for _, p := range []string{"/revoke", "/mtls/revoke"} {
		mux.HandleFunc(p, func(w http.ResponseWriter, r *http.Request) {
			record(r)
			if r.PostForm.Get("token") != "x" || r.PostForm.Get("token_type_hint") != "access_token" {
				w.WriteHeader(400)
			}
		})
	}
	srv.TLS = pki.serverConfig()
	srv.StartTLS()
	defer srv.Close()

	for _, tc := range []struct {
		name   string
		cfg    Config
		prefix string // of the endpoints called
		cn     string // the certificate they saw
	}{
		{"tls_client_auth", Config{AuthMethod: TLSClientAuth, Client: pki.client(t, "fapi")}, "/mtls", "fapi"},
		{"private_key_jwt with a transport certificate", Config{AuthMethod: PrivateKeyJWT, Signer: mustSigner(t, key, "", "k1"), Client: pki.client(t, "fapi")}, "/mtls", "fapi"},
		{"private_key_jwt without certificate", Config{AuthMethod: PrivateKeyJWT, Signer: mustSigner(t, key, "", "k1"), Client: pki.client(t, "")}, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			calls.Clear()
			cfg := tc.cfg
			cfg.Issuer, cfg.ClientID = srv.URL, "fapi"
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			tok, err := src.Token(context.Background(), broker.Request{})
			if err != nil {
				t.Fatal(err)
			}
			if err := src.RevokeToken(context.Background(), broker.Request{}, tok); err != nil {
				t.Errorf("RevokeToken: %v", err)
			}
			for _, p := range []string{"/token", "/revoke"} {
				cn, ok := calls.Load(tc.prefix + p)
				if !ok || cn != tc.cn {
					got := map[string]any{}
					calls.Range(func(k, v any) bool { got[k.(string)] = v; return true })
					t.Errorf("%s%s not called with certificate %q; calls (path: certificate) %v", tc.prefix, p, tc.cn, got)
				}
			}
		})
	}
}

// TestRevokeErrors: revocation failures are typed and carry no token.
func TestRevokeErrors(t *testing.T) {
	s := &stub{status: 503, header: http.Header{"Retry-After": {"30"}}, body: `{"error":"temporarily_unavailable","error_description":"token rt-SECRET-VALUE unknown"}`}
	srv := startStub(t, s)
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", RevocationURL: srv.URL + "/revoke", ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	err = src.Revoke(context.Background(), "rt-SECRET-VALUE", "refresh_token")
	var ae *broker.APIError
	if !errors.As(err, &ae) || ae.StatusCode != 503 || ae.RetryAfter != 30*time.Second || ae.Code != "temporarily_unavailable" {
		t.Fatalf("Revoke = %v", err)
	}
	checkNoSecrets(t, err, "rt-SECRET-VALUE")
	if s.form.Get("token_type_hint") != "refresh_token" || s.auth == "" {
		t.Errorf("form %v auth %q", s.form, s.auth)
	}
	noRev, _ := NewClientCredentials(Config{TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue})
	if err := noRev.Revoke(context.Background(), "x", ""); !errors.Is(err, ErrNoRevocationEndpoint) {
		t.Errorf("Revoke without endpoint = %v", err)
	}
}

// TestConfigErrors: NewClientCredentials refuses configurations that
// cannot work, naming the problem and never the secret.
func TestConfigErrors(t *testing.T) {
	signer := mustSigner(t, testECKey(t), "", "")
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no endpoint", Config{ClientID: "c", ClientSecret: secretValue}, "exactly one of token_url and issuer"},
		{"both endpoints", Config{TokenURL: "https://a/t", Issuer: "https://a", ClientID: "c", ClientSecret: secretValue}, "exactly one"},
		{"credentials in URL", Config{TokenURL: "https://u:" + secretValue + "@a/t", ClientID: "c", ClientSecret: secretValue}, "token_url"},
		{"no client id", Config{TokenURL: "https://a/t", ClientSecret: secretValue}, "client_id is empty"},
		{"basic without secret", Config{TokenURL: "https://a/t", ClientID: "c"}, "needs client_secret"},
		{"jwt with secret", Config{TokenURL: "https://a/t", ClientID: "c", ClientSecret: secretValue, AuthMethod: PrivateKeyJWT, Signer: signer}, "takes no client_secret"},
		{"jwt without key", Config{TokenURL: "https://a/t", ClientID: "c", AuthMethod: PrivateKeyJWT}, "private key is needed"},
		{"tls without cert", Config{TokenURL: "https://a/t", ClientID: "c", AuthMethod: TLSClientAuth}, "client certificate"},
		{"reserved param", Config{TokenURL: "https://a/t", ClientID: "c", ClientSecret: secretValue, Params: map[string]string{"grant_type": "password"}}, `"grant_type" is set by the source`},
		{"unknown method", Config{TokenURL: "https://a/t", ClientID: "c", AuthMethod: "none"}, "unknown auth_method"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := NewClientCredentials(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want %q", err, tc.want)
			}
			checkNoSecrets(t, err)
		})
	}
	if _, err := NewRefreshToken(Config{TokenURL: "https://a/t", ClientID: "c", ClientSecret: secretValue}, nil); err == nil {
		t.Error("a refresh source without store")
	}
}

// TestRefreshStoreKey: a stored refresh token is only sent to the endpoint
// and client it was stored for. A provider whose issuer or token_url
// changes (same name) finds no refresh token instead of sending the old
// one to the new endpoint; two registries with a provider of one name on
// one store keep their own tokens; a secret change keeps the key.
func TestRefreshStoreKey(t *testing.T) {
	oldSrv := startStub(t, &stub{status: 200, body: `{"access_token":"at","token_type":"Bearer","expires_in":60}`})
	newStub := &stub{status: 200, body: `{"access_token":"at","token_type":"Bearer","expires_in":60}`}
	newSrv := startStub(t, newStub)
	base := Config{Name: "bank", TokenURL: oldSrv.URL + "/token", ClientID: "c", ClientSecret: secretValue}
	with := func(edit func(*Config)) Config { c := base; edit(&c); return c }
	ctx := context.Background()
	for _, tc := range []struct {
		name     string
		other    Config
		sameKey  bool
		refreshB bool // the other source refreshes with the stored token
	}{
		{"token_url change", with(func(c *Config) { c.TokenURL = newSrv.URL + "/token" }), false, false},
		{"issuer instead of token_url", with(func(c *Config) { c.TokenURL, c.Issuer = "", newSrv.URL }), false, false},
		{"client_id change", with(func(c *Config) { c.ClientID = "c2"; c.TokenURL = newSrv.URL + "/token" }), false, false},
		{"another registry", with(func(c *Config) { c.StoreNamespace = "/etc/other.toml"; c.TokenURL = newSrv.URL + "/token" }), false, false},
		{"secret rotation", with(func(c *Config) { c.ClientSecret = secretValue + "2" }), true, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := &MemoryStore{}
			a, err := NewRefreshToken(base, store)
			if err != nil {
				t.Fatal(err)
			}
			if err := a.SetRefreshToken(ctx, "acme", "rt-OLD-ENDPOINT-1234"); err != nil {
				t.Fatal(err)
			}
			b, err := NewRefreshToken(tc.other, store)
			if err != nil {
				t.Fatal(err)
			}
			if (a.StoreKey("acme") == b.StoreKey("acme")) != tc.sameKey {
				t.Fatalf("keys %q and %q, want same=%v", a.StoreKey("acme"), b.StoreKey("acme"), tc.sameKey)
			}
			newStub.mu.Lock()
			newStub.form = nil
			newStub.mu.Unlock()
			_, err = b.Token(ctx, broker.Request{Merchant: "acme"})
			var ce *ConsentRequiredError
			if tc.refreshB {
				if err != nil {
					t.Fatalf("Token after a secret rotation: %v", err)
				}
				return
			}
			if !errors.As(err, &ce) || !errors.Is(err, ErrNoRefreshToken) {
				t.Fatalf("Token = %v, want ConsentRequiredError (no refresh token)", err)
			}
			newStub.mu.Lock()
			defer newStub.mu.Unlock()
			if newStub.form.Get("refresh_token") != "" {
				t.Fatalf("the old endpoint's refresh token was sent to the new one")
			}
			if rt, err := store.Load(ctx, a.StoreKey("acme")); err != nil || rt != "rt-OLD-ENDPOINT-1234" {
				t.Fatalf("the first provider's token was overwritten: %v", err)
			}
		})
	}
}

// TestRefreshStateIsBounded: the last access token kept per merchant (to
// hand to a call that waited on the merchant's lock) is dropped once
// expired, and each refresh releases the store's lock of its merchant
// (which the store's keylock.Map then drops): refreshing ever more
// merchants over time does not grow the source.
func TestRefreshStateIsBounded(t *testing.T) {
	srv := startStub(t, &stub{status: 200, body: `{"access_token":"at","token_type":"Bearer","expires_in":60}`})
	clock := newClock()
	store := &MemoryStore{}
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for round := range 5 {
		for i := range 100 {
			m := fmt.Sprintf("m%d-%d", round, i)
			if err := src.SetRefreshToken(ctx, m, "rt-1234"); err != nil {
				t.Fatal(err)
			}
			if _, err := src.Token(ctx, broker.Request{Merchant: m}); err != nil {
				t.Fatal(err)
			}
		}
		clock.Add(2 * time.Minute) // every token of this round expires
	}
	src.mu.Lock()
	n := len(src.last)
	src.mu.Unlock()
	if n > 100+sweepEvery {
		t.Errorf("%d last tokens kept for 500 merchants of whom 100 have a valid one", n)
	}
	// Every refresh released its merchant's lock (a released keylock.Map lock
	// is dropped): each is free at once; the bound only ends a failing test.
	for round := range 5 {
		for i := range 100 {
			m := fmt.Sprintf("m%d-%d", round, i)
			lockCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
			unlock, err := store.Lock(lockCtx, src.StoreKey(m))
			cancel()
			if err != nil {
				t.Fatalf("the store lock of %s was kept after its refresh finished: %v", m, err)
			}
			unlock()
		}
	}
}

// TestLoadedRefreshTokenEndsConsentRequired: once an operator loads a
// merchant's new refresh token, the merchant's consent status no longer
// says consent is required, as after a consent through the callback.
func TestLoadedRefreshTokenEndsConsentRequired(t *testing.T) {
	srv := startStub(t, &stub{status: 200, body: `{"access_token":"at","token_type":"Bearer","expires_in":60}`})
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: newClock().Now}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	var cr *ConsentRequiredError
	if _, err := src.Token(ctx, broker.Request{Merchant: "acme"}); !errors.As(err, &cr) {
		t.Fatalf("Token without a refresh token = %v, want *ConsentRequiredError", err)
	}
	if st := src.ConsentStatus("acme"); st.ConsentRequiredSince.IsZero() {
		t.Fatalf("status without a refresh token = %+v, want consent required", st)
	}
	if err := src.SetRefreshToken(ctx, "acme", "rt-1234"); err != nil {
		t.Fatal(err)
	}
	if st := src.ConsentStatus("acme"); !st.ConsentRequiredSince.IsZero() {
		t.Errorf("status after the refresh token was loaded = %+v, want consent no longer required", st)
	}
}

// TestRefusedRefreshThenLoadEndsConsentRequired: a refresh refused with
// invalid_grant and an operator's load of a new refresh token that takes
// the merchant's lock as soon as the refresh lets it go: the merchant's
// status ends as the load leaves it (consent no longer required), not as
// the refresh that came before it.
func TestRefusedRefreshThenLoadEndsConsentRequired(t *testing.T) {
	srv := startStub(t, &stub{status: 400, body: `{"error":"invalid_grant"}`})
	store := &handoverStore{MemoryStore: &MemoryStore{}}
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: newClock().Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := store.Save(ctx, src.StoreKey("acme"), "rt-revoked"); err != nil {
		t.Fatal(err)
	}
	var loaded error
	store.next = func() { loaded = src.SetRefreshToken(ctx, "acme", "rt-new") }
	var cr *ConsentRequiredError
	if _, err := src.Token(ctx, broker.Request{Merchant: "acme"}); !errors.As(err, &cr) {
		t.Fatalf("Token with a refused refresh token = %v, want *ConsentRequiredError", err)
	}
	if loaded != nil {
		t.Fatalf("loading the new refresh token: %v", loaded)
	}
	if st := src.ConsentStatus("acme"); !st.ConsentRequiredSince.IsZero() {
		t.Errorf("status after the refused refresh and the load that followed it = %+v, want consent no longer required", st)
	}
}

// handoverStore is a MemoryStore whose first lock, once released, is
// taken over by next (run by the goroutine that unlocked, which next may
// lock again).
type handoverStore struct {
	*MemoryStore
	next func()
	done atomic.Bool
}

// Lock locks key; its unlock runs next the first time.
func (s *handoverStore) Lock(ctx context.Context, key string) (func(), error) {
	unlock, err := s.MemoryStore.Lock(ctx, key)
	if err != nil {
		return nil, err
	}
	return func() {
		unlock()
		if !s.done.Swap(true) {
			s.next()
		}
	}, nil
}

// TestIssuerKeysFetchedWithoutTheDiscoveringRequest: the ID token
// verifier fetches the issuer's keys with a context of its own, not with
// the context of the request that happened to discover the provider,
// whose values (its trace span among them) it would keep alive and
// report under for as long as the source lives.
func TestIssuerKeysFetchedWithoutTheDiscoveringRequest(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q,"jwks_uri":%q}`,
				srv.URL, srv.URL+"/authorize", srv.URL+"/token", srv.URL+"/jwks")
		case "/jwks":
			fmt.Fprint(w, `{"keys":[]}`)
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	type requestKey struct{}
	keysFetchedFor := make(chan any, 1)
	client := &http.Client{Transport: roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == "/jwks" {
			select {
			case keysFetchedFor <- r.Context().Value(requestKey{}):
			default: // a later fetch: the first one is what the test reads
			}
		}
		return http.DefaultTransport.RoundTrip(r)
	})}
	src, err := NewRefreshToken(Config{Name: "bank", Issuer: srv.URL, ClientID: "bank-client", ClientSecret: secretValue, Client: client}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	ep, err := src.ep.get(context.WithValue(context.Background(), requestKey{}, "the discovering request"))
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.RS256, Key: testRSAKey(t)}, nil)
	if err != nil {
		t.Fatal(err)
	}
	idToken, err := jwt.Signed(signer).Claims(jwt.Claims{Issuer: srv.URL, Subject: "acme", Audience: jwt.Audience{"bank-client"},
		Expiry: jwt.NewNumericDate(time.Now().Add(time.Hour))}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := ep.verifier.Verify(context.Background(), idToken); err == nil {
		t.Fatal("an ID token signed by a key the issuer does not list verified")
	}
	select {
	case v := <-keysFetchedFor:
		if v != nil {
			t.Errorf("the issuer's keys were fetched with the context of %v", v)
		}
	default:
		t.Fatal("the verifier did not fetch the issuer's keys")
	}
}

// roundTripFunc is a RoundTripper made of a function.
type roundTripFunc func(*http.Request) (*http.Response, error)

func (f roundTripFunc) RoundTrip(r *http.Request) (*http.Response, error) { return f(r) }

// TestRotatedRefreshTokenKeptWhenTheAccessTokenIsRefused: a refresh whose
// answer rotates the refresh token but carries an access token the broker
// refuses, or none, still stores the new refresh token: the old one no
// longer works, so dropping the new one would lose the merchant's consent.
func TestRotatedRefreshTokenKeptWhenTheAccessTokenIsRefused(t *testing.T) {
	for _, tc := range []struct{ name, body, code string }{
		{"a mac token", `{"access_token":"at-1234","token_type":"mac","expires_in":60,"refresh_token":"rt-NEW-5678"}`, "unsupported_token_type"},
		{"no access token", `{"token_type":"Bearer","expires_in":60,"refresh_token":"rt-NEW-5678"}`, "malformed_response"},
		{"an access token that is not a string", `{"access_token":1234,"token_type":"Bearer","refresh_token":"rt-NEW-5678"}`, "malformed_response"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := startStub(t, &stub{status: 200, body: tc.body})
			store := &MemoryStore{}
			src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: newClock().Now}, store)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := src.SetRefreshToken(ctx, "acme", "rt-OLD-1234"); err != nil {
				t.Fatal(err)
			}
			var ae *broker.APIError
			if _, err := src.Token(ctx, broker.Request{Merchant: "acme"}); !errors.As(err, &ae) || ae.Code != tc.code {
				t.Fatalf("Token = %v, want %s", err, tc.code)
			}
			if rt, err := store.Load(ctx, src.StoreKey("acme")); err != nil || rt != "rt-NEW-5678" {
				t.Errorf("stored refresh token %q (%v), want the rotated one", rt.Fingerprint(), err)
			}
		})
	}
}

// heldAnswer is a network whose answers arrive once the request's
// context has ended: it sends the request to base, takes the answer, runs
// ended (which ends the caller's context), waits for release, and then,
// as Go's transport does for a request whose context ended in flight,
// fails the request if its context is done.
func heldAnswer(base http.RoundTripper, ended func(), release <-chan struct{}) roundTripFunc {
	return func(r *http.Request) (*http.Response, error) {
		resp, err := base.RoundTrip(r)
		if err != nil {
			return nil, err
		}
		body, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return nil, err
		}
		ended()
		<-release
		if err := r.Context().Err(); err != nil {
			return nil, err
		}
		resp.Body = io.NopCloser(bytes.NewReader(body))
		return resp, nil
	}
}

// TestRefreshAnsweredAfterTheDeadlineKeepsTheRotatedToken: a refresh
// whose context ends (the fetch's deadline, the caller gone) while the
// provider, which has rotated the refresh token, is answering returns at
// once with the context's error, and the refresh goes on: it reads the
// answer and stores the new refresh token (the old one no longer works,
// so dropping the answer would lose the merchant's consent), and the next
// call gets its access token without refreshing again; the call after
// that refreshes.
func TestRefreshAnsweredAfterTheDeadlineKeepsTheRotatedToken(t *testing.T) {
	s := &stub{status: 200, body: `{"access_token":"at-1234","token_type":"Bearer","expires_in":60,"refresh_token":"rt-NEW-5678"}`}
	srv := startStub(t, s)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	release := make(chan struct{})
	client := &http.Client{Transport: heldAnswer(http.DefaultTransport, cancel, release), Timeout: 10 * time.Second}
	store := &MemoryStore{}
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Client: client, Now: newClock().Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := src.SetRefreshToken(context.Background(), "acme", "rt-OLD-1234"); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Token(ctx, broker.Request{Merchant: "acme"}); !errors.Is(err, context.Canceled) {
		t.Fatalf("Token whose context ended while the answer was on its way = %v, want the context's error at once", err)
	}
	close(release)
	// The next call starts once the first refresh has ended: it takes the
	// token as abandoned, not as one refreshed while it waited.
	waitFor(t, func() bool {
		src.mu.Lock()
		defer src.mu.Unlock()
		l := src.last[src.StoreKey("acme")]
		return l != nil && l.abandoned
	})
	tok, err := src.Token(context.Background(), broker.Request{Merchant: "acme"})
	if err != nil || tok.Value != "at-1234" || s.calls.Load() != 1 {
		t.Fatalf("next Token = %v after %d refreshes, want the first refresh's access token and no other refresh", err, s.calls.Load())
	}
	if rt, err := store.Load(context.Background(), src.StoreKey("acme")); err != nil || rt != "rt-NEW-5678" {
		t.Fatalf("stored refresh token %s (%v), want the rotated one", rt.Fingerprint(), err)
	}
	// The abandoned token was taken once: the call after refreshes.
	if _, err := src.Token(context.Background(), broker.Request{Merchant: "acme"}); err != nil || s.calls.Load() != 2 {
		t.Fatalf("third Token = %v after %d refreshes, want a refresh of its own", err, s.calls.Load())
	}
}

// TestConsentErrorsDoNotEchoTheState: a provider that quotes the
// authorization state in its error description, answering the pushed
// request or the callback, does not get the state into the consent
// error.
func TestConsentErrorsDoNotEchoTheState(t *testing.T) {
	var pushedState atomic.Value
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil {
			t.Error(err)
		}
		pushedState.Store(r.PostForm.Get("state"))
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprintf(w, `{"error":"invalid_request","error_description":"state %s is not accepted"}`, r.PostForm.Get("state"))
	}))
	defer srv.Close()
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "bank-client", ClientSecret: secretValue}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, par := range []bool{true, false} {
		t.Run(fmt.Sprintf("PAR %v", par), func(t *testing.T) {
			flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, AuthorizationURL: srv.URL + "/authorize",
				PARURL: srv.URL + "/par", PAR: par, Scopes: []string{"offline_access"}}, &Pendings{Store: &MemoryPendingStore{}})
			if err != nil {
				t.Fatal(err)
			}
			authURL, host, err := startLink(t, flow, "acme")
			state, _ := pushedState.Load().(string)
			if !par {
				if err != nil {
					t.Fatal(err)
				}
				au, _ := url.Parse(authURL)
				state = au.Query().Get("state")
				_, err = flow.Callback(ctx, host, url.Values{"state": {state}, "error": {"invalid_request"},
					"error_description": {"state " + state + " is not accepted"}})
			}
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != ReasonProviderError || state == "" {
				t.Fatalf("err = %v (state %q), want a provider_error", err, state)
			}
			if strings.Contains(err.Error(), state) {
				t.Errorf("the consent error quotes the state: %v", err)
			}
		})
	}
}

// TestTokenErrorWithoutJSONContentType: a provider that writes its JSON
// error without a JSON Content-Type (a Go server that sets none answers
// text/plain, sniffed) is read as the RFC 6749 §5.2 error it is:
// invalid_client refuses the source's credential.
func TestTokenErrorWithoutJSONContentType(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.WriteHeader(http.StatusUnauthorized)
		fmt.Fprint(w, `{"error":"invalid_client","error_description":"unknown client"}`)
	}))
	defer srv.Close()
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/v1/token", ClientID: "c", ClientSecret: secretValue, AuthMethod: ClientSecretPost})
	if err != nil {
		t.Fatal(err)
	}
	_, err = src.Token(context.Background(), broker.Request{Merchant: "m"})
	var ae *broker.APIError
	if !errors.As(err, &ae) || ae.Code != "invalid_client" || src.Classify(err) != broker.ClassCredential {
		t.Errorf("Token = %v (class %d), want invalid_client refusing the credential", err, src.Classify(err))
	}
}

// waitFor polls cond (a goroutine reaching a point), failing after 10s.
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatal("condition not reached in 10s")
		}
	}
}
