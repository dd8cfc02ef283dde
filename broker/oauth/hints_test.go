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
// operator can change when the provider's discovery document tells why:
// assertions signed with an algorithm it does not list, or no DPoP proof
// where it wants one; and says nothing more otherwise.
func TestRefusalHints(t *testing.T) {
	rsaK, ecK := testRSAKey(t), testECKey(t)
	for _, tc := range []struct {
		name   string
		answer string // the token endpoint's 400 or 401 body
		status int
		signer *Signer
		want   string // in the error, "" for no hint
	}{
		{"RS256 assertion, the provider lists PS256 and ES256", `{"error":"invalid_client"}`, 401, mustSigner(t, rsaK, RS256, "k1"),
			`signed with RS256; the provider's discovery document lists token_endpoint_auth_signing_alg_values_supported ["PS256" "ES256"]: set signing_alg in [providers.bank]`},
		{"Keycloak's spelling", `{"error":"unauthorized_client","error_description":"Invalid client or Invalid client credentials"}`, 401, mustSigner(t, rsaK, RS256, "k1"),
			"signed with RS256"},
		{"an algorithm it lists", `{"error":"invalid_client"}`, 401, mustSigner(t, ecK, ES256, "k1"), ""},
		{"no DPoP proof", `{"error":"invalid_dpop_proof","error_description":"DPoP proof required"}`, 400, mustSigner(t, ecK, ES256, "k1"),
			"the request had no DPoP proof: the provider wants the client's tokens bound to a key; give the provider one, [providers.bank.dpop]"},
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
			src, err := NewClientCredentials(Config{Name: "bank", Issuer: srv.URL, ClientID: "c", AuthMethod: PrivateKeyJWT, Signer: tc.signer})
			if err != nil {
				t.Fatal(err)
			}
			_, err = src.Token(context.Background(), broker.Request{})
			var ae *broker.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("Token = %v, want an APIError", err)
			}
			switch {
			case tc.want == "" && strings.Contains(err.Error(), " (the "):
				t.Errorf("error %q has a hint, want none", err)
			case !strings.Contains(err.Error(), tc.want):
				t.Errorf("error %q does not say %q", err, tc.want)
			}
		})
	}
}
