package oauth

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// TestErrorInTheChallenge: a token endpoint that says why it refused in
// its WWW-Authenticate challenge only (RFC 6749 §5.2's 401, RFC 6750 §3's
// spelling), its body HTML or empty, is read as the error it names: a
// refused client backs off the whole source, a DPoP nonce challenge is
// answered with the nonce; an error code in the body wins, and a 401
// without one is that merchant's. The code and description are cut to
// scrub.MaxText, as those of a body are.
func TestErrorInTheChallenge(t *testing.T) {
	for _, tc := range []struct {
		name      string
		status    int
		challenge string
		body      string
		dpop      bool
		code      string // of the *broker.APIError
		desc      string // in its description
		class     broker.Class
	}{
		{"401 invalid_client, HTML body", 401, `Basic realm="bank", error="invalid_client", error_description="client \"c\" failed to authenticate"`,
			"<html><body>Unauthorized</body></html>", false, "invalid_client", `client "c" failed to authenticate`, broker.ClassCredential},
		{"token-form error param", 401, `Bearer error=invalid_client`, "", false, "invalid_client", "", broker.ClassCredential},
		{"a description without an error is not read", 401, `Basic realm="x", error_description="bad"`, "", false, "", "Unauthorized", broker.ClassPermanent},
		{"an error inside a quoted realm is not one", 401, `Basic realm="login, error=invalid_client"`, "", false, "", "Unauthorized", broker.ClassPermanent},
		{"DPoP nonce in the challenge only", 400, `DPoP error="use_dpop_nonce", error_description="Authorization server requires nonce in DPoP proof"`,
			"", true, "use_dpop_nonce", "requires nonce", broker.ClassRetryNow},
		{"a long code and description are cut", 401, `Bearer error="` + strings.Repeat("e", 2000) + `", error_description="` + strings.Repeat("d", 2000) + `"`,
			"", false, strings.Repeat("e", scrub.MaxText) + "…", strings.Repeat("d", scrub.MaxText) + "…", broker.ClassPermanent},
		{"the body's code wins", 401, `Basic error="invalid_token"`, `{"error":"invalid_client"}`, false, "invalid_client", "", broker.ClassCredential},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("WWW-Authenticate", tc.challenge)
				w.Header().Set("DPoP-Nonce", "n-1")
				w.WriteHeader(tc.status)
				w.Write([]byte(tc.body))
			}))
			defer srv.Close()
			cfg := Config{Name: "bank", TokenURL: srv.URL, ClientID: "c", ClientSecret: secretValue}
			if tc.dpop {
				cfg.DPoP = dpoptest.NewKey(t)
			}
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			_, err = src.Token(context.Background(), broker.Request{})
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.Code != tc.code || ae.StatusCode != tc.status {
				t.Fatalf("Token = %v, want an APIError %d %q", err, tc.status, tc.code)
			}
			if !strings.Contains(ae.Description, tc.desc) {
				t.Errorf("description %q does not say %q", ae.Description, tc.desc)
			}
			if got := src.Classify(err); got != tc.class {
				t.Errorf("class %d, want %d", got, tc.class)
			}
			checkNoSecrets(t, err)
		})
	}
}
