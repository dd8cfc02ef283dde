package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// hop sends a request with browser (see newBrowser: it keeps cookies, as
// the consent site binds a consent to its browser) and checks the consent
// site's headers when the answer comes from it.
func hop(t *testing.T, browser *http.Client, req *http.Request, fromConsent bool) *http.Response {
	t.Helper()
	resp, err := browser.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	if fromConsent && (resp.Header.Get("Cache-Control") != "no-store" || resp.Header.Get("Referrer-Policy") != "no-referrer") {
		t.Errorf("%s: Cache-Control %q, Referrer-Policy %q", req.URL.Path, resp.Header.Get("Cache-Control"), resp.Header.Get("Referrer-Policy"))
	}
	return resp
}

func mustReq(t *testing.T, method, u string, body io.Reader) *http.Request {
	t.Helper()
	req, err := http.NewRequest(method, u, body)
	if err != nil {
		t.Fatal(err)
	}
	return req
}

// startConsent plays the merchant's browser opening a consent link: the
// link's start page (which must offer the form that starts the
// consent), then the form's post to …/start. It returns the post's
// answer (a redirect to the bank when the link is good).
func startConsent(t *testing.T, browser *http.Client, link string) *http.Response {
	t.Helper()
	resp, err := browser.Do(mustReq(t, http.MethodGet, link, nil))
	if err != nil {
		t.Fatal(err)
	}
	page, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || resp.Header.Get("Cache-Control") != "no-store" || resp.Header.Get("Referrer-Policy") != "no-referrer" ||
		!strings.Contains(string(page), `<form method="post" action="start">`) {
		t.Fatalf("start page: %d, Cache-Control %q, Referrer-Policy %q: %.300s", resp.StatusCode, resp.Header.Get("Cache-Control"), resp.Header.Get("Referrer-Policy"), page)
	}
	u, _ := url.Parse(link)
	form := url.Values{"link": {u.Query().Get("link")}}
	u.RawQuery = ""
	req := mustReq(t, http.MethodPost, u.String(), strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	return hop(t, browser, req, true)
}

// consentLink asks the sidecar for a consent link.
func consentLink(t *testing.T, base, merchant, returnURL string, headers ...string) (int, map[string]string) {
	t.Helper()
	body, _ := json.Marshal(map[string]string{"merchant": merchant, "return_url": returnURL})
	req := mustReq(t, http.MethodPost, base+"/consent/links", strings.NewReader(string(body)))
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	out := map[string]string{}
	var raw map[string]any
	_ = json.NewDecoder(resp.Body).Decode(&raw)
	for k, v := range raw {
		out[k] = fmt.Sprint(v)
	}
	return resp.StatusCode, out
}

// consentThrough plays the merchant's browser from the link to the
// return URL and returns the callback URL used and the final redirect.
func consentThrough(t *testing.T, browser *http.Client, link string) (callback string, final *url.URL) {
	t.Helper()
	resp := startConsent(t, browser, link)
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("start: %d", resp.StatusCode)
	}
	au, _ := url.Parse(resp.Header.Get("Location"))
	form := au.Query()
	form.Set("decision", "approve")
	req := mustReq(t, http.MethodPost, au.Scheme+"://"+au.Host+au.Path, strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	resp = hop(t, browser, req, false)
	callback = resp.Header.Get("Location")
	if resp.StatusCode != http.StatusSeeOther || !strings.Contains(callback, "/consent/callback?") {
		t.Fatalf("approve: %d to %s", resp.StatusCode, callback)
	}
	resp = hop(t, browser, mustReq(t, http.MethodGet, callback, nil), true)
	if status, page, ok := resultPage(t, browser, callback, resp.Header.Get("Location")); ok { // no return URL: the result page
		if status != http.StatusOK || !strings.Contains(page, "your consent is recorded") {
			t.Fatalf("result page: %d %s", status, page)
		}
		return callback, nil
	}
	final, _ = url.Parse(resp.Header.Get("Location"))
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("callback: %d", resp.StatusCode)
	}
	return callback, final
}

