package config

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// recorder is a token API stand-in that records the requests it is sent
// and answers each with answer.
type recorder struct {
	mu   sync.Mutex
	reqs []recorded
}

// recorded is a request as the stand-in received it.
type recorded struct {
	path string
	form url.Values // a form body's fields
	body []byte     // a JSON body
	user string     // the HTTP Basic user name, "" without Basic
}

func (rc *recorder) server(t *testing.T, answer func(w http.ResponseWriter, r *http.Request)) *httptest.Server {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		rec := recorded{path: r.URL.Path}
		if r.Header.Get("Content-Type") == "application/x-www-form-urlencoded" {
			if err := r.ParseForm(); err != nil {
				t.Error(err)
			}
			rec.form = r.PostForm
		} else {
			rec.body, _ = io.ReadAll(r.Body)
		}
		rec.user, _, _ = r.BasicAuth()
		rc.mu.Lock()
		rc.reqs = append(rc.reqs, rec)
		rc.mu.Unlock()
		answer(w, r)
	}))
	t.Cleanup(srv.Close)
	return srv
}

// last returns the last request received.
func (rc *recorder) last(t *testing.T) recorded {
	t.Helper()
	rc.mu.Lock()
	defer rc.mu.Unlock()
	if len(rc.reqs) == 0 {
		t.Fatal("no request received")
	}
	return rc.reqs[len(rc.reqs)-1]
}

// callTimeout is the bound of each call of a provider's source.
func callTimeout(t *testing.T, p *Provider) time.Duration {
	t.Helper()
	cb, ok := p.Source.(broker.CallBounded)
	if !ok {
		t.Fatalf("provider %s: source %T is not call-bounded", p.Name, p.Source)
	}
	return cb.CallTimeout()
}

// checkProvider checks provider p of reg: its Endpoint and its source's
// call bound; then merchant m's binding mints a token, which must live
// about lifetime.
func checkProvider(t *testing.T, reg *Registry, endpoint string, timeout, lifetime time.Duration) {
	t.Helper()
	p := reg.Providers["p"]
	if p.Endpoint != endpoint {
		t.Errorf("Endpoint = %q, want %q", p.Endpoint, endpoint)
	}
	if got := callTimeout(t, p); got != timeout {
		t.Errorf("call timeout %s, want %s", got, timeout)
	}
	b, err := reg.Binding("m", nil)
	if err != nil {
		t.Fatal(err)
	}
	sent := time.Now()
	tok, err := b.Source.Token(context.Background(), b.Request())
	if err != nil {
		t.Fatal(err)
	}
	if life := tok.Expiry.Sub(sent); life < lifetime-time.Minute || life > lifetime+time.Minute {
		t.Errorf("token lives %s, want %s", life, lifetime)
	}
}

// TestNuapaySettings: a nuapay provider's base_url, token_lifetime,
// organisations_path and timeout, set or defaulted, are what its source
// uses.
func TestNuapaySettings(t *testing.T) {
	var rc recorder
	srv := rc.server(t, func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodGet {
			fmt.Fprint(w, `{"data":[],"page":{"totalPages":1}}`)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, `{"data":{"id":"t1","accessToken":"tok","tokenType":"BEARER","status":"ACTIVE"}}`)
	})
	for _, tc := range []struct {
		name, keys  string
		expiresIn   float64
		orgsPath    string
		timeout     time.Duration
		wantExpires time.Duration
	}{
		{"defaults", `base_url = "{env.BASE}"`, 3600, "/organisations", 10 * time.Second, time.Hour},
		{"set", "base_url = \"{env.BASE}/\"\ntoken_lifetime = \"30m\"\norganisations_path = \"/cust/organisations\"\ntimeout = \"5s\"", 1800, "/cust/organisations", 5 * time.Second, 30 * time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := "[providers.p]\ntype = \"nuapay\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n" + tc.keys + "\n\n" + merchantTable("m", "org-m")
			reg := mustParse(t, "m.toml", []byte(data), testEnv("BASE", srv.URL))
			checkProvider(t, reg, srv.URL, tc.timeout, tc.wantExpires)
			r := rc.last(t)
			var body struct {
				ExpiresIn float64 `json:"expiresIn"`
			}
			if err := json.Unmarshal(r.body, &body); err != nil || body.ExpiresIn != tc.expiresIn || r.path != "/organisations/org-m/tokens" {
				t.Errorf("token request to %s with %s, want expiresIn %v", r.path, r.body, tc.expiresIn)
			}
			if err := reg.Providers["p"].Source.(*nuapay.Source).EachOrganisation(context.Background(), nuapay.ListLimits{}, func(nuapay.Organisation) {}); err != nil {
				t.Fatal(err)
			}
			if got := rc.last(t).path; got != tc.orgsPath {
				t.Errorf("organisations listed at %s, want %s", got, tc.orgsPath)
			}
		})
	}
}

