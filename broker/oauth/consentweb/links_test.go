package consentweb

import (
	"context"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/callers"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// TestLinksChallengeUnauthenticatedCaller: the links route answers a
// caller without a JWT 401 with a WWW-Authenticate challenge (RFC 6750
// §3), as the token_broker handler does.
func TestLinksChallengeUnauthenticatedCaller(t *testing.T) {
	const toml = `[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "https://bank.invalid/token"
client_id = "tpp"
client_secret = "{env.BANK_SECRET}"
  [providers.bank.consent]
  authorization_url = "https://bank.invalid/authorize"
  redirect_uris = ["https://cb.partner.example/consent/callback"]
  scopes = ["offline_access", "accounts"]

[merchants.acme]
provider = "bank"
`
	reg, err := configtest.Load(t, "merchants.toml", []byte(toml), config.Options{RefreshStore: oauth.NewMemoryStore(),
		ConsentStore: &oauth.MemoryPendingStore{},
		LookupEnv:    func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }})
	if err != nil {
		t.Fatal(err)
	}
	policy, err := callers.New(context.Background(), callers.Config{Issuer: "https://issuer.invalid", Audience: "token-broker",
		Allow: map[string][]string{"payments": {"acme"}}})
	if err != nil {
		t.Fatal(err)
	}
	web, err := New(Options{Links: true, Registry: reg, Gate: CallerGate{Policy: policy}, Logger: zap.NewNop(),
		Steps: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "steps"}, []string{"provider", "step", "outcome"})})
	if err != nil {
		t.Fatal(err)
	}
	w := httptest.NewRecorder()
	web.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "http://localhost/consent/links", strings.NewReader(`{"merchant":"acme"}`)))
	if w.Code != http.StatusUnauthorized || !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Bearer realm=") {
		t.Errorf("links without a caller JWT: %d, WWW-Authenticate %q; want 401 with a Bearer challenge", w.Code, w.Header().Get("WWW-Authenticate"))
	}
}