// TestExampleBankConsent: examples/bank-consent in a real Caddy against the
// sandbox bank: a consent link from the sidecar, the bank's approval, the
// callback on the public site, then the merchant's proxied calls get tokens
// by refresh. A replayed callback, an unknown path and a return URL off the
// allow-list are refused; after the bank revokes the consent the merchant
// needs consent (admin API), and a new consent restores it without restart.
func TestExampleBankConsent(t *testing.T) {
	cbPort := freePort(t)
	site := "http://127.0.0.1:" + strconv.Itoa(cbPort)
	sb, sbURL := startSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: "consent-client", Secret: "consent-secret-1",
			Scopes: []string{"accounts"}, RedirectURIs: []string{site + "/consent/callback"}})
	})
	t.Setenv("BANK_ISSUER", sbURL)
	t.Setenv("BANK_API", sbURL)
	t.Setenv("BANK_CLIENT_ID", "consent-client")
	t.Setenv("BANK_CLIENT_SECRET", "consent-secret-1")
	t.Setenv("CONSENT_CALLBACK", site+"/consent/callback")
	t.Setenv("APP_RETURN_URL", "https://app.partner.example/consent/")
	t.Setenv("CONSENT_SITE", site)
	cf := useExample(t, "bank-consent")
	cf = strings.Replace(cf, "\ttoken_broker {", "\tstorage file_system "+t.TempDir()+"\n\ttoken_broker {", 1)
	base := startCaddy(t, cf)
	waitListening(t, "127.0.0.1:"+strconv.Itoa(cbPort))
	adminURL := "http://127.0.0.1:" + getenv(t, "TOKEN_BROKER_ADMIN_PORT")
	browser := newBrowser()

	if status, _ := get(t, base+"/accounts", "X-Merchant-Id", "acme"); status != http.StatusBadGateway {
		t.Errorf("before consent: %d, want 502 consent_required", status)
	}

	status, link := consentLink(t, base, "acme", "https://app.partner.example/consent/done")
	if status != http.StatusOK || !strings.HasPrefix(link["url"], site+"/consent/start?link=") {
		t.Fatalf("consent link: %d %v", status, link)
	}
	callback, final := consentThrough(t, browser, link["url"])
	if final == nil || final.Host != "app.partner.example" || final.Query().Get("merchant") != "acme" || final.Query().Get("outcome") != "ok" {
		t.Fatalf("back to the app at %s", final)
	}
	e := getEcho(t, base+"/accounts", "X-Merchant-Id", "acme")
	if !e.Authorization.Valid || e.Authorization.Organisation != "consent-client" {
		t.Fatalf("proxied call after consent: %+v", e.Authorization)
	}

	// Refusals.
	if resp := hop(t, browser, mustReq(t, http.MethodGet, callback, nil), true); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("replayed callback: %d, want 400", resp.StatusCode)
	}
	if resp := hop(t, browser, mustReq(t, http.MethodGet, link["url"], nil), true); resp.StatusCode != http.StatusBadRequest {
		t.Errorf("replayed link: %d, want 400", resp.StatusCode)
	}
	if resp := hop(t, browser, mustReq(t, http.MethodGet, site+"/consent/other", nil), true); resp.StatusCode != http.StatusNotFound {
		t.Errorf("/consent/other: %d, want 404", resp.StatusCode)
	}
	if status, body := consentLink(t, base, "acme", "https://evil.example/consent/"); status != http.StatusBadRequest || body["error"] != "return_url_not_allowed" {
		t.Errorf("return URL off the list: %d %v", status, body)
	}

	// The bank revokes the consent: the merchant needs consent again.
	if sb.RevokeRefreshTokens("consent-client") != 1 {
		t.Fatal("no refresh token at the bank")
	}
	req := mustReq(t, http.MethodPost, adminURL+"/token_broker/merchants/acme/purge", nil)
	if resp, err := http.DefaultClient.Do(req); err != nil || resp.StatusCode != 200 {
		t.Fatalf("purge: %v", err)
	}
	if status, body := get(t, base+"/accounts", "X-Merchant-Id", "acme"); status != http.StatusBadGateway || !strings.Contains(string(body), "consent_required") {
		t.Fatalf("after revocation: %d %s", status, body)
	}
	state := consentStates(t, adminURL)["acme"]
	if state["has_refresh_token"] != true || state["consent_required"] != true || state["consent_required_since"] == nil {
		t.Errorf("admin consent state after invalid_grant: %v", state)
	}
	if strings.Contains(fmt.Sprint(state), "refresh_token\":\"") {
		t.Errorf("the admin API shows a token")
	}

	_, link = consentLink(t, base, "acme", "")
	if _, final := consentThrough(t, browser, link["url"]); final != nil {
		t.Errorf("without return URL the callback redirected to %s", final)
	}
	// Service comes back at once, without restart.
	if e := getEcho(t, base+"/accounts", "X-Merchant-Id", "acme"); !e.Authorization.Valid {
		t.Fatalf("proxied call after the new consent: %+v", e.Authorization)
	}
	if state := consentStates(t, adminURL)["acme"]; state["consent_required"] != false {
		t.Errorf("admin consent state after the new consent: %v", state)
	}
}

