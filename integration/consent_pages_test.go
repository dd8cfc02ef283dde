package integration

import (
	"context"
	"encoding/base64"
	"encoding/binary"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/chromedp/cdproto/cdp"
	cdplog "github.com/chromedp/cdproto/log"
	"github.com/chromedp/cdproto/network"
	"github.com/chromedp/cdproto/runtime"
	"github.com/chromedp/chromedp"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// The consent pages in a real browser: Debian's chromium, headless, driven
// with chromedp, against a real Caddy and the sandbox bank.

// pagesLogo is the partner logo of the test: an SVG as a data: URI.
var pagesLogo = "data:image/svg+xml;base64," + base64.StdEncoding.EncodeToString([]byte(
	`<svg xmlns="http://www.w3.org/2000/svg" width="32" height="32" viewBox="0 0 32 32"><rect width="32" height="32" rx="8" fill="#0b6e4f"/>`+
		`<path d="M9 23 16 8l7 15h-4l-3-7-3 7z" fill="#fff"/></svg>`))

// pagesSite is a consent site with branded pages.
type pagesSite struct {
	sb      *sandbox.Server
	sbURL   string
	base    string // the sidecar
	site    string // the consent site
	storage string
	toml    string // the registry file
	// login is the https login page on another origin that the
	// authorization endpoint of provider "hop" (http) redirects to.
	login string
}

// startPagesSite starts the sandbox bank and Caddy: the sidecar with the
// links endpoint, and the consent site whose every path goes to the
// consent handler of "bank" (display names set, branded), but
// /consent/down/ that goes to a provider whose issuer does not answer,
// and /consent/hop/ that goes to a provider whose authorization endpoint
// (http) redirects to a login page on another origin (https).
func startPagesSite(t *testing.T) *pagesSite {
	t.Helper()
	cbPort := freePort(t)
	site := "http://127.0.0.1:" + strconv.Itoa(cbPort)
	sb, sbURL := startSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: "bank-client", Secret: "pages-secret-1",
			Scopes: []string{"accounts"}, RedirectURIs: []string{site + "/consent/callback"}})
	})
	t.Setenv("CONSENT_SECRET", "pages-secret-1")
	login := httptest.NewTLSServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, `<!doctype html><title>Bank login</title><h1 id="bank-login">Bank login</h1>`)
	}))
	t.Cleanup(login.Close)
	hop := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		http.Redirect(w, r, login.URL+"/login", http.StatusFound)
	}))
	t.Cleanup(hop.Close)
	dir := t.TempDir()
	reg := fmt.Sprintf(`[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = %[1]q
client_id = "bank-client"
client_secret = "{env.CONSENT_SECRET}"
  [providers.bank.consent]
  display_name = "Example Bank"
  redirect_uris = ["%[2]s/consent/callback"]
  scopes = ["openid", "offline_access", "accounts"]
  merchant_links_per_minute = 1000
  links_per_minute = 1000
  max_pending_links = 1000

[providers.down]
type = "oauth2"
grant = "refresh_token"
issuer = "http://127.0.0.1:%[3]d"
client_id = "down-client"
client_secret = "{env.CONSENT_SECRET}"
  [providers.down.consent]
  redirect_uris = ["%[2]s/consent/down/callback"]

[providers.hop]
type = "oauth2"
grant = "refresh_token"
token_url = "%[4]s/token"
client_id = "hop-client"
client_secret = "{env.CONSENT_SECRET}"
  [providers.hop.consent]
  authorization_url = "%[4]s/authorize"
  redirect_uris = ["%[2]s/consent/hop/callback"]
  scopes = ["offline_access", "accounts"]

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
display_name = "Acme Ltd"

[merchants.globex]
provider = "bank"
scopes = ["accounts"]

[merchants.initech]
provider = "down"
scopes = ["accounts"]

[merchants.hooli]
provider = "hop"
scopes = ["accounts"]
`, sbURL, site, freePort(t), hop.URL)
	regPath := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(regPath, []byte(reg), 0o600); err != nil {
		t.Fatal(err)
	}
	storage := filepath.Join(dir, "storage")
	cf := fmt.Sprintf(`{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
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
	handle /consent/hop/* {
		token_broker_consent hop
	}
	handle /consent/down/* {
		token_broker_consent down {
			partner "Acme Payments"
			logo %[5]s
			accent "#0b6e4f"
		}
	}
	handle {
		token_broker_consent bank {
			partner "Acme Payments"
			logo %[5]s
			accent "#0b6e4f"
		}
	}
}
`, storage, regPath, sbURL, site, pagesLogo)
	base := startCaddy(t, cf)
	waitListening(t, "127.0.0.1:"+strconv.Itoa(cbPort))
	return &pagesSite{sb: sb, sbURL: sbURL, base: base, site: site, storage: storage, toml: regPath, login: login.URL}
}

