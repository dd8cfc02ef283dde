package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestRefusalHints: a refusal of the token endpoint says what the
// operator can change: for a refused private_key_jwt with the default
// audience, the aud sent and the assertion_audience a server that wants
// its issuer needs; when the provider's discovery document tells why,
// assertions signed with an algorithm it does not list, or no DPoP proof
// where it wants one; and says none of it otherwise.
func TestRefusalHints(t *testing.T) {
	rsaK, ecK := testRSAKey(t), testECKey(t)
	const (
		audHint = "a server that wants its issuer identifier as the audience (FAPI 2.0, zitadel) needs"
		algHint = "token_endpoint_auth_signing_alg_values_supported"
	)
	for _, tc := range []struct {
		name     string
		answer   string // the token endpoint's 400 or 401 body
		status   int
		signer   *Signer
		tokenURL string // token_url ({srv} expanded) instead of issuer, if any
		aud      string // assertion_audience
		want     []string
		not      []string // hints the error must not have
	}{
		{"RS256 assertion, the provider lists PS256 and ES256", `{"error":"invalid_client"}`, 401, mustSigner(t, rsaK, RS256, "k1"), "", "{issuer}",
			[]string{`signed with RS256; the provider's discovery document lists token_endpoint_auth_signing_alg_values_supported ["PS256" "ES256"]: set signing_alg in [providers.bank]`}, []string{audHint}},
		{"Keycloak's spelling", `{"error":"unauthorized_client","error_description":"Invalid client or Invalid client credentials"}`, 401, mustSigner(t, rsaK, RS256, "k1"), "", "{issuer}",
			[]string{"signed with RS256"}, nil},
		{"an algorithm it lists", `{"error":"invalid_client"}`, 401, mustSigner(t, ecK, ES256, "k1"), "", "{issuer}", nil, []string{algHint, audHint}},
		{"no DPoP proof", `{"error":"invalid_dpop_proof","error_description":"DPoP proof required"}`, 400, mustSigner(t, ecK, ES256, "k1"), "", "",
			[]string{"the request had no DPoP proof: the provider wants the client's tokens bound to a key; give the provider one, [providers.bank.dpop]"}, []string{audHint}},

		{"default audience refused, with issuer", `{"error":"invalid_client"}`, 401, mustSigner(t, ecK, ES256, "k1"), "", "",
			[]string{`the client assertion's aud was the token endpoint, "{srv}/token": ` + audHint + ` assertion_audience = "{srv}" in [providers.bank]`}, []string{algHint}},
		{"default audience refused, with token_url", `{"error":"invalid_client"}`, 401, mustSigner(t, ecK, ES256, "k1"), "{srv}/token", "",
			[]string{`the client assertion's aud was the token endpoint, "{srv}/token": ` + audHint + ` assertion_audience set to the authorization server's issuer identifier in [providers.bank]`}, nil},
		{"zitadel's invalid_grant for the audience", `{"error":"invalid_grant","error_description":"audience is not valid"}`, 400, mustSigner(t, ecK, ES256, "k1"), "", "",
			[]string{audHint}, nil},
		{"a token_url with a query", `{"error":"invalid_client"}`, 401, mustSigner(t, ecK, ES256, "k1"), "{srv}/token?tenant=t-1", "",
			[]string{`the client assertion's aud was the token endpoint, "{srv}/token": ` + audHint}, []string{"t-1"}},
		{"invalid_target for the audience parameter", `{"error":"invalid_target","error_description":"the audience is not valid"}`, 400, mustSigner(t, ecK, ES256, "k1"), "", "", nil, []string{audHint}},
		{"a refused refresh token", `{"error":"invalid_grant","error_description":"token revoked"}`, 400, mustSigner(t, ecK, ES256, "k1"), "", "", nil, []string{audHint}},
		{"a configured audience", `{"error":"invalid_client"}`, 401, mustSigner(t, ecK, ES256, "k1"), "", "{srv}/token", nil, []string{audHint}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mux := http.NewServeMux()
			srv := httptest.NewServer(mux)
			defer srv.Close()
			mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
				json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "token_endpoint": srv.URL + "/token",
					"token_endpoint_auth_methods_supported":            []string{"private_key_jwt"},
					"token_endpoint_auth_signing_alg_values_supported": []string{"PS256", "ES256"}})
			})
			mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				w.WriteHeader(tc.status)
				fmt.Fprint(w, tc.answer)
			})
			expand := strings.NewReplacer("{srv}", srv.URL, "{issuer}", srv.URL).Replace
			cfg := Config{Name: "bank", Issuer: srv.URL, ClientID: "c", AuthMethod: PrivateKeyJWT, Signer: tc.signer, AssertionAudience: expand(tc.aud)}
			if tc.tokenURL != "" {
				cfg.Issuer, cfg.TokenURL = "", expand(tc.tokenURL)
			}
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			_, err = src.Token(context.Background(), broker.Request{})
			var ae *broker.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("Token = %v, want an APIError", err)
			}
			for _, w := range tc.want {
				if w = expand(w); !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(err.Error(), n) {
					t.Errorf("error %q says %q, want not", err, n)
				}
			}
		})
	}
}