func getenv(t *testing.T, k string) string {
	v, ok := os.LookupEnv(k)
	if !ok {
		t.Fatalf("%s is not set", k)
	}
	return v
}

// consentStates reads the admin API's consent states by merchant.
func consentStates(t *testing.T, adminURL string) map[string]map[string]any {
	t.Helper()
	status, body := get(t, adminURL+"/token_broker/consent/merchants")
	if status != http.StatusOK {
		t.Fatalf("consent merchants: %d %s", status, body)
	}
	var out struct {
		Merchants []map[string]any `json:"merchants"`
	}
	if err := json.Unmarshal(body, &out); err != nil {
		t.Fatal(err)
	}
	m := map[string]map[string]any{}
	for _, s := range out.Merchants {
		m[s["merchant"].(string)] = s
	}
	return m
}

// TestConsentLinkCallerPolicy: with a caller policy, the sidecar gives a
// consent link only to a caller allowed for the merchant.
func TestConsentLinkCallerPolicy(t *testing.T) {
	cbPort := freePort(t)
	site := "http://127.0.0.1:" + strconv.Itoa(cbPort)
	_, sbURL := startSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: "consent-client", Secret: "consent-secret-1",
			Scopes: []string{"accounts"}, RedirectURIs: []string{site + "/consent/callback"}})
	})
	for k, v := range map[string]string{"BANK_ISSUER": sbURL, "BANK_API": sbURL, "BANK_CLIENT_ID": "consent-client",
		"BANK_CLIENT_SECRET": "consent-secret-1", "CONSENT_CALLBACK": site + "/consent/callback",
		"APP_RETURN_URL": "https://app.partner.example/consent/", "CONSENT_SITE": site} {
		t.Setenv(k, v)
	}
	iss := newIssuer(t)
	const issURL = "https://kubernetes.default.svc"
	cf := useExample(t, "bank-consent")
	cf = strings.Replace(cf, "\ttoken_broker {\n", "\tstorage file_system "+t.TempDir()+"\n\ttoken_broker {\n"+
		"\t\tcallers {\n\t\t\tissuer "+issURL+"\n\t\t\taudience token-broker\n\t\t\tjwks_url "+iss.url+"\n"+
		"\t\t\tallow system:serviceaccount:payments:api acme\n\t\t}\n", 1)
	base := startCaddy(t, cf)
	payments := "Bearer " + iss.token(t, issURL, "system:serviceaccount:payments:api", "token-broker", time.Now().Add(time.Hour))
	rows := []struct {
		name, merchant, auth string
		status               int
		code                 string
	}{
		{"allowed", "acme", payments, 200, ""},
		{"merchant not allowed", "globex", payments, 403, "merchant_not_allowed"},
		{"no JWT", "acme", "", 401, "caller_unauthenticated"},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			var h []string
			if tc.auth != "" {
				h = []string{"Authorization", tc.auth}
			}
			status, body := consentLink(t, base, tc.merchant, "", h...)
			if status != tc.status || tc.code != "" && body["error"] != tc.code || tc.code == "" && body["url"] == "" {
				t.Errorf("%d %v, want %d %s", status, body, tc.status, tc.code)
			}
		})
	}
}