// link asks the sidecar for a consent link for merchant.
func (s *pagesSite) link(t *testing.T, merchant string) string {
	t.Helper()
	status, link := consentLink(t, s.base, merchant, "")
	if status != http.StatusOK {
		t.Fatalf("consent link for %s: %d %v", merchant, status, link)
	}
	return link["url"]
}

// expiredLink stores, in the site's storage, a consent link for merchant
// made an hour ago, so expired, as the site makes them (a flow of the
// registry's source on the site's callback URL, with a clock an hour
// behind); its stored expiry header is in the future, so that the sweeper
// leaves it.
func (s *pagesSite) expiredLink(t *testing.T, merchant string) string {
	t.Helper()
	reg, err := config.LoadWith(s.toml, config.Options{LookupEnv: os.LookupEnv,
		RefreshStore: &oauth.MemoryStore{}, ConsentStore: &oauth.MemoryPendingStore{}})
	if err != nil {
		t.Fatal(err)
	}
	p := reg.Providers["bank"]
	store := filePendingStore{root: filepath.Join(s.storage, "token_broker", "consents")}
	flow, err := oauth.NewAuthCode(p.Source.(*oauth.RefreshToken), oauth.AuthCodeConfig{RedirectURIs: []string{s.site + "/consent/callback"}},
		&oauth.Pendings{Store: store, Now: func() time.Time { return time.Now().Add(-time.Hour) }})
	if err != nil {
		t.Fatal(err)
	}
	link, err := flow.NewLink(context.Background(), merchant, "", "")
	if err != nil {
		t.Fatal(err)
	}
	return link.URL
}

// filePendingStore writes consent records as Caddy's file_system storage
// holds them (module/storage.go: an 8-byte expiry, then the record).
type filePendingStore struct{ root string }

func (f filePendingStore) Put(_ context.Context, key string, val []byte, _ time.Time) error {
	path := filepath.Join(f.root, filepath.FromSlash(key))
	if err := os.MkdirAll(filepath.Dir(path), 0o700); err != nil {
		return err
	}
	b := binary.BigEndian.AppendUint64(nil, uint64(time.Now().Add(time.Hour).Unix()))
	return os.WriteFile(path, append(b, val...), 0o600)
}

func (filePendingStore) Get(context.Context, string) ([]byte, error) {
	return nil, oauth.ErrUnknownPending
}
func (filePendingStore) Take(context.Context, string) ([]byte, error) {
	return nil, oauth.ErrUnknownPending
}

// pageRecorder collects what a tab does: the requests, the documents'
// statuses, and the errors of its console and log.
type pageRecorder struct {
	mu       sync.Mutex
	requests []string
	statuses []int64
	errors   []string
}

func (r *pageRecorder) reset() {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.requests, r.statuses, r.errors = nil, nil, nil
}

func (r *pageRecorder) listen(ev any) {
	r.mu.Lock()
	defer r.mu.Unlock()
	switch ev := ev.(type) {
	case *network.EventRequestWillBeSent:
		// The browser's own favicon fetch (of the previous page too, which
		// can come after a reset) is not something the page loads.
		if ev.Type == network.ResourceTypeOther && strings.HasSuffix(ev.Request.URL, "/favicon.ico") {
			return
		}
		r.requests = append(r.requests, ev.Request.URL)
	case *network.EventResponseReceived:
		if ev.Type == network.ResourceTypeDocument {
			r.statuses = append(r.statuses, ev.Response.Status)
		}
	case *runtime.EventConsoleAPICalled:
		if ev.Type == runtime.ConsoleAPICalledTypeError || ev.Type == runtime.ConsoleAPICalledTypeAssert {
			r.errors = append(r.errors, fmt.Sprintf("console.%s", ev.Type))
		}
	case *runtime.EventExceptionThrown:
		r.errors = append(r.errors, "exception: "+ev.ExceptionDetails.Text)
	case *cdplog.EventEntryAdded:
		// A page answered with an error status is logged as a failed
		// load of that document: the status is checked instead.
		if ev.Entry.Level == cdplog.EntryLevelError && !(ev.Entry.Source == cdplog.EntrySourceNetwork && strings.Contains(ev.Entry.Text, "the server responded with a status")) {
			r.errors = append(r.errors, fmt.Sprintf("%s: %s %s", ev.Entry.Source, ev.Entry.Text, ev.Entry.URL))
		}
	}
}

