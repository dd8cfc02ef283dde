package integration

import (
	"crypto/tls"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/cookiejar"
	"net/url"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// newBrowser is a browser with its own cookie jar that does not follow
// redirects (the tests follow them).
// It trusts any server certificate (the HTTPS site's is from Caddy's
// internal CA).
func newBrowser() *http.Client {
	jar, _ := cookiejar.New(nil) // never fails without options
	return &http.Client{Timeout: 30 * time.Second, Jar: jar,
		Transport:     &http.Transport{TLSClientConfig: &tls.Config{InsecureSkipVerify: true}},
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
}

// browse sends a GET or a form POST with browser and returns the answer,
// its body read.
func browse(t *testing.T, browser *http.Client, method, u string, form url.Values) (*http.Response, string) {
	t.Helper()
	var body io.Reader
	if form != nil {
		body = strings.NewReader(form.Encode())
	}
	req := mustReq(t, method, u, body)
	if form != nil {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	resp, err := browser.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp, string(b)
}

// approveAtBank opens a consent link in browser and approves at the
// sandbox bank; it returns the callback URL, not yet opened.
func approveAtBank(t *testing.T, browser *http.Client, link string) string {
	t.Helper()
	resp := startConsent(t, browser, link)
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("start: %d", resp.StatusCode)
	}
	au, _ := url.Parse(resp.Header.Get("Location"))
	form := au.Query()
	form.Set("decision", "approve")
	resp, _ = browse(t, browser, http.MethodPost, au.Scheme+"://"+au.Host+au.Path, form)
	callback := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusSeeOther || !strings.Contains(callback, "/callback?") {
		t.Fatalf("approve: %d to %s", resp.StatusCode, callback)
	}
	return callback
}

// consentSite is two consent providers on one callback site, one links
// endpoint for both, and file-system storage in a folder of the test.
type consentSite struct {
	sb        *sandbox.Server
	base      string // the sidecar
	site      string // the callback site
	admin     string
	storage   string
	caddyfile string
}

// startConsentSite writes the registry (extra is added to each consent
// table) and starts Caddy, the callback site on plain HTTP.
func startConsentSite(t *testing.T, extra string) *consentSite {
	t.Helper()
	return startConsentSiteOn(t, extra, "http")
}

// startConsentSiteOn is startConsentSite with the callback site on scheme:
// "https" serves it with a certificate from Caddy's internal CA.
func startConsentSiteOn(t *testing.T, extra, scheme string) *consentSite {
	t.Helper()
	cbPort := freePort(t)
	site := scheme + "://127.0.0.1:" + strconv.Itoa(cbPort)
	siteTLS, globalTLS := "", ""
	if scheme == "https" {
		siteTLS, globalTLS = "\ttls internal\n", "\tskip_install_trust\n\tauto_https disable_redirects\n"
	}
	sb, sbURL := startSandbox(t, func(c *sandbox.Config) {
		for _, p := range []string{"bank", "bank2"} {
			c.BankClients = append(c.BankClients, sandbox.BankClient{ID: p + "-client", Secret: "consent-secret-1",
				Scopes: []string{"accounts"}, RedirectURIs: []string{site + "/consent/" + p + "/callback"}})
		}
	})
	t.Setenv("CONSENT_SECRET", "consent-secret-1")
	dir := t.TempDir()
	var reg strings.Builder
	for _, p := range []string{"bank", "bank2"} {
		fmt.Fprintf(&reg, `[providers.%[1]s]
type = "oauth2"
grant = "refresh_token"
issuer = %[2]q
client_id = "%[1]s-client"
client_secret = "{env.CONSENT_SECRET}"
  [providers.%[1]s.consent]
  redirect_uris = ["%[3]s/consent/%[1]s/callback"]
  return_urls = ["https://app.partner.example/app/consent/"]
  scopes = ["openid", "offline_access", "accounts"]
  %[4]s

`, p, sbURL, site, extra)
	}
	reg.WriteString("[merchants.acme]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n\n[merchants.globex]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n\n[merchants.initech]\nprovider = \"bank2\"\nscopes = [\"accounts\"]\n")
	if err := os.WriteFile(filepath.Join(dir, "merchants.toml"), []byte(reg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	storage := filepath.Join(dir, "storage")
	cf := fmt.Sprintf(`{
%s	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	storage file_system %s
	token_broker {
		config %s
	}
}

http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	handle /consent/links {
		token_broker_consent {
			links
		}
	}
	handle {
		token_broker
		reverse_proxy %s
	}
}

%s {
%s	handle /consent/bank/* {
		token_broker_consent bank
	}
	handle /consent/bank2/* {
		token_broker_consent bank2
	}
	handle {
		respond 404
	}
}
`, globalTLS, storage, filepath.Join(dir, "merchants.toml"), sbURL, site, siteTLS)
	base := startCaddy(t, cf)
	waitListening(t, "127.0.0.1:"+strconv.Itoa(cbPort))
	for wait, deadline := 10*time.Millisecond, time.Now().Add(30*time.Second); ; wait = min(2*wait, time.Second) {
		resp, err := newBrowser().Get(site + "/other") // the certificate is issued in the background
		if err == nil {
			resp.Body.Close()
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: %v", site, err)
		}
		time.Sleep(wait)
	}
	return &consentSite{sb: sb, base: base, site: site, admin: "http://127.0.0.1:" + getenv(t, "TOKEN_BROKER_ADMIN_PORT"), storage: storage, caddyfile: cf}
}

// TestConsentLinksOneEndpointForEveryProvider: one /consent/links route
// serves the merchants of two providers, each link on its provider's
// callback; each consent completes and feeds its merchant's calls.
func TestConsentLinksOneEndpointForEveryProvider(t *testing.T) {
	s := startConsentSite(t, "")
	for _, tc := range []struct{ merchant, provider string }{{"acme", "bank"}, {"initech", "bank2"}} {
		t.Run(tc.merchant, func(t *testing.T) {
			status, link := consentLink(t, s.base, tc.merchant, "https://app.partner.example/app/consent/done")
			if status != http.StatusOK || link["provider"] != tc.provider || !strings.HasPrefix(link["url"], s.site+"/consent/"+tc.provider+"/start?link=") {
				t.Fatalf("link: %d %v", status, link)
			}
			browser := newBrowser()
			resp, _ := browse(t, browser, http.MethodGet, approveAtBank(t, browser, link["url"]), nil)
			if final, _ := url.Parse(resp.Header.Get("Location")); resp.StatusCode != http.StatusSeeOther || final.Query().Get("outcome") != "ok" {
				t.Fatalf("callback: %d to %s", resp.StatusCode, final)
			}
			e := getEcho(t, s.base+"/accounts", "X-Merchant-Id", tc.merchant)
			if !e.Authorization.Valid || e.Authorization.Organisation != tc.provider+"-client" {
				t.Fatalf("proxied call: %+v", e.Authorization)
			}
		})
	}
	if status, body := consentLink(t, s.base, "nobody", ""); status != http.StatusNotFound {
		t.Errorf("unknown merchant: %d %v", status, body)
	}
}

// TestConsentCallbackBoundToBrowser: an attacker opens a link for a
// merchant and sends the bank's page to a victim, whose browser (another
// cookie jar) approves and reaches the callback: refused with a page that
// says so, no refresh token for the merchant; the state is not used up by
// the refusal. The cookie is HttpOnly, SameSite=Lax, for the whole site;
// on HTTPS it is __Host- prefixed and Secure.
func TestConsentCallbackBoundToBrowser(t *testing.T) {
	for _, tc := range []struct {
		scheme, cookie string
		secure         bool
	}{{"http", "token_broker_consent", false}, {"https", "__Host-token_broker_consent", true}} {
		t.Run(tc.scheme, func(t *testing.T) { testCallbackBoundToBrowser(t, tc.scheme, tc.cookie, tc.secure) })
	}
}

func testCallbackBoundToBrowser(t *testing.T, scheme, cookie string, secure bool) {
	s := startConsentSiteOn(t, "", scheme)
	_, link := consentLink(t, s.base, "acme", "https://app.partner.example/app/consent/done")
	attacker, victim := newBrowser(), newBrowser()
	callback := approveAtBank(t, attacker, link["url"])

	site, _ := url.Parse(s.site)
	cookies := attacker.Jar.Cookies(site)
	if len(cookies) != 1 || cookies[0].Name != cookie {
		t.Fatalf("cookies after start: %v, want %s", cookies, cookie)
	}
	resp := startConsent(t, newBrowser(), mustConsentLink(t, s, "globex"))
	setCookie := resp.Header.Get("Set-Cookie")
	for _, attr := range []string{cookie + "=", "Path=/", "HttpOnly", "SameSite=Lax", "Max-Age=900"} {
		if !strings.Contains(setCookie, attr) {
			t.Errorf("Set-Cookie %q lacks %s", setCookie, attr)
		}
	}
	if strings.Contains(setCookie, "Secure") != secure || strings.Contains(setCookie, "Domain") {
		t.Errorf("Set-Cookie %q: want Secure %v and no Domain", setCookie, secure)
	}

	resp, body := browse(t, victim, http.MethodGet, callback, nil)
	if resp.StatusCode != http.StatusForbidden || !strings.Contains(body, "started in another browser") || resp.Header.Get("Location") != "" {
		t.Fatalf("victim's callback: %d %s to %q, want 403 and a page", resp.StatusCode, body, resp.Header.Get("Location"))
	}
	if st := consentStates(t, s.admin)["acme"]; st["has_refresh_token"] != false {
		t.Fatalf("the merchant got a refresh token from the victim's consent: %v", st)
	}
	if status, _ := get(t, s.base+"/accounts", "X-Merchant-Id", "acme"); status != http.StatusBadGateway {
		t.Errorf("proxied call after the refused callback: %d, want 502 consent_required", status)
	}
	resp, _ = browse(t, attacker, http.MethodGet, callback, nil)
	if final, _ := url.Parse(resp.Header.Get("Location")); resp.StatusCode != http.StatusSeeOther || final.Query().Get("outcome") != "ok" {
		t.Fatalf("the starting browser's callback: %d to %s", resp.StatusCode, final)
	}
}

func mustConsentLink(t *testing.T, s *consentSite, merchant string) string {
	t.Helper()
	status, link := consentLink(t, s.base, merchant, "")
	if status != http.StatusOK {
		t.Fatalf("link for %s: %d %v", merchant, status, link)
	}
	return link["url"]
}

// TestConsentReturnURLHostile: return URLs that a browser or the app's
// server resolves outside the allowed path are refused with 400.
func TestConsentReturnURLHostile(t *testing.T) {
	s := startConsentSite(t, "max_pending_links = 100\n  merchant_links_per_minute = 100")
	const p = "https://app.partner.example/app/consent/"
	rows := []struct {
		name, u string
		ok      bool
	}{
		{"allowed", p + "done?x=1", true},
		{"backslash", p + `..\x`, false},
		{"path parameter", p + "..;/x", false},
		{"encoded dot dot", p + "%2e%2E/x", false},
		{"encoded backslash", p + "..%5Cx", false},
		{"encoded slash", p + "..%2fx", false},
		{"tab in the dots", p + ".\t./x", false},
		{"newline in the dots", p + ".\n./x", false},
		{"2 KiB and more", p + strings.Repeat("a", 2048), false},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			status, body := consentLink(t, s.base, "acme", tc.u)
			if tc.ok != (status == http.StatusOK) || !tc.ok && (status != http.StatusBadRequest || body["error"] != "return_url_not_allowed") {
				t.Errorf("%d %v, want allowed %v", status, body, tc.ok)
			}
		})
	}
}

// TestConsentLinkLimits: a merchant's pending links and a provider's link
// rate are bounded; a refusal is 429 with Retry-After in the header and
// the JSON.
func TestConsentLinkLimits(t *testing.T) {
	s := startConsentSite(t, "max_pending_links = 2\n  links_per_minute = 3")
	for i := range 2 {
		if status, body := consentLink(t, s.base, "acme", ""); status != http.StatusOK {
			t.Fatalf("link %d: %d %v", i, status, body)
		}
	}
	for _, tc := range []struct{ merchant, code string }{
		{"acme", "too_many_pending_links"}, {"globex", ""}, {"globex", "rate_limited"}, {"initech", ""}, // another provider, other limits
	} {
		body, _ := json.Marshal(map[string]string{"merchant": tc.merchant})
		resp, err := http.Post(s.base+"/consent/links", "application/json", strings.NewReader(string(body)))
		if err != nil {
			t.Fatal(err)
		}
		var out struct {
			Error      string `json:"error"`
			RetryAfter int    `json:"retry_after"`
		}
		_ = json.NewDecoder(resp.Body).Decode(&out)
		resp.Body.Close()
		if tc.code == "" {
			if resp.StatusCode != http.StatusOK {
				t.Errorf("%s: %d %+v", tc.merchant, resp.StatusCode, out)
			}
			continue
		}
		ra, err := strconv.Atoi(resp.Header.Get("Retry-After"))
		if resp.StatusCode != http.StatusTooManyRequests || out.Error != tc.code || err != nil || ra < 1 || out.RetryAfter != ra {
			t.Errorf("%s: %d %+v Retry-After %q, want 429 %s", tc.merchant, resp.StatusCode, out, resp.Header.Get("Retry-After"), tc.code)
		}
	}
	// The admin API's links are the same links, under the same limits.
	resp, err := http.Post(s.admin+"/token_broker/consent/links", "application/json", strings.NewReader(`{"merchant": "acme"}`))
	if err != nil {
		t.Fatal(err)
	}
	b, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); resp.StatusCode != http.StatusTooManyRequests || err != nil || ra < 1 || !strings.Contains(string(b), "max_pending_links") {
		t.Errorf("admin link: %d %s Retry-After %q, want 429", resp.StatusCode, b, resp.Header.Get("Retry-After"))
	}
}

// TestConsentLinkFlood: 5 000 link requests with 2 KiB return URLs leave
// the live heap of the process that serves them within a bound that a
// request keeping 840 bytes (less than half its return URL) would exceed,
// and the storage with no more links than the limits let through.
func TestConsentLinkFlood(t *testing.T) {
	const requests, workers = 5_000, 8
	const bound = requests * 840
	s := startConsentSite(t, "")
	ret := "https://app.partner.example/app/consent/" + strings.Repeat("r", 2000)
	body, _ := json.Marshal(map[string]string{"merchant": "acme", "return_url": ret})
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: workers}, Timeout: 30 * time.Second}
	defer client.CloseIdleConnections()
	base := heapAfterGC()
	var next, ok, limited atomic.Int64
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for next.Add(1) <= requests {
				merchant := []string{"acme", "globex", "initech"}[next.Load()%3]
				b := strings.Replace(string(body), `"acme"`, strconv.Quote(merchant), 1)
				resp, err := client.Post(s.base+"/consent/links", "application/json", strings.NewReader(b))
				if err != nil {
					t.Error(err)
					return
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				switch resp.StatusCode {
				case http.StatusOK:
					ok.Add(1)
				case http.StatusTooManyRequests:
					limited.Add(1)
				default:
					t.Errorf("status %d", resp.StatusCode)
					return
				}
			}
		})
	}
	wg.Wait()
	client.CloseIdleConnections()
	grown := int64(heapAfterGC()) - int64(base)
	t.Logf("%d links, %d refused with 429; heap %+d bytes", ok.Load(), limited.Load(), grown)
	if grown > bound {
		t.Errorf("the heap grew by %d bytes after %d link requests, bound %d", grown, requests, bound)
	}
	stored, _ := os.ReadDir(filepath.Join(s.storage, "token_broker", "consents", "link"))
	if max := 3 * 5; len(stored) > max || int64(len(stored)) != ok.Load() {
		t.Errorf("%d links stored (%d handed out), want at most %d", len(stored), ok.Load(), max)
	}
}

