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

// newLinksHandler returns the links route of a registry whose merchant
// acme has a provider with a consent table, its callers admitted by gate.
func newLinksHandler(t *testing.T, gate CallerGate) *Handler {
	t.Helper()
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
	web, err := New(Options{Links: true, Registry: reg, Gate: gate, Logger: zap.NewNop(),
		Steps: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "steps"}, []string{"provider", "step", "outcome"})})
	if err != nil {
		t.Fatal(err)
	}
	return web
}

// postLink posts body to the links route of web.
func postLink(web *Handler, body string) *httptest.ResponseRecorder {
	w := httptest.NewRecorder()
	web.ServeHTTP(w, httptest.NewRequest(http.MethodPost, "http://localhost/consent/links", strings.NewReader(body)))
	return w
}

// TestLinksChallengeUnauthenticatedCaller: the links route answers a
// caller without a JWT 401 with a WWW-Authenticate challenge (RFC 6750
// §3), as the token_broker handler does.
func TestLinksChallengeUnauthenticatedCaller(t *testing.T) {
	policy, err := callers.New(context.Background(), callers.Config{Issuer: "https://issuer.invalid", Audience: "token-broker",
		Allow: map[string][]string{"payments": {"acme"}}})
	if err != nil {
		t.Fatal(err)
	}
	w := postLink(newLinksHandler(t, CallerGate{Policy: policy}), `{"merchant":"acme"}`)
	if w.Code != http.StatusUnauthorized || !strings.HasPrefix(w.Header().Get("WWW-Authenticate"), "Bearer realm=") {
		t.Errorf("links without a caller JWT: %d, WWW-Authenticate %q; want 401 with a Bearer challenge", w.Code, w.Header().Get("WWW-Authenticate"))
	}
}

// TestLinksWithoutMerchant: a links request that names no merchant is a
// bad request, as on the admin API, not an unknown merchant.
func TestLinksWithoutMerchant(t *testing.T) {
	w := postLink(newLinksHandler(t, CallerGate{}), `{"return_url":"https://app.partner.example/consent/"}`)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), `"error":"bad_request"`) {
		t.Errorf("links without a merchant: %d %s; want 400 bad_request", w.Code, w.Body)
	}
}