// pageFacts are what the test reads from a rendered page.
type pageFacts struct {
	Lang      string `json:"lang"`
	Viewport  string `json:"viewport"`
	H1        string `json:"h1"`
	Text      string `json:"text"`
	Landmarks bool   `json:"landmarks"`
	Overflow  bool   `json:"overflow"`
	Styled    string `json:"styled"`
	Logo      bool   `json:"logo"`
}

const pageFactsJS = `(() => {
	const q = s => document.querySelector(s);
	const card = q('.card');
	const logo = q('header img');
	return {
		lang: document.documentElement.lang,
		viewport: (q('meta[name=viewport]') || {}).content || '',
		h1: ((q('main h1') || {}).textContent || '').trim(),
		text: document.body.innerText,
		landmarks: !!(q('header') && q('main') && q('footer')),
		overflow: document.documentElement.scrollWidth > window.innerWidth,
		styled: card ? getComputedStyle(card).borderTopLeftRadius : '',
		logo: !!(logo && logo.complete && logo.naturalWidth > 0),
	};
})()`

// pageCheck is one page to see: how to get there, and what it says.
type pageCheck struct {
	name   string
	status int64
	reach  func(t *testing.T, ctx context.Context, rec *pageRecorder) // leaves the tab on the page, rec reset before the page's own load
	texts  []string
}

