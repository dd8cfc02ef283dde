package integration

import (
	"encoding/json"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// The consent flow through a real Caddy (examples/bank-consent) against a
// real authorization server with a certified provider's strict defaults
// (integration/optest: zitadel with PKCE for every client, OpenID Connect
// Core §11, PAR required per client registration, RFC 7009 revocation of
// the whole grant), whose resource server checks each token by
// introspection.

const (
	opClientID     = "bank-consent-client"
	opClientSecret = "bank-consent-secret-4d2f"
	opReturnURL    = "https://app.partner.example/consent/"
)

// strictBank is the running setup.
type strictBank struct {
	op      *optest.Server
	base    string // the sidecar
	site    string // the public callback site
	logFile string
}

// startStrictBank starts the authorization server with the client
// (changed by mod), its resource server as the bank's API, and
// examples/bank-consent in Caddy with consentTOML added to the provider's
// consent table.
func startStrictBank(t *testing.T, mod func(*optest.Client), consentTOML string) *strictBank {
	t.Helper()
	cbPort := freePort(t)
	site := "http://127.0.0.1:" + strconv.Itoa(cbPort)
	client := &optest.Client{ID: opClientID, Secret: opClientSecret, Method: "client_secret_basic", Redirects: []string{site + "/consent/callback"}}
	if mod != nil {
		mod(client)
	}
	srv := optest.Start(t, optest.Options{Iss: true}, client)
	api := srv.ResourceServer(t)
	for k, v := range map[string]string{"BANK_ISSUER": srv.URL, "BANK_API": api.URL, "BANK_CLIENT_ID": opClientID,
		"BANK_CLIENT_SECRET": opClientSecret, "CONSENT_CALLBACK": site + "/consent/callback", "APP_RETURN_URL": opReturnURL,
		"CONSENT_SITE": site} {
		t.Setenv(k, v)
	}
	cf := useExample(t, "bank-consent")
	dir := t.TempDir()
	toml := readFile(t, filepath.Join(repoRoot(t), "examples", "bank-consent", "merchants.toml"))
	toml = strings.Replace(toml, "  link_ttl = \"10m\"\n", "  link_ttl = \"10m\"\n"+consentTOML+"\n", 1)
	cfgPath := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(cfgPath, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TOKEN_BROKER_CONFIG", cfgPath)
	logFile := filepath.Join(dir, "caddy.log")
	cf = strings.Replace(cf, "\ttoken_broker {", "\tlog {\n\t\toutput file "+logFile+"\n\t}\n\tstorage file_system "+dir+"\n\ttoken_broker {", 1)
	base := startCaddy(t, cf)
	waitListening(t, "127.0.0.1:"+strconv.Itoa(cbPort))
	return &strictBank{op: srv, base: base, site: site, logFile: logFile}
}

// consent runs a consent for merchant with the return URL, the merchant
// approving or denying at the server, and returns where the callback sends
// the browser (nil: a page, whose status and text are returned).
func (b *strictBank) consent(t *testing.T, merchant string, approve bool, returnURL string) (*url.URL, int, string) {
	t.Helper()
	status, link := consentLink(t, b.base, merchant, returnURL)
	if status != http.StatusOK {
		t.Fatalf("consent link: %d %v", status, link)
	}
	browser := newBrowser()
	resp := startConsent(t, browser, link["url"])
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("start: %d", resp.StatusCode)
	}
	back, err := b.op.Authorize(resp.Header.Get("Location"), approve)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(back.String(), b.site+"/consent/callback?") {
		t.Fatalf("the server sent the browser to %s", back.Redacted())
	}
	resp, err = browser.Get(back.String())
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var page strings.Builder
	_, _ = io.Copy(&page, resp.Body)
	if status, page, ok := resultPage(t, browser, back.String(), resp.Header.Get("Location")); ok {
		return nil, status, page
	}
	if resp.StatusCode == http.StatusSeeOther {
		final, _ := url.Parse(resp.Header.Get("Location"))
		return final, resp.StatusCode, ""
	}
	return nil, resp.StatusCode, page.String()
}

// TestStrictServerConsentGivesRefreshToken (OpenID Connect Core §11): the
// consent asks for offline_access with prompt=consent, so the strict
// server issues a refresh token and the merchant's proxied calls get
// tokens the API accepts. The configured authorization-request parameters
// reach the server, on the authorization URL and through PAR.
func TestStrictServerConsentGivesRefreshToken(t *testing.T) {
	const details = `[{"type": "payment_initiation", "instructedAmount": {"currency": "EUR", "amount": "12.00"}}]`
	rows := []struct {
		name    string
		toml    string
		pushed  int64
		prompt  string
		details bool
	}{
		{"example as shipped", "", 0, "consent", false},
		{"parameters, PAR", "  par = true\n  prompt = [\"login\"]\n  acr_values = [\"urn:bank:sca\"]\n" +
			"  authorization_details = '" + details + "'\n  resources = [\"https://api.bank.example/payments\"]", 1, "consent login", true},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			b := startStrictBank(t, nil, tc.toml)
			final, _, page := b.consent(t, "acme", true, opReturnURL+"done")
			if final == nil || final.Query().Get("outcome") != "ok" || final.Query().Get("merchant") != "acme" {
				t.Fatalf("back to the app at %v (page %q), want outcome=ok", final, page)
			}
			reqs := b.op.AuthorizationRequests()
			if len(reqs) != 1 || reqs[0].Get("prompt") != tc.prompt || !strings.Contains(reqs[0].Get("scope"), "offline_access") {
				t.Fatalf("authorization requests %v", reqs)
			}
			if b.op.Pushed.Load() != tc.pushed {
				t.Errorf("%d pushed requests, want %d", b.op.Pushed.Load(), tc.pushed)
			}
			if tc.details {
				q := reqs[0]
				if q.Get("acr_values") != "urn:bank:sca" || !strings.Contains(q.Get("authorization_details"), `"payment_initiation"`) ||
					!slices.Equal(q["resource"], []string{"https://api.bank.example/payments"}) {
					t.Errorf("the server got %v", q)
				}
			}
			status, body := get(t, b.base+"/accounts", "X-Merchant-Id", "acme")
			var api map[string]any
			_ = json.Unmarshal(body, &api)
			if status != http.StatusOK || api["active"] != true || api["client_id"] != opClientID {
				t.Fatalf("proxied call after consent: %d %s", status, body)
			}
		})
	}
}