func heapAfterGC() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestConsentLinksSurviveRestart: a link made before a restart opens
// after it, and a state started before a second restart completes after
// it: the consents in progress are in the storage, not in the process.
func TestConsentLinksSurviveRestart(t *testing.T) {
	s := startConsentSite(t, "")
	link := mustConsentLink(t, s, "acme")
	s.restart(t)
	browser := newBrowser()
	callback := approveAtBank(t, browser, link)
	s.restart(t)
	resp, _ := browse(t, browser, http.MethodGet, callback, nil)
	if status, body, ok := resultPage(t, browser, callback, resp.Header.Get("Location")); !ok || status != http.StatusOK || !strings.Contains(body, "consent is recorded") {
		t.Fatalf("callback after restart: %d to %q, result page %d %s", resp.StatusCode, resp.Header.Get("Location"), status, body)
	}
	if e := getEcho(t, s.base+"/accounts", "X-Merchant-Id", "acme"); !e.Authorization.Valid {
		t.Fatalf("proxied call: %+v", e.Authorization)
	}
}

// restart stops Caddy and starts it again on the same configuration and
// storage: nothing of the process's state survives.
func (s *consentSite) restart(t *testing.T) {
	t.Helper()
	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	loadCaddy(t, s.caddyfile)
	waitListening(t, strings.TrimPrefix(s.site, "http://"))
}