// TestConsentPagesInBrowser drives every consent page in headless
// Chromium at a phone's and a desktop's width: the page says what happened
// and what to do (in the partner's brand, with the merchant's and the
// bank's names), has a viewport, landmarks, its style (allowed by the
// CSP nonce) and logo, fits the width, loads nothing from another origin
// and logs no error. A success and a denial are reloaded and still say
// so. Screenshots go to a folder of the test, or to
// $CONSENT_SCREENSHOTS when set.
func TestConsentPagesInBrowser(t *testing.T) {
	chromium, err := exec.LookPath("chromium")
	if err != nil {
		t.Fatal("chromium is not installed: run make tools (apt-get install -y chromium)")
	}
	shots := os.Getenv("CONSENT_SCREENSHOTS")
	if shots == "" {
		shots = filepath.Join(t.TempDir(), "screenshots")
	}
	if err := os.MkdirAll(shots, 0o755); err != nil {
		t.Fatal(err)
	}
	s := startPagesSite(t)

	allocCtx, cancelAlloc := chromedp.NewExecAllocator(context.Background(),
		chromedp.ExecPath(chromium), chromedp.Headless, chromedp.NoSandbox, chromedp.DisableGPU, chromedp.NoFirstRun,
		chromedp.Flag("disable-quic", true), chromedp.Flag("disable-background-networking", true),
		chromedp.Flag("disable-component-update", true), chromedp.Flag("disable-sync", true),
		chromedp.Flag("lang", "en-US"), chromedp.UserDataDir(t.TempDir()),
		chromedp.Flag("ignore-certificate-errors", true)) // the test's https login page

	defer cancelAlloc()
	browserCtx, cancelBrowser := chromedp.NewContext(allocCtx)
	defer cancelBrowser()
	if err := chromedp.Do(browserCtx); err != nil { // starts the browser
		t.Fatalf("starting %s: %v", chromium, err)
	}

	// A bank whose authorization endpoint redirects to a login page on
	// another (https) origin: the start page's CSP (form-action, checked
	// on every redirect after the post) lets the browser get there.
	t.Run("bank redirects to another origin", func(t *testing.T) {
		ctx, cancel := chromedp.NewContext(browserCtx, chromedp.WithNewBrowserContext())
		defer cancel()
		ctx, cancelSteps := context.WithTimeout(ctx, 30*time.Second)
		defer cancelSteps()
		var loc string
		if err := chromedp.Do(ctx, chromedp.Navigate(s.link(t, "hooli")), chromedp.WaitVisible(chromedp.CSS("form[action=start] button")),
			chromedp.Click(chromedp.CSS("form[action=start] button")), chromedp.WaitVisible(chromedp.CSS("#bank-login")),
			chromedp.Func(func(ctx context.Context, tg *chromedp.Target) (err error) {
				loc, err = chromedp.Location()(ctx, tg)
				return err
			})); err != nil {
			t.Fatalf("pressing the start button did not reach the bank's login page on another origin: %v", err)
		}
		if !strings.HasPrefix(loc, s.login+"/login") {
			t.Fatalf("the start led to %s, want the login page %s/login", loc, s.login)
		}
	})

	// toBank opens link, presses its start page's button and stops on the
	// bank's approve page, whose URL it returns.
	toBank := func(t *testing.T, ctx context.Context, link string) string {
		t.Helper()
		var loc string
		if err := chromedp.Do(ctx, chromedp.Navigate(link), chromedp.WaitVisible(chromedp.CSS("form[action=start] button")),
			chromedp.Click(chromedp.CSS("form[action=start] button")), chromedp.WaitVisible(chromedp.CSS("button[value=approve]")),
			chromedp.Func(func(ctx context.Context, tg *chromedp.Target) (err error) {
				loc, err = chromedp.Location()(ctx, tg)
				return err
			})); err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(loc)
		if !strings.HasPrefix(loc, s.sbURL) || u.Query().Get("state") == "" {
			t.Fatalf("the link led to %s, not the bank's approve page", loc)
		}
		return loc
	}
	// bankPage opens a fresh link and stops on the bank's approve page.
	bankPage := func(t *testing.T, ctx context.Context, merchant string) url.Values {
		t.Helper()
		u, _ := url.Parse(toBank(t, ctx, s.link(t, merchant)))
		return u.Query()
	}
	// approve approves on the bank's page and waits for the outcome page.
	approve := func(t *testing.T, ctx context.Context) {
		t.Helper()
		if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("button[value=approve]")), chromedp.WaitVisible(chromedp.CSS("main h1"))); err != nil {
			t.Fatal(err)
		}
	}
	// decide answers at the bank and reloads the outcome page: the page
	// checked is the reload.
	decide := func(merchant, button string) func(*testing.T, context.Context, *pageRecorder) {
		return func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			bankPage(t, ctx, merchant)
			if err := chromedp.Do(ctx, chromedp.Click(chromedp.CSS("button[value="+button+"]")), chromedp.WaitVisible(chromedp.CSS("main h1"))); err != nil {
				t.Fatal(err)
			}
			rec.reset()
			if err := chromedp.Do(ctx, chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("main h1"))); err != nil {
				t.Fatal(err)
			}
		}
	}
	// callback answers the callback as the bank would, with params, for
	// a state started in this browser.
	callback := func(merchant string, params url.Values, dropCookies bool) func(*testing.T, context.Context, *pageRecorder) {
		return func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			q := bankPage(t, ctx, merchant)
			params.Set("state", q.Get("state"))
			params.Set("iss", s.sbURL)
			if dropCookies {
				if err := chromedp.Do(ctx, chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
					_, err := cdp.Call(ctx, tg, network.ClearBrowserCookies, cdp.Empty{})
					return err
				})); err != nil {
					t.Fatal(err)
				}
			}
			rec.reset()
			visit(t, ctx, s.site+"/consent/callback?"+params.Encode())
		}
	}
	open := func(path string) func(*testing.T, context.Context, *pageRecorder) {
		return func(t *testing.T, ctx context.Context, rec *pageRecorder) { rec.reset(); visit(t, ctx, s.site+path) }
	}
	var usedLink string
	checks := []pageCheck{
		{"start", 200, func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			rec.reset()
			visit(t, ctx, s.link(t, "acme"))
		}, []string{"Give your consent", "Consent for Acme Ltd at Example Bank", "Acme Payments asks for your consent", "Continue to Example Bank"}},
		{"success", 200, decide("acme", "approve"), []string{"Consent given", "Consent for Acme Ltd at Example Bank", "your consent is recorded", "available to Acme Payments", "close this window"}},
		{"used", 400, func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			usedLink = s.link(t, "globex")
			toBank(t, ctx, usedLink)
			approve(t, ctx) // the consent uses the link up
			rec.reset()
			visit(t, ctx, usedLink)
		}, []string{"This consent link was already used", "ask Acme Payments for a new consent link", "Reference: unknown_state"}},
		{"used_second_tab", 400, func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			link := s.link(t, "acme")
			first := toBank(t, ctx, link) // the first tab, left on the bank's page
			toBank(t, ctx, link)          // the second tab consents first
			approve(t, ctx)
			if err := chromedp.Do(ctx, chromedp.Navigate(first), chromedp.WaitVisible(chromedp.CSS("button[value=approve]"))); err != nil {
				t.Fatal(err)
			}
			approve(t, ctx) // then the first tab: the page checked is its reload
			rec.reset()
			if err := chromedp.Do(ctx, chromedp.Reload(), chromedp.WaitVisible(chromedp.CSS("main h1"))); err != nil {
				t.Fatal(err)
			}
		}, []string{"This consent link was already used", "Consent for Acme Ltd at Example Bank", "If you did not finish your consent", "Reference: unknown_state"}},
		{"denied", 200, decide("globex", "deny"), []string{"Consent not given", "Consent for globex at Example Bank", "not given at Example Bank", "open the consent link again soon, or ask Acme Payments for a new one"}},
		{"expired", 400, func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			link := s.expiredLink(t, "acme")
			rec.reset()
			visit(t, ctx, link)
		}, []string{"This consent link has expired", "Consent for Acme Ltd at Example Bank", "Acme Payments for a new consent link", "Reference: expired"}},
		{"missing", 400, open("/consent/start"), []string{"The consent link is incomplete", "Open the whole link"}},
		{"invalid", 400, open("/consent/start?link=abc%20def"), []string{"This consent link is damaged", "Open the whole link"}},
		{"provider_error", 502, callback("acme", url.Values{"error": {"invalid_request"}, "error_description": {"secret detail 42"}}, false),
			[]string{"The bank could not process this consent request", "not a decision of yours", "Reference: provider_error:invalid_request"}},
		{"failed", 502, callback("acme", url.Values{"code": {"not-a-code"}}, false), []string{"The consent could not be completed", "Reference: exchange_failed"}},
		{"unavailable", 503, func(t *testing.T, ctx context.Context, rec *pageRecorder) {
			link := s.link(t, "initech")
			rec.reset()
			visit(t, ctx, link) // the start page needs the bank's authorization endpoint
		}, []string{"The consent service is unavailable", "try again in a few minutes", "Reference: provider_unavailable"}},
		{"wrong_browser", 403, callback("acme", url.Values{"code": {"any"}}, true), []string{"Please use the browser you started in", "started in another browser", "Reference: wrong_browser"}},
		{"not_found", 404, open("/"), []string{"Page not found", "open the consent link you were given"}},
		{"gone", 410, open("/consent/done?result=AAAA"), []string{"This page is no longer available", "ask Acme Payments for a new consent link"}},
	}

	for _, width := range []struct {
		name          string
		width, height int64
		mobile        bool
	}{{"phone", 390, 844, true}, {"desktop", 1280, 800, false}} {
		t.Run(width.name, func(t *testing.T) {
			for _, pc := range checks {
				t.Run(pc.name, func(t *testing.T) {
					// A browser context of its own: no cookie of another page.
					ctx, cancel := chromedp.NewContext(browserCtx, chromedp.WithNewBrowserContext())
					defer cancel()
					rec := &pageRecorder{}
					opts := []chromedp.EmulateViewportOption{}
					if width.mobile {
						opts = append(opts, chromedp.EmulateMobile)
					}
					if err := chromedp.Do(ctx, chromedp.EmulateViewport(width.width, width.height, opts...)); err != nil {
						t.Fatal(err)
					}
					// A bound for the page's steps (the tab is open: the timeout
					// ends the steps, not the browser), generous for a loaded machine.
					ctx, cancelSteps := context.WithTimeout(ctx, 2*time.Minute)
					defer cancelSteps()
					if err := chromedp.Listen(ctx, rec.listen); err != nil {
						t.Fatal(err)
					}
					pc.reach(t, ctx, rec)
					facts, err := chromedp.Run(ctx, chromedp.Evaluate[pageFacts](pageFactsJS))
					if err != nil {
						t.Fatal(err)
					}
					png, err := chromedp.Run(ctx, chromedp.FullScreenshot(100))
					if err != nil {
						t.Fatal(err)
					}
					if err := os.WriteFile(filepath.Join(shots, pc.name+"-"+width.name+".png"), png, 0o644); err != nil {
						t.Fatal(err)
					}
					checkPage(t, s.site, pc, facts, rec)
				})
			}
		})
	}

	t.Run("german", func(t *testing.T) {
		ctx, cancel := chromedp.NewContext(browserCtx, chromedp.WithNewBrowserContext())
		defer cancel()
		if err := chromedp.Do(ctx, chromedp.Func(func(ctx context.Context, tg *chromedp.Target) error {
			_, err := cdp.Call(ctx, tg, network.SetExtraHTTPHeaders, network.SetExtraHTTPHeadersParams{Headers: network.Headers{"Accept-Language": "de-DE,de;q=0.9,en;q=0.5"}})
			return err
		})); err != nil {
			t.Fatal(err)
		}
		visit(t, ctx, s.site+"/consent/start")
		facts, err := chromedp.Run(ctx, chromedp.Evaluate[pageFacts](pageFactsJS))
		if err != nil {
			t.Fatal(err)
		}
		if facts.Lang != "de" || facts.H1 != "Der Einwilligungslink ist unvollständig" {
			t.Errorf("Accept-Language de: lang %q, heading %q", facts.Lang, facts.H1)
		}
	})
}

