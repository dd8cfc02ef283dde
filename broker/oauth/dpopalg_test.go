package oauth

import (
	"cmp"
	"context"
	"crypto/ed25519"
	"crypto/rand"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// TestDPoPEd25519Name: an Ed25519 key's proofs to the token and PAR
// endpoints carry the name of the algorithm the authorization server's
// metadata lists in dpop_signing_alg_values_supported: Ed25519 (RFC 9864)
// when listed, else EdDSA; without the list (a configured token URL, or a
// discovery document without it) the configured name, EdDSA by default.
// The proofs verify under either name, with one thumbprint.
func TestDPoPEd25519Name(t *testing.T) {
	for _, tc := range []struct {
		name       string
		configured string   // the key's alg, "" for the default
		discovered bool     // the provider is configured by its issuer
		listed     []string // dpop_signing_alg_values_supported; nil: absent
		want       string
	}{
		{"token URL, default", "", false, nil, dpop.EdDSA},
		{"token URL, Ed25519 configured", dpop.Ed25519, false, nil, dpop.Ed25519},
		{"no list, default", "", true, nil, dpop.EdDSA},
		{"no list, Ed25519 configured", dpop.Ed25519, true, nil, dpop.Ed25519},
		{"EdDSA listed", "", true, []string{"ES256", "EdDSA"}, dpop.EdDSA},
		{"EdDSA listed, Ed25519 configured", dpop.Ed25519, true, []string{"EdDSA", "PS256"}, dpop.EdDSA},
		{"both listed", "", true, []string{"EdDSA", "Ed25519"}, dpop.Ed25519},
		{"Ed25519 listed, EdDSA configured", dpop.EdDSA, true, []string{"Ed25519"}, dpop.Ed25519},
		{"neither listed", "", true, []string{"ES256"}, dpop.EdDSA},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var (
				mu   sync.Mutex
				seen []string // path and alg of each proof that passed
				jkts = map[string]bool{}
			)
			mux := http.NewServeMux()
			gate := &dpoptest.Gate{Next: mux}
			record := func(r *http.Request) {
				p, _ := dpoptest.ProofFrom(r.Context())
				mu.Lock()
				defer mu.Unlock()
				seen = append(seen, r.URL.Path+" "+p.Alg)
				jkts[p.JKT] = true
			}
			mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
				record(r)
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprint(w, `{"access_token":"at-1","token_type":"DPoP","expires_in":600}`)
			})
			mux.HandleFunc("/par", func(w http.ResponseWriter, r *http.Request) {
				record(r)
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(http.StatusCreated)
				fmt.Fprint(w, `{"request_uri":"urn:ietf:params:oauth:request_uri:x","expires_in":60}`)
			})
			var srv *httptest.Server
			srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != "/.well-known/openid-configuration" {
					gate.ServeHTTP(w, r)
					return
				}
				doc := map[string]any{"issuer": srv.URL, "authorization_endpoint": srv.URL + "/authorize", "token_endpoint": srv.URL + "/token",
					"jwks_uri": srv.URL + "/jwks", "pushed_authorization_request_endpoint": srv.URL + "/par"}
				if tc.listed != nil {
					doc["dpop_signing_alg_values_supported"] = tc.listed
				}
				w.Header().Set("Content-Type", "application/json")
				json.NewEncoder(w).Encode(doc)
			}))
			defer srv.Close()

			_, priv, err := ed25519.GenerateKey(rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			key, err := dpop.NewKey(priv, tc.configured)
			if err != nil {
				t.Fatal(err)
			}
			cfg := Config{Name: "bank", ClientID: "bank-client", ClientSecret: secretValue, DPoP: key}
			consent := AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"offline_access"}, PAR: true}
			if tc.discovered {
				cfg.Issuer = srv.URL
			} else {
				cfg.TokenURL = srv.URL + "/token"
				consent.AuthorizationURL, consent.PARURL = srv.URL+"/authorize", srv.URL+"/par"
			}
			cc, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			if tok, err := cc.Token(context.Background(), broker.Request{Merchant: "m1"}); err != nil || tok.Type != broker.DPoPType {
				t.Fatalf("token type %q, err %v", tok.Type, err)
			}
			_, flow := newFlow(t, cfg, &MemoryStore{}, consent, &Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
			if _, _, err := startLink(t, flow, "m1"); err != nil {
				t.Fatalf("Start: %v", err)
			}
			mu.Lock()
			defer mu.Unlock()
			if got, want := strings.Join(seen, ", "), "/token "+tc.want+", /par "+tc.want; got != want {
				t.Errorf("proofs %s, want %s", got, want)
			}
			if len(jkts) != 1 || !jkts[key.Thumbprint()] || gate.Refused.Load() != 0 {
				t.Errorf("thumbprints %v, want only %s; %d proofs refused", jkts, key.Thumbprint(), gate.Refused.Load())
			}
			if key.Alg() != cmp.Or(tc.configured, dpop.EdDSA) {
				t.Errorf("the configured key's alg became %s", key.Alg())
			}
		})
	}
}

// TestDPoPEd25519NameInTokenTypeError: a token endpoint that answers
// Bearer to a proof signed under the name its metadata lists is told
// about that name, the one sent, not the configured one.
func TestDPoPEd25519NameInTokenTypeError(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.URL.Path == "/.well-known/openid-configuration" {
			json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "authorization_endpoint": srv.URL + "/authorize",
				"token_endpoint": srv.URL + "/token", "jwks_uri": srv.URL + "/jwks", "dpop_signing_alg_values_supported": []string{"Ed25519"}})
			return
		}
		fmt.Fprint(w, `{"access_token":"at-1","token_type":"Bearer","expires_in":600}`)
	}))
	defer srv.Close()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	key, err := dpop.NewKey(priv, "") // EdDSA
	if err != nil {
		t.Fatal(err)
	}
	src, err := NewClientCredentials(Config{Name: "bank", Issuer: srv.URL, ClientID: "bank-client", ClientSecret: secretValue, DPoP: key})
	if err != nil {
		t.Fatal(err)
	}
	_, err = src.Token(context.Background(), broker.Request{Merchant: "m1"})
	if err == nil || !strings.Contains(err.Error(), "dpop_signing_alg_values_supported lists Ed25519") || strings.Contains(err.Error(), "EdDSA") {
		t.Errorf("err = %v, want unsupported_token_type naming Ed25519, the alg sent, not EdDSA", err)
	}
}