// TestOAuth2Settings: an oauth2 provider's endpoint (token_url, or issuer
// discovered), client_id, auth_method (set, or following the credential
// given), private_key (relative to the file), default_lifetime and
// timeout, set or defaulted, are what its source sends and keeps.
func TestOAuth2Settings(t *testing.T) {
	dir := t.TempDir()
	keyFile := writeKey(t, dir, "client.key")
	writeCert(t, filepath.Join(dir, "client.pem"), filepath.Join(dir, "client-cert.key"))
	keyPEM, err := os.ReadFile(keyFile)
	if err != nil {
		t.Fatal(err)
	}
	key, err := oauth.ParsePrivateKey(keyPEM)
	if err != nil {
		t.Fatal(err)
	}
	var rc recorder
	var srv *httptest.Server
	srv = rc.server(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/.well-known/openid-configuration" {
			fmt.Fprintf(w, `{"issuer":%q,"token_endpoint":%q,"jwks_uri":%q}`, srv.URL, srv.URL+"/token", srv.URL+"/jwks")
			return
		}
		fmt.Fprint(w, `{"access_token":"tok","token_type":"Bearer"}`)
	})
	const tokenURL = "token_url = \"{env.BASE}/token\"\n"
	for _, tc := range []struct {
		name, keys string
		endpoint   string // "base" for srv.URL (the issuer), else srv.URL+"/token"
		clientID   string
		user       string // the Basic user name sent
		secret     bool   // client_secret in the form
		assertion  bool   // a client assertion signed by client.key
		lifetime   time.Duration
		timeout    time.Duration
	}{
		{"client_secret: client_secret_basic", tokenURL + "client_id = \"c1\"\nclient_secret = \"{env.NUAPAY_API_KEY}\"", "", "c1", "c1", false, false, oauth.DefaultLifetime, 10 * time.Second},
		{"client_secret_post", tokenURL + "client_id = \"c1\"\nclient_secret = \"{env.NUAPAY_API_KEY}\"\nauth_method = \"client_secret_post\"", "", "c1", "", true, false, oauth.DefaultLifetime, 10 * time.Second},
		{"private_key: private_key_jwt, issuer", "issuer = \"{env.BASE}\"\nclient_id = \"{env.SHOP_ORG}\"\nprivate_key = \"client.key\"\ndefault_lifetime = \"10m\"\ntimeout = \"7s\"", "base", "org-shop", "", false, true, 10 * time.Minute, 7 * time.Second},
		{"tls.client_cert: tls_client_auth", tokenURL + "client_id = \"c1\"\n  [providers.p.tls]\n  client_cert = \"client.pem\"\n  client_key = \"client-cert.key\"", "", "c1", "", false, false, oauth.DefaultLifetime, 10 * time.Second},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := "[merchants.m]\nprovider = \"p\"\n\n[providers.p]\ntype = \"oauth2\"\n" + tc.keys + "\n"
			reg := mustParse(t, filepath.Join(dir, "m.toml"), []byte(data), testEnv("BASE", srv.URL))
			endpoint := srv.URL + "/token"
			if tc.endpoint == "base" {
				endpoint = srv.URL
			}
			checkProvider(t, reg, endpoint, tc.timeout, tc.lifetime)
			r := rc.last(t)
			if r.path != "/token" || r.user != tc.user || (r.form.Get("client_secret") == secretValue) != tc.secret {
				t.Errorf("token request to %s, Basic user %q, form %v; want Basic user %q, client_secret in the form %v", r.path, r.user, r.form, tc.user, tc.secret)
			}
			if tc.user == "" && r.form.Get("client_id") != tc.clientID {
				t.Errorf("form client_id %q, want %q", r.form.Get("client_id"), tc.clientID)
			}
			assertion := r.form.Get("client_assertion")
			if (assertion != "") != tc.assertion {
				t.Fatalf("client_assertion %q, want one: %v", assertion, tc.assertion)
			}
			if tc.assertion {
				jws, err := jose.ParseSigned(assertion, []jose.SignatureAlgorithm{jose.ES256})
				if err != nil {
					t.Fatal(err)
				}
				payload, err := jws.Verify(key.Public())
				if err != nil {
					t.Fatalf("the assertion is not signed by client.key: %v", err)
				}
				var claims struct {
					Issuer string `json:"iss"`
				}
				if err := json.Unmarshal(payload, &claims); err != nil || claims.Issuer != tc.clientID {
					t.Errorf("assertion claims %s, want iss %q", payload, tc.clientID)
				}
			}
		})
	}
}