// visit navigates and waits for a page's heading.
func visit(t *testing.T, ctx context.Context, u string) {
	t.Helper()
	if err := chromedp.Do(ctx, chromedp.Navigate(u), chromedp.WaitVisible(chromedp.CSS("h1, button"))); err != nil {
		t.Fatalf("%s: %v", u, err)
	}
}

// checkPage checks a page's facts and what the tab did to show it.
func checkPage(t *testing.T, site string, pc pageCheck, f pageFacts, rec *pageRecorder) {
	t.Helper()
	for _, want := range pc.texts {
		if !strings.Contains(f.Text, want) {
			t.Errorf("the page lacks %q:\n%s", want, f.Text)
		}
	}
	if f.Lang != "en" || f.Viewport != "width=device-width, initial-scale=1" || !f.Landmarks || f.H1 == "" {
		t.Errorf("lang %q, viewport %q, landmarks %v, heading %q", f.Lang, f.Viewport, f.Landmarks, f.H1)
	}
	if f.Overflow {
		t.Error("the page is wider than the window")
	}
	if f.Styled == "" || f.Styled == "0px" {
		t.Errorf("the stylesheet did not apply (card radius %q): blocked by the CSP?", f.Styled)
	}
	if !strings.Contains(f.Text, "Acme Payments") || !f.Logo {
		t.Errorf("partner name shown: %v, logo loaded: %v", strings.Contains(f.Text, "Acme Payments"), f.Logo)
	}
	if strings.Contains(f.Text, "Reference:") && !strings.Contains(strings.Join(pc.texts, "\n"), "Reference:") {
		t.Error("the page shows a reference code, which only the failed consents have")
	}
	if strings.Contains(f.Text, "secret detail") {
		t.Error("the page shows the provider's error description")
	}
	rec.mu.Lock()
	defer rec.mu.Unlock()
	if len(rec.statuses) == 0 || rec.statuses[len(rec.statuses)-1] != pc.status {
		t.Errorf("document statuses %v, want the page's %d last", rec.statuses, pc.status)
	}
	for _, u := range rec.requests {
		if !strings.HasPrefix(u, site+"/") && !strings.HasPrefix(u, "data:") {
			t.Errorf("a request left for another origin: %s", u)
		}
	}
	for _, e := range rec.errors {
		t.Errorf("browser error: %s", e)
	}
}