// TestRevokedGrantFirstCallIsConsentRequired: after RFC 7009 revocation of
// the merchant's refresh token (the whole grant, so the cached access
// token dies too), the very first proxied call answers consent_required,
// not the API's 401.
func TestRevokedGrantFirstCallIsConsentRequired(t *testing.T) {
	b := startStrictBank(t, nil, "")
	if final, _, page := b.consent(t, "acme", true, ""); final != nil || !strings.Contains(page, "Thank you") {
		t.Fatalf("consent: %v %q", final, page)
	}
	if status, body := get(t, b.base+"/accounts", "X-Merchant-Id", "acme"); status != http.StatusOK {
		t.Fatalf("proxied call after consent: %d %s", status, body)
	}
	rts := b.op.Storage.RefreshTokens(opClientID)
	if len(rts) != 1 {
		t.Fatalf("%d refresh tokens at the server", len(rts))
	}
	if err := b.op.Revoke(opClientID, opClientSecret, rts[0]); err != nil {
		t.Fatal(err)
	}
	for i := range 2 {
		status, body := get(t, b.base+"/accounts", "X-Merchant-Id", "acme")
		var e map[string]any
		_ = json.Unmarshal(body, &e)
		if status != http.StatusBadGateway || e["error"] != "consent_required" {
			t.Errorf("call %d after revocation: %d %s, want 502 consent_required", i+1, status, body)
		}
	}
}

// TestConsentProviderErrorIsNotDenial: a provider's refusal of the
// authorization request (PAR required by the client's registration, not
// advertised) is outcome=provider_error with the provider's code, a page
// that does not say the merchant refused, and a log line that tells the
// operator to set par = true; the merchant's own denial stays
// outcome=denied; with par = true the same client consents.
func TestConsentProviderErrorIsNotDenial(t *testing.T) {
	requirePAR := func(c *optest.Client) { c.RequirePAR = true }
	rows := []struct {
		name    string
		mod     func(*optest.Client)
		toml    string
		approve bool
		outcome string
		code    string
		page    string // without a return URL
		log     string
	}{
		{"PAR required by registration, not sent", requirePAR, "", true, "provider_error", "invalid_request",
			"could not be processed at Example Bank", "set par = true in [providers.bank.consent]"},
		{"merchant denies", nil, "", false, "denied", "", "The consent was not given at Example Bank", ""},
		{"PAR required by registration, par = true", requirePAR, "  par = true", true, "ok", "", "Thank you", ""},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			b := startStrictBank(t, tc.mod, tc.toml)
			final, _, _ := b.consent(t, "acme", tc.approve, opReturnURL+"done")
			if final == nil || final.Query().Get("outcome") != tc.outcome || final.Query().Get("error") != tc.code {
				t.Fatalf("back to the app at %v, want outcome=%s error=%q", final, tc.outcome, tc.code)
			}
			_, _, page := b.consent(t, "globex", tc.approve, "")
			if !strings.Contains(page, tc.page) || tc.outcome == "provider_error" && strings.Contains(page, "not given") {
				t.Errorf("page %q, want %q", page, tc.page)
			}
			if tc.log != "" {
				logs := readFile(t, b.logFile)
				if !strings.Contains(logs, tc.log) || !strings.Contains(logs, `"provider_error":"invalid_request"`) {
					t.Errorf("the log does not tell the operator %q", tc.log)
				}
				if strings.Contains(logs, opClientSecret) {
					t.Error("the log holds the client secret")
				}
			}
		})
	}
}