// TestConsentSweep: an instance with a consent provider deletes the
// expired links and states from the storage (at start, then every
// minute), and leaves the others and what is not a consent.
func TestConsentSweep(t *testing.T) {
	s := startConsentSite(t, "")
	dir := filepath.Join(s.storage, "token_broker", "consents")
	write := func(name string, expires time.Time) string {
		p := filepath.Join(dir, name)
		if err := os.MkdirAll(filepath.Dir(p), 0o700); err != nil {
			t.Fatal(err)
		}
		v := binary.BigEndian.AppendUint64(nil, uint64(expires.Unix()))
		if err := os.WriteFile(p, append(v, "sealed"...), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	hexName := func(c string) string { return strings.Repeat(c, 64) }
	expiredLink := write("link/"+hexName("a"), time.Now().Add(-time.Second))
	expiredState := write("state/"+hexName("b"), time.Now().Add(-time.Hour))
	pending := write("link/"+hexName("c"), time.Now().Add(time.Hour))
	other := write("link/not-a-consent", time.Now().Add(-time.Hour))
	s.restart(t)
	for wait, deadline := 10*time.Millisecond, time.Now().Add(30*time.Second); ; wait = min(2*wait, time.Second) {
		_, e1 := os.Stat(expiredLink)
		_, e2 := os.Stat(expiredState)
		if os.IsNotExist(e1) && os.IsNotExist(e2) {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("expired consents still stored: %v %v", e1, e2)
		}
		time.Sleep(wait)
	}
	for _, p := range []string{pending, other} {
		if _, err := os.Stat(p); err != nil {
			t.Errorf("%s: %v", filepath.Base(p), err)
		}
	}
}
