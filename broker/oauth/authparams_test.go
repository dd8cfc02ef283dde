package oauth

import (
	"context"
	"errors"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// startConsent opens a consent link of flow for merchant and returns the
// authorization URL and the callback host.
func startConsent(t *testing.T, flow *AuthCode, merchant string) (string, string) {
	t.Helper()
	authURL, host, err := startLink(t, flow, merchant)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return authURL, host
}

// withConsentConfig rebuilds f's flow with cfg's request parameters.
func withConsentConfig(t *testing.T, f *consentFixture, mod func(*AuthCodeConfig)) {
	t.Helper()
	cfg := f.flow.cfg
	mod(&cfg)
	flow, err := NewAuthCode(f.src, cfg, f.pend)
	if err != nil {
		t.Fatal(err)
	}
	f.flow = flow
}

// TestAuthCodeOfflineAccessAgainstStrictServer: a server that follows
// OpenID Connect Core §11 gives a refresh token for offline_access only
// with prompt=consent. The flow sends it, with or without PAR, beside the
// configured authorization-request parameters, which reach the server.
func TestAuthCodeOfflineAccessAgainstStrictServer(t *testing.T) {
	const details = `[ {"type": "payment_initiation", "instructedAmount": {"currency": "EUR", "amount": "12.00"}} ]`
	const claims = `{"id_token": {"acr": {"essential": true}}, "userinfo": {"email": null}}`
	rows := []struct {
		name       string
		par        bool
		requirePAR bool // by the client's registration
		extra      bool // the configured parameters
	}{
		{"defaults, no PAR", false, false, false},
		{"defaults, PAR", true, false, false},
		{"all parameters, no PAR", false, false, true},
		{"all parameters, PAR required by the client's registration", true, true, true},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, tc.par, func(c *optest.Client) { c.RequirePAR = tc.requirePAR })
			if tc.extra {
				withConsentConfig(t, f, func(c *AuthCodeConfig) {
					c.Prompt, c.ACRValues = []string{"login"}, []string{"urn:bank:sca", "urn:bank:basic"}
					c.Claims, c.AuthorizationDetails = claims, details
					c.Resources = []string{"https://api.bank.example/accounts", "https://api.bank.example/payments"}
				})
			}
			_, res := f.consent(t, "acme")
			if res.Fingerprint == "" {
				t.Fatal("no refresh token stored")
			}
			if _, err := f.src.Token(context.Background(), broker.Request{Merchant: "acme"}); err != nil {
				t.Fatalf("Token after consent: %v", err)
			}
			reqs := f.op.AuthorizationRequests()
			if len(reqs) != 1 {
				t.Fatalf("%d authorization requests", len(reqs))
			}
			q := reqs[0]
			if got := int(f.op.Pushed.Load()); got != map[bool]int{false: 0, true: 1}[tc.par] {
				t.Errorf("%d pushed requests", got)
			}
			wantPrompt := "consent"
			if tc.extra {
				wantPrompt = "consent login"
			}
			if q.Get("prompt") != wantPrompt {
				t.Errorf("prompt %q, want %q", q.Get("prompt"), wantPrompt)
			}
			if !tc.extra {
				for _, k := range []string{"acr_values", "claims", "authorization_details", "resource"} {
					if q.Has(k) {
						t.Errorf("%s sent though not configured", k)
					}
				}
				return
			}
			if q.Get("acr_values") != "urn:bank:sca urn:bank:basic" || q.Get("claims") != compactJSON(claims) ||
				q.Get("authorization_details") != compactJSON(details) ||
				!slices.Equal(q["resource"], []string{"https://api.bank.example/accounts", "https://api.bank.example/payments"}) {
				t.Errorf("the server got %v", q)
			}
		})
	}
}

// TestAuthCodeParamsInvalid: authorization-request parameters the flow
// cannot send, and a flow without redirect_uris, are configuration errors
// that name the parameter.
func TestAuthCodeParamsInvalid(t *testing.T) {
	rows := []struct {
		name string
		mod  func(*AuthCodeConfig)
		want string
	}{
		{"prompt none", func(c *AuthCodeConfig) { c.Prompt = []string{"none"} }, "prompt none"},
		{"unknown prompt", func(c *AuthCodeConfig) { c.Prompt = []string{"always"} }, `prompt "always" is unknown`},
		{"acr value with a space", func(c *AuthCodeConfig) { c.ACRValues = []string{"a b"} }, "acr_values"},
		{"claims not JSON", func(c *AuthCodeConfig) { c.Claims = `{"id_token":` }, "claims must be a JSON object"},
		{"claims an array", func(c *AuthCodeConfig) { c.Claims = `[]` }, "claims must be a JSON object"},
		{"claims null", func(c *AuthCodeConfig) { c.Claims = `null` }, "claims must be a JSON object"},
		{"authorization_details null", func(c *AuthCodeConfig) { c.AuthorizationDetails = `null` }, "authorization_details must be a JSON array"},
		{"authorization_details an object", func(c *AuthCodeConfig) { c.AuthorizationDetails = `{"type":"x"}` }, "authorization_details must be a JSON array"},
		{"authorization_details without type", func(c *AuthCodeConfig) { c.AuthorizationDetails = `[{"type":"x"},{"actions":["read"]}]` }, `entry 1 has no string "type"`},
		{"relative resource", func(c *AuthCodeConfig) { c.Resources = []string{"/accounts"} }, "resource"},
		{"resource with fragment", func(c *AuthCodeConfig) { c.Resources = []string{"https://api.example/#x"} }, "resource"},
		{"no redirect_uris", func(c *AuthCodeConfig) { c.RedirectURIs = nil }, "no redirect_uris"},
	}
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			cfg := AuthCodeConfig{RedirectURIs: []string{callbackURL}}
			tc.mod(&cfg)
			_, err := NewAuthCode(f.src, cfg, f.pend)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("NewAuthCode = %v, want an error about %s", err, tc.want)
			}
		})
	}
}

