package oauth

import (
	"context"
	"crypto"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// TestAssertionAudience: by default a client assertion's aud is the URL
// of the endpoint called, the token endpoint's for the token and
// revocation requests and the PAR endpoint's for a pushed request, with
// an issuer as with a token URL; a configured assertion_audience
// replaces it at every endpoint.
func TestAssertionAudience(t *testing.T) {
	key := testECKey(t)
	var mu sync.Mutex
	auds := map[string][]string{} // endpoint path -> aud of its last assertion
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "authorization_endpoint": srv.URL + "/authorize",
			"token_endpoint": srv.URL + "/oauth/token", "revocation_endpoint": srv.URL + "/oauth/revoke",
			"pushed_authorization_request_endpoint": srv.URL + "/oauth/par", "jwks_uri": srv.URL + "/keys"})
	})
	record := func(r *http.Request) bool {
		r.ParseForm()
		parsed, err := jwt.ParseSigned(r.PostForm.Get("client_assertion"), []jose.SignatureAlgorithm{jose.ES256})
		var c jwt.Claims
		if err == nil {
			err = parsed.Claims(key.Public(), &c)
		}
		if err != nil {
			t.Errorf("%s: client assertion: %v", r.URL.Path, err)
			return false
		}
		mu.Lock()
		auds[r.URL.Path] = c.Audience
		mu.Unlock()
		return true
	}
	mux.HandleFunc("/oauth/token", func(w http.ResponseWriter, r *http.Request) {
		if record(r) {
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprint(w, `{"access_token":"x","token_type":"Bearer","expires_in":60}`)
		}
	})
	mux.HandleFunc("/oauth/revoke", func(w http.ResponseWriter, r *http.Request) { record(r) })
	mux.HandleFunc("/oauth/par", func(w http.ResponseWriter, r *http.Request) {
		if record(r) {
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusCreated)
			fmt.Fprint(w, `{"request_uri":"urn:ietf:params:oauth:request_uri:r1","expires_in":60}`)
		}
	})

	for _, tc := range []struct {
		name      string
		cfg       Config
		want      map[string]string // path -> the aud sent there
		consented bool              // whether a consent (PAR) is started
	}{
		{"issuer", Config{Issuer: srv.URL},
			map[string]string{"/oauth/token": srv.URL + "/oauth/token", "/oauth/revoke": srv.URL + "/oauth/token", "/oauth/par": srv.URL + "/oauth/par"}, true},
		{"issuer and assertion_audience", Config{Issuer: srv.URL, AssertionAudience: srv.URL},
			map[string]string{"/oauth/token": srv.URL, "/oauth/revoke": srv.URL, "/oauth/par": srv.URL}, true},
		{"token_url", Config{TokenURL: srv.URL + "/oauth/token", RevocationURL: srv.URL + "/oauth/revoke"},
			map[string]string{"/oauth/token": srv.URL + "/oauth/token", "/oauth/revoke": srv.URL + "/oauth/token"}, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mu.Lock()
			clear(auds)
			mu.Unlock()
			cfg := tc.cfg
			cfg.Name, cfg.ClientID, cfg.AuthMethod, cfg.Signer = "bank", "fapi-client", PrivateKeyJWT, mustSigner(t, key, ES256, "k1")
			src, err := NewRefreshToken(cfg, &MemoryStore{})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if err := src.SetRefreshToken(ctx, "acme", "rt-1"); err != nil {
				t.Fatal(err)
			}
			tok, err := src.Token(ctx, broker.Request{Merchant: "acme"})
			if err != nil {
				t.Fatalf("Token: %v", err)
			}
			if err := src.RevokeToken(ctx, broker.Request{Merchant: "acme"}, tok); err != nil {
				t.Fatalf("RevokeToken: %v", err)
			}
			if tc.consented {
				flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}, PAR: true},
					&Pendings{Store: &MemoryPendingStore{}})
				if err != nil {
					t.Fatal(err)
				}
				if _, _, err := startLink(t, flow, "acme"); err != nil {
					t.Fatalf("Start: %v", err)
				}
			}
			mu.Lock()
			defer mu.Unlock()
			for path, want := range tc.want {
				if got := auds[path]; len(got) != 1 || got[0] != want {
					t.Errorf("%s: assertion aud %q, want %q", path, got, want)
				}
			}
		})
	}

	// A real authorization server that wants its issuer as the audience
	// (zitadel) refuses the default, with a hint that names the setting
	// it needs, and accepts assertion_audience set to its issuer.
	op := optest.Start(t, optest.Options{}, &optest.Client{ID: "jwt-client", Method: oidc.AuthMethodPrivateKeyJWT, Keys: map[string]crypto.PublicKey{"k1": key.Public()}})
	cfg := Config{Name: "zitadel", Issuer: op.URL, ClientID: "jwt-client", AuthMethod: PrivateKeyJWT, Signer: mustSigner(t, key, ES256, "k1")}
	src, err := NewClientCredentials(cfg)
	if err != nil {
		t.Fatal(err)
	}
	want := fmt.Sprintf(`needs assertion_audience = %q in [providers.zitadel]`, op.URL)
	if _, err := src.Token(context.Background(), broker.Request{Merchant: "m"}); err == nil || !strings.Contains(err.Error(), want) {
		t.Errorf("Token from an issuer-checking server with the default audience = %v, want a refusal that says %q", err, want)
	}
	cfg.AssertionAudience = op.URL
	if src, err = NewClientCredentials(cfg); err != nil {
		t.Fatal(err)
	}
	if _, err := src.Token(context.Background(), broker.Request{Merchant: "m"}); err != nil {
		t.Errorf("Token from an issuer-checking server with assertion_audience = its issuer: %v", err)
	}
}