// TestConsentTemplatesReplacePages: an operator's templates replace the
// pages through Caddy; a template that does not parse, or names a field
// that Data does not have, stops the config from loading, with the file
// and line.
func TestConsentTemplatesReplacePages(t *testing.T) {
	s := startPagesSite(t) // provider "bank" with its consent table
	good := t.TempDir()
	for name, body := range map[string]string{
		"page.html":      `<!doctype html><html lang="{{.Lang}}"><title>{{.Text.Title}}</title><main><h1>Custom {{.Page}}</h1><p>{{.Merchant}} {{.Code}}</p></main></html>`,
		"not_found.html": `<!doctype html><html lang="{{.Lang}}"><title>x</title><main><h1>Nothing at this address ({{.Status}})</h1></main></html>`,
		"start.html":     `<!doctype html><html lang="{{.Lang}}"><title>x</title><main><h1>Custom start</h1><form method="post" action="start"><input type="hidden" name="link" value="{{.Link}}"><button>{{.Text.Action}}</button></form></main></html>`,
	} {
		if err := os.WriteFile(filepath.Join(good, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cf := func(dir string) string {
		return fmt.Sprintf(`{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	storage file_system %s
	token_broker {
		config %s
	}
}

%s {
	token_broker_consent bank {
		templates %s
	}
}
`, s.storage, s.toml, s.site, dir)
	}
	loadCaddy(t, cf(good))
	for _, tc := range []struct {
		path   string
		status int
		want   string
	}{
		{"/", http.StatusNotFound, "<h1>Nothing at this address (404)</h1>"},
		{"/consent/start", http.StatusBadRequest, "<h1>Custom missing</h1>"},
		{"/consent/start?link=" + strings.Repeat("A", 43), http.StatusBadRequest, "<h1>Custom used</h1>"},
		{"/consent/done?result=x", http.StatusGone, "<h1>Custom gone</h1>"},
	} {
		status, body := get(t, s.site+tc.path)
		if status != tc.status || !strings.Contains(string(body), tc.want) {
			t.Errorf("%s: %d %s, want %d with %q", tc.path, status, body, tc.status, tc.want)
		}
	}

	for _, tc := range []struct {
		name, file, body string
		caddyfile        func(dir string) string
		want             []string
	}{
		{"syntax", "page.html", "<p>\n{{if .Page}}\n<p>{{end}\n", cf, []string{"page.html:3", "bad character", "templates /"}},
		{"unknown field", "page.html", "<p>{{.Page}}</p>\n<p>{{.MerchantName}}</p>\n", cf, []string{"page.html:2", "MerchantName", "templates /"}},
		{"branding on the links endpoint", "page.html", "{{.Page}}", func(dir string) string {
			return strings.Replace(cf(dir), "token_broker_consent bank {", "token_broker_consent {\n\t\tlinks", 1)
		}, []string{"links: partner, logo, accent, lang and templates brand the pages of the public consent site"}},
		{"logo from another origin", "page.html", "{{.Page}}", func(dir string) string {
			return strings.Replace(cf(dir), "templates "+dir, "logo https://cdn.example/logo.png", 1)
		}, []string{"logo \"https://cdn.example/logo.png\"", "nothing from other origins"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			if err := os.WriteFile(filepath.Join(dir, tc.file), []byte(tc.body), 0o600); err != nil {
				t.Fatal(err)
			}
			cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(tc.caddyfile(dir)), map[string]any{"filename": "Caddyfile"})
			if err != nil {
				t.Fatal(err)
			}
			err = caddy.Load(cfg, true)
			if err == nil {
				t.Fatal("a config with a broken template loaded")
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

// resultPage follows a callback's redirect to its result page (a
// Location "done?result=…", relative to the callback) with client, and
// returns the page; ok is false when loc is not such a redirect.
func resultPage(t *testing.T, client *http.Client, callback, loc string) (status int, page string, ok bool) {
	t.Helper()
	if !strings.HasPrefix(loc, "done?result=") {
		return 0, "", false
	}
	base, err := url.Parse(callback)
	if err != nil {
		t.Fatal(err)
	}
	ref, _ := url.Parse(loc)
	resp, body := browse(t, client, http.MethodGet, base.ResolveReference(ref).String(), nil)
	return resp.StatusCode, body, true
}
