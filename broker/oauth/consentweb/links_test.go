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
)

// newLinksHandler returns the links route of a registry whose merchant
// acme has a provider with a consent table, its callers admitted by gate.
func newLinksHandler(t *testing.T, gate CallerGate) *Handler {
	t.Helper()
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.invalid/token", ClientID: "tpp",
		ClientSecret: "bank-secret"}, &oauth.MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	flow, err := oauth.NewAuthCode(src, oauth.AuthCodeConfig{RedirectURIs: []string{"https://cb.partner.example/consent/callback"},
		AuthorizationURL: "https://bank.invalid/authorize", Scopes: []string{"offline_access"}}, &oauth.Pendings{Store: &oauth.MemoryPendingStore{}})
	if err != nil {
		t.Fatal(err)
	}
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank", Source: src, Consent: flow}},
		Merchants: map[string]*config.Merchant{"acme": {ID: "acme", Terms: &config.Terms{Provider: "bank"}}}}
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
// bad request, as on the admin API, not an unknown merchant, and its
// message says that the merchant is missing and how to send it; under a
// caller policy the caller is authenticated first, so a caller without a
// JWT is told that (401), not that the merchant is missing.
func TestLinksWithoutMerchant(t *testing.T) {
	policy, err := callers.New(context.Background(), callers.Config{Issuer: "https://issuer.invalid", Audience: "token-broker",
		Allow: map[string][]string{"payments": {"acme"}}})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		gate   CallerGate
		status int
		want   []string // in the body
	}{
		{"no caller policy", CallerGate{}, http.StatusBadRequest, []string{`"error":"bad_request"`, "no merchant", `\"merchant\"`}},
		{"a caller policy, no caller JWT", CallerGate{Policy: policy}, http.StatusUnauthorized, []string{`"error":"caller_unauthenticated"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			w := postLink(newLinksHandler(t, tc.gate), `{"return_url":"https://app.partner.example/consent/"}`)
			if w.Code != tc.status {
				t.Errorf("links without a merchant: %d %s; want %d", w.Code, w.Body, tc.status)
			}
			for _, want := range tc.want {
				if !strings.Contains(w.Body.String(), want) {
					t.Errorf("links without a merchant: %s; want %s in it", w.Body, want)
				}
			}
		})
	}
}

// TestLinksRefuseUnknownFields: a links request with a field the API does
// not have (a misspelt return_url) or with more than one JSON value is a
// bad request naming it, not a link made without what the app meant.
func TestLinksRefuseUnknownFields(t *testing.T) {
	for _, tc := range []struct{ body, want string }{
		{`{"merchant":"acme","returnUrl":"https://app.partner.example/consent/"}`, `returnUrl`},
		{`{"merchant":"acme"} {"merchant":"globex"}`, "one JSON object"},
		{`{"merchant":"acme"}]`, "one JSON object"},
		{`{"merchant":"acme"}}`, "one JSON object"},
		{`{"merchant":"acme"}` + strings.Repeat(" ", 16<<10) + `{"merchant":"globex"}`, "one JSON object"},
	} {
		w := postLink(newLinksHandler(t, CallerGate{}), tc.body)
		if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), tc.want) {
			t.Errorf("links %s: %d %s; want 400 naming %s", tc.body, w.Code, w.Body, tc.want)
		}
	}
}