// TestAuthCodeProviderErrors: the merchant's denial (access_denied) is
// told from the provider's refusal of the request, which names the
// provider's code and tells the operator what to set.
func TestAuthCodeProviderErrors(t *testing.T) {
	rows := []struct {
		name       string
		requirePAR bool
		deny       bool
		reason     string
		code       string
		hint       string
	}{
		{"merchant denies", false, true, ReasonDenied, "", "access_denied"},
		{"PAR required by the client's registration, not sent", true, false, ReasonProviderError, "invalid_request", "set par = true in [providers.bank.consent]"},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false, func(c *optest.Client) { c.RequirePAR = tc.requirePAR })
			authURL, host := startConsent(t, f.flow, "acme")
			back, err := f.op.Authorize(authURL, !tc.deny)
			if err != nil {
				t.Fatal(err)
			}
			res, err := f.flow.Callback(context.Background(), host, back.Query())
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != tc.reason || ce.Code != tc.code || res.Merchant != "acme" {
				t.Fatalf("Callback = %+v, %v; want reason %s code %q", res, err, tc.reason, tc.code)
			}
			if !strings.Contains(err.Error(), tc.hint) {
				t.Errorf("the error does not say %q: %v", tc.hint, err)
			}
			checkNoSecrets(t, err)
		})
	}
}

// TestErrorCode: a provider's error code is passed on only when well
// formed.
func TestErrorCode(t *testing.T) {
	for in, want := range map[string]string{
		"invalid_request": "invalid_request", "": "unknown", "Invalid Request": "unknown",
		"a<script>": "unknown", strings.Repeat("a", 65): "unknown", "server_error": "server_error",
	} {
		if got := errorCode(in); got != want {
			t.Errorf("errorCode(%q) = %q, want %q", in, got, want)
		}
	}
}

// TestRevocationRevokesTheGrant: RFC 7009 revocation of the merchant's
// refresh token at the strict server revokes the whole grant: the access
// token obtained with it is no longer accepted by the resource server.
func TestRevocationRevokesTheGrant(t *testing.T) {
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
	f.consent(t, "acme")
	tok, err := f.src.Token(context.Background(), broker.Request{Merchant: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	api := f.op.ResourceServer(t)
	call := func() int {
		t.Helper()
		resp, err := doBearer(api.URL+"/accounts", tok.Value.Reveal())
		if err != nil {
			t.Fatal(err)
		}
		return resp
	}
	if got := call(); got != 200 {
		t.Fatalf("API with the fresh token: %d", got)
	}
	rt, err := f.store.Load(context.Background(), f.src.StoreKey("acme"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.src.Revoke(context.Background(), rt, "refresh_token"); err != nil {
		t.Fatal(err)
	}
	if got := call(); got != 401 {
		t.Errorf("API after revocation of the refresh token: %d, want 401", got)
	}
	var cr *ConsentRequiredError
	if _, err := f.src.Token(context.Background(), broker.Request{Merchant: "acme"}); !errors.As(err, &cr) {
		t.Errorf("Token after revocation = %v, want *ConsentRequiredError", err)
	}
}

// doBearer GETs u with a bearer token and returns the status.
func doBearer(u, token string) (int, error) {
	req, err := http.NewRequest(http.MethodGet, u, nil)
	if err != nil {
		return 0, err
	}
	req.Header.Set("Authorization", "Bearer "+token)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return 0, err
	}
	resp.Body.Close()
	return resp.StatusCode, nil
}

// TestAuthCodePARRefused: a pushed request the provider refuses (here the
// client's authentication) is a ReasonProviderError at Start, with the
// provider's code and what to check, not an unavailable provider.
func TestAuthCodePARRefused(t *testing.T) {
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, true)
	f.op.Storage.AddClient(&optest.Client{ID: "bank-client", Secret: "another-secret", Method: "client_secret_basic", Redirects: []string{callbackURL}})
	link, err := f.flow.NewLink(context.Background(), "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	_, rec, err := f.flow.Start(context.Background(), u.Query().Get("link"), u.Host)
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonProviderError || ce.Code != "invalid_client" || rec.Merchant != "acme" {
		t.Fatalf("Start = %v, want provider_error invalid_client", err)
	}
	if !strings.Contains(err.Error(), "check the client's registration") {
		t.Errorf("the error does not say what to check: %v", err)
	}
	checkNoSecrets(t, err, "another-secret")
}
