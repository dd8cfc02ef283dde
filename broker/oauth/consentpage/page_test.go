package consentpage

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"html"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

func TestConfigRefused(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"accent without #", Config{Accent: "1f5fbf"}, "accent"},
		{"accent a name", Config{Accent: "red"}, "accent"},
		{"accent with CSS", Config{Accent: "#fff;}body{"}, "accent"},
		{"logo on another origin", Config{Logo: "https://cdn.example/logo.png"}, "logo"},
		{"logo protocol-relative", Config{Logo: "//cdn.example/logo.png"}, "logo"},
		{"logo relative", Config{Logo: "logo.png"}, "logo"},
		{"logo javascript", Config{Logo: "javascript:alert(1)"}, "logo"},
		{"logo data text", Config{Logo: "data:text/html;base64,PGI+"}, "logo"},
		{"logo data bad base64", Config{Logo: "data:image/png;base64,!!!"}, "logo"},
		{"logo data too big", Config{Logo: "data:image/png;base64," + strings.Repeat("A", MaxLogo)}, "logo"},
		{"partner control", Config{Partner: "Acme\nPay"}, "partner"},
		{"partner too long", Config{Partner: strings.Repeat("x", 101)}, "partner"},
		{"lang unknown", Config{Lang: "xx"}, "lang"},
		{"templates missing", Config{Templates: filepath.Join(t.TempDir(), "none")}, "not a readable directory"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := New(tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("New(%+v) = %v, want an error about %s", tc.cfg, err, tc.want)
			}
		})
	}
	for _, ok := range []Config{
		{Accent: "#ABC"}, {Accent: "#1f5fbf"}, {Logo: "/brand/logo.svg"},
		{Logo: "data:image/svg+xml;base64,PHN2Zy8+"}, {Partner: "Acme Payments"}, {Lang: "de"},
	} {
		if _, err := New(ok); err != nil {
			t.Errorf("New(%+v) = %v", ok, err)
		}
	}
}

func TestLanguageChoice(t *testing.T) {
	for _, tc := range []struct{ fixed, accept, want string }{
		{"", "", "en"},
		{"", "de-DE,de;q=0.9,en;q=0.5", "de"},
		{"", "fr-CH, fr;q=0.9", "fr"},
		{"", "es-ES,it;q=0.8", "en"},
		{"", "en-GB;q=0.4,de-AT;q=0.8", "de"},
		{"", "garbage;;;q=x", "en"},
		{"fr", "de-DE", "fr"},
	} {
		r, err := New(Config{Lang: tc.fixed})
		if err != nil {
			t.Fatal(err)
		}
		w := httptest.NewRecorder()
		r.Render(w, tc.accept, Page{Name: PageSuccess, MerchantID: "acme"})
		if got := w.Header().Get("Content-Language"); got != tc.want || !strings.Contains(w.Body.String(), `<html lang="`+tc.want+`">`) {
			t.Errorf("lang %q, Accept-Language %q: got %q, want %q", tc.fixed, tc.accept, got, tc.want)
		}
	}
}

var styleNonce = regexp.MustCompile(`<style nonce="([^"]+)">`)

func TestRenderBuiltin(t *testing.T) {
	r, err := New(Config{Partner: "Acme Payments", Accent: "#ffcc00", Logo: "data:image/svg+xml;base64,PHN2Zy8+"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range Pages() {
		t.Run(p, func(t *testing.T) {
			w := httptest.NewRecorder()
			r.Render(w, "", Page{Name: p, MerchantID: "acme", Merchant: "Acme Ltd", Bank: "Example Bank", Outcome: "provider_error", ProviderCode: "invalid_request", Link: "LINK-VALUE"})
			body := w.Body.String()
			form := `<form method="post" action="start"><input type="hidden" name="link" value="LINK-VALUE"><button type="submit">Continue to Example Bank</button></form>`
			if strings.Contains(body, form) != (p == PageStart) || strings.Contains(body, "LINK-VALUE") != (p == PageStart) {
				t.Errorf("the page shows the link's form: %v, want it on the start page alone:\n%s", strings.Contains(body, form), body)
			}
			if w.Code != Status(p) || w.Code == 0 {
				t.Errorf("status %d, want %d", w.Code, Status(p))
			}
			m := styleNonce.FindStringSubmatch(body)
			csp := w.Header().Get("Content-Security-Policy")
			if m == nil || csp != CSP(m[1], "") || !strings.Contains(csp, "default-src 'none'") || !strings.Contains(csp, "frame-ancestors 'none'") {
				t.Errorf("CSP %q does not allow exactly the page's style nonce", csp)
			}
			for _, want := range []string{`<meta name="viewport" content="width=device-width, initial-scale=1">`, "<header>", "<main>", "<footer>", "<h1>",
				"Acme Payments", `src="data:image/svg&#43;xml;base64,PHN2Zy8&#43;"`, "--accent:#ffcc00;--on-accent:#000000", languages["en"].pages[p].title} {
				if !strings.Contains(body, want) {
					t.Errorf("page lacks %q:\n%s", want, body)
				}
			}
			if w.Header().Get("X-Content-Type-Options") != "nosniff" || !strings.HasPrefix(w.Header().Get("Content-Type"), "text/html") {
				t.Errorf("headers %v", w.Header())
			}
			if strings.Contains(body, "{partner}") || strings.Contains(body, "{bank}") || strings.Contains(body, "{merchant}") {
				t.Errorf("unfilled name in %s", body)
			}
		})
	}
}

func TestRenderNamesAndCode(t *testing.T) {
	r, _ := New(Config{})
	w := httptest.NewRecorder()
	r.Render(w, "", Page{Name: PageProviderError, MerchantID: "acme", Bank: "Example Bank", Outcome: "provider_error", ProviderCode: "invalid_request"})
	for _, want := range []string{"Consent for acme at Example Bank", "could not be processed at Example Bank", "<code>provider_error:invalid_request</code>", "Please try again later with a new consent link from the service that sent you the link."} {
		if !strings.Contains(w.Body.String(), want) {
			t.Errorf("provider_error page lacks %q", want)
		}
	}
	w = httptest.NewRecorder()
	r.Render(w, "de", Page{Name: PageDenied, MerchantID: "acme", Merchant: "Acme GmbH", Outcome: "denied"})
	for _, want := range []string{"Einwilligung für Acme GmbH bei Ihrer Bank", "nicht erteilt"} {
		if !strings.Contains(w.Body.String(), want) {
			t.Errorf("denied page lacks %q", want)
		}
	}
	if strings.Contains(w.Body.String(), "<code>") {
		t.Error("a denial shows no error code")
	}
	w = httptest.NewRecorder()
	r.Render(w, "", Page{Name: PageMissing, Outcome: oauth.ReasonUnknownState})
	if strings.Contains(w.Body.String(), "<code>") || w.Code != http.StatusBadRequest {
		t.Errorf("a missing link is no consent outcome: %d %s", w.Code, w.Body)
	}
	w = httptest.NewRecorder()
	r.Render(w, "", Page{Name: PageNotFound})
	if w.Code != http.StatusNotFound || strings.Contains(w.Body.String(), "Consent for") {
		t.Errorf("not found: %d %s", w.Code, w.Body)
	}
}

func TestOnAccentContrast(t *testing.T) {
	for _, tc := range []struct{ accent, want string }{
		{"#1f5fbf", "#ffffff"}, {"#000", "#ffffff"}, {"#ffcc00", "#000000"}, {"#fff", "#000000"}, {"#595959", "#ffffff"}, {"#767676", "#000000"},
	} {
		if got := onAccent(tc.accent); got != tc.want {
			t.Errorf("onAccent(%s) = %s, want %s", tc.accent, got, tc.want)
		}
	}
}

func writeTemplates(t *testing.T, files map[string]string) string {
	dir := t.TempDir()
	for name, body := range files {
		if err := os.WriteFile(filepath.Join(dir, name), []byte(body), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func TestTemplatesRefused(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files map[string]string
		want  []string
	}{
		{"syntax error", map[string]string{"page.html": "<p>\n{{if .Page}}\n"}, []string{"page.html:3", "unexpected EOF"}},
		{"unknown field", map[string]string{"page.html": "<p>{{.Page}}</p>\n<p>{{.Merchnat}}</p>"}, []string{"page.html:2", "Merchnat"}},
		{"unknown field in a branch", map[string]string{"page.html": "{{.Page}}", "denied.html": "<p>\n{{if .Code}}{{.Text.Titel}}{{end}}"}, []string{"denied.html:2", "Titel"}},
		{"unknown function", map[string]string{"page.html": "{{upper .Page}}"}, []string{"page.html:1", "upper"}},
		{"misspelt page", map[string]string{"page.html": "x", "sucess.html": "x"}, []string{"sucess.html is not a page"}},
		{"no page.html", map[string]string{"success.html": "x"}, []string{"no page.html", "denied.html"}},
		{"empty", map[string]string{"README": "x"}, []string{"no .html file"}},
		{"start page without the form", map[string]string{"page.html": "{{.Page}}"}, []string{"page start has no form that posts the consent link", `value="{{.Link}}"`, "start.html"}},
		{"start page's form without the link", map[string]string{"page.html": "{{.Page}}", "start.html": `<form method="post" action="start"><button>{{.Text.Action}}</button></form>`},
			[]string{"page start has no form that posts the consent link"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeTemplates(t, tc.files)
			_, err := New(Config{Templates: dir})
			if err == nil {
				t.Fatal("accepted")
			}
			for _, w := range append(tc.want, dir) {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
		})
	}
}

func TestTemplatesReplaceEveryPage(t *testing.T) {
	dir := writeTemplates(t, map[string]string{
		"_layout.html": `{{define "head"}}<!doctype html><html lang="{{.Lang}}"><title>{{.Text.Title}}</title><style nonce="{{.Nonce}}">{{.CSS}}</style>{{end}}`,
		"page.html":    `{{template "head" .}}<main>custom {{.Page}} {{.Status}} {{.MerchantID}} {{.Merchant}} {{.Bank}} {{.Outcome}} {{.Code}} {{.Partner}} {{.Logo}} {{.Accent}} {{.Tone}}</main>`,
		"success.html": `{{template "head" .}}<main>custom success for {{.Merchant}}</main>`,
		"start.html":   `{{template "head" .}}<main>custom start <form method="post" action="start"><input type="hidden" name="link" value="{{.Link}}"><button>{{.Text.Action}}</button></form></main>`,
	})
	r, err := New(Config{Templates: dir, Partner: "P"})
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range Pages() {
		w := httptest.NewRecorder()
		r.Render(w, "fr", Page{Name: p, MerchantID: "acme", Merchant: "Acme", Outcome: "x"})
		want := "custom " + p + " "
		if p == PageSuccess {
			want = "custom success for Acme"
		}
		if !strings.Contains(w.Body.String(), want) || !strings.Contains(w.Body.String(), `lang="fr"`) || w.Code != Status(p) {
			t.Errorf("%s: %d %s", p, w.Code, w.Body)
		}
	}
}

// TestCSPFormAction: a page without a bank origin posts to the consent
// site only; the start page's post may be redirected to any https origin
// (the bank's authorization endpoint and a login page it redirects to on
// another origin, internationalised hosts included), and to the bank's
// origin when that is a plain http origin.
func TestCSPFormAction(t *testing.T) {
	// A local bank's origin, as the sandbox's: http on a port of its own.
	local := httptest.NewServer(http.NotFoundHandler())
	t.Cleanup(local.Close)
	for _, tc := range []struct{ bank, want string }{
		{"", "form-action 'self';"},
		{"https://bank.example", "form-action 'self' https:;"},
		{"https://bänk.example", "form-action 'self' https:;"},
		{"https://[::1]:8443", "form-action 'self' https:;"},
		{local.URL, "form-action 'self' https: " + local.URL + ";"},
		{"http://[::1]:8443", "form-action 'self' https: http://[::1]:8443;"},
		{"http://bank.example/authorize", "form-action 'self' https:;"},
		{"http://bank.example; script-src *", "form-action 'self' https:;"},
		{"javascript://x", "form-action 'self' https:;"},
	} {
		if got := CSP("n", tc.bank); !strings.Contains(got, tc.want) || strings.Contains(got, "script-src") {
			t.Errorf("CSP with bank %q = %q, want %q", tc.bank, got, tc.want)
		}
	}
}

func TestForStart(t *testing.T) {
	good := strings.Repeat("A", 43)
	for _, tc := range []struct{ link, outcome, want string }{
		{"", oauth.ReasonUnknownState, PageMissing},
		{"abc", oauth.ReasonUnknownState, PageInvalid},
		{good[:40], oauth.ReasonUnknownState, PageInvalid},
		{good[:42] + "!", oauth.ReasonUnknownState, PageInvalid},
		{good, oauth.ReasonUnknownState, PageUsed},
		{good, oauth.ReasonExpired, PageExpired},
		{good, oauth.ReasonProviderError, PageProviderError},
		{good, oauth.ReasonProviderFailure, PageUnavailable},
		{good, oauth.ReasonWrongCallback, PageFailed},
		{good, oauth.ReasonTooManyStarts, PageUsed},
	} {
		if got := ForStart(tc.link, tc.outcome); got != tc.want {
			t.Errorf("ForStart(%q, %s) = %s, want %s", tc.link, tc.outcome, got, tc.want)
		}
	}
}

func TestResultsShownUntilExpiry(t *testing.T) {
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	store := &putKeys{PendingStore: &oauth.MemoryPendingStore{Now: clock}}
	rs := &Results{Store: store, Now: clock}
	ctx := context.Background()
	id, err := rs.Save(ctx, Result{MerchantID: "acme", Outcome: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	if len(store.keys) != 1 {
		t.Fatalf("%d records stored", len(store.keys))
	}
	for _, key := range []string{id, "result/" + id} {
		if _, err := store.Get(ctx, key); err == nil {
			t.Errorf("the result is stored under %q: the key must not be the id", key)
		}
	}
	// The stored key is fixed: the sidecars of a fleet being upgraded
	// read each other's results.
	sum := sha256.Sum256([]byte("token_broker consent result key\x00" + id))
	stored, err := store.Get(ctx, "result/"+hex.EncodeToString(sum[:]))
	if err != nil {
		t.Fatalf("the result is not under its documented key: %v", err)
	}
	if strings.Contains(string(stored), "acme") || strings.Contains(string(stored), `"ok"`) {
		t.Errorf("the stored result is readable: %q", stored)
	}
	for range 3 { // a reload shows it again
		if res, err := rs.Load(ctx, id); err != nil || res.MerchantID != "acme" || res.Outcome != "ok" {
			t.Fatalf("Load = %+v, %v", res, err)
		}
	}
	for _, bad := range []string{"", "x", id[:len(id)-1] + "A", strings.Repeat("A", 100)} {
		if _, err := rs.Load(ctx, bad); bad != id && !errors.Is(err, oauth.ErrUnknownPending) {
			t.Errorf("Load(%q) = %v, want oauth.ErrUnknownPending", bad, err)
		}
	}
	now = now.Add(ResultTTL)
	if _, err := rs.Load(ctx, id); !errors.Is(err, oauth.ErrUnknownPending) {
		t.Errorf("an expired result: %v, want oauth.ErrUnknownPending", err)
	}
}

// putKeys is a PendingStore that notes the keys put into it.
type putKeys struct {
	oauth.PendingStore
	keys []string
}

func (p *putKeys) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	p.keys = append(p.keys, key)
	return p.PendingStore.Put(ctx, key, val, expires)
}

// Status returns the HTTP status of a page.
func Status(page string) int { return pages[page].status }

// TestPostsLink: the start page's check accepts the forms a browser
// posts to …/start with the link, whatever their HTML spelling, and
// refuses the others.
func TestPostsLink(t *testing.T) {
	const l = sampleLink
	for _, tc := range []struct {
		name string
		page string
		want bool
	}{
		{"built-in form", `<form method="post" action="start"><input type="hidden" name="link" value="` + l + `"><button>Go</button></form>`, true},
		{"unquoted, upper case", `<FORM METHOD=POST ACTION=start><INPUT TYPE=HIDDEN NAME=link VALUE=` + l + `></FORM>`, true},
		{"single quotes", `<form method='post' action='start'><input name='link' type='hidden' value='` + l + `'></form>`, true},
		{"attributes in another order", `<form action="start" method="Post"><div><input value="` + l + `" name="link"></div></form>`, true},
		{"dot slash", `<form method="post" action="./start"><input type="text" name="link" value="` + l + `"></form>`, true},
		{"no action: the page's own URL", `<form method="post"><input type="hidden" name="link" value="` + l + `"></form>`, true},
		{"absolute path", `<form method="post" action="/consent/start"><input type="hidden" name="link" value="` + l + `"></form>`, true},
		{"absolute URL", `<form method="post" action="https://consent.partner.example/start"><input type="hidden" name="link" value="` + l + `"></form>`, true},
		{"second form", `<form method="get" action="start"></form><form method="post" action="start"><input type="hidden" name="link" value="` + l + `"></form>`, true},
		{"get", `<form method="get" action="start"><input type="hidden" name="link" value="` + l + `"></form>`, false},
		{"no method (get)", `<form action="start"><input type="hidden" name="link" value="` + l + `"></form>`, false},
		{"to the callback", `<form method="post" action="callback"><input type="hidden" name="link" value="` + l + `"></form>`, false},
		{"to another path", `<form method="post" action="https://evil.example/steal"><input type="hidden" name="link" value="` + l + `"></form>`, false},
		{"javascript action", `<form method="post" action="javascript:start"><input type="hidden" name="link" value="` + l + `"></form>`, false},
		{"field named Link", `<form method="post" action="start"><input type="hidden" name="Link" value="` + l + `"></form>`, false},
		{"another value", `<form method="post" action="start"><input type="hidden" name="link" value="acme"></form>`, false},
		{"field outside the form", `<form method="post" action="start"></form><input type="hidden" name="link" value="` + l + `">`, false},
		{"disabled field", `<form method="post" action="start"><input type="hidden" name="link" value="` + l + `" disabled></form>`, false},
		{"unchecked checkbox", `<form method="post" action="start"><input type="checkbox" name="link" value="` + l + `"></form>`, false},
		{"in a comment", `<!-- <form method="post" action="start"><input type="hidden" name="link" value="` + l + `"></form> -->`, false},
		{"as text", `<p>method="post" name="link" value="` + l + `"</p>`, false},
	} {
		if got := postsLink(tc.page, l); got != tc.want {
			t.Errorf("%s: postsLink = %v, want %v", tc.name, got, tc.want)
		}
	}
}

// TestRetryCallbackPage: a callback whose state was kept while the bank
// could not be reached shows its own page, in every language: 503, and
// a reload of this page in a moment as what to do (not a new consent
// link), and that the consent can be recorded for a short while only (a
// FAPI 2.0 code lives 60 seconds at most), not minutes.
func TestRetryCallbackPage(t *testing.T) {
	if got := ForOutcome(oauth.ReasonRetryCallback); got != PageRetryCallback {
		t.Fatalf("ForOutcome(%s) = %s, want %s", oauth.ReasonRetryCallback, got, PageRetryCallback)
	}
	r, err := New(Config{})
	if err != nil {
		t.Fatal(err)
	}
	for lang, want := range map[string][]string{
		"en": {"Please reload this page in a moment.", "can still be recorded for a short while."},
		"de": {"Bitte laden Sie diese Seite gleich neu.", "Noch ist nichts verloren: Die Einwilligung", "kann noch kurze Zeit gespeichert werden."},
		"fr": {"Veuillez recharger cette page dans un instant.", "peut encore être enregistré pendant un court moment."},
	} {
		w := httptest.NewRecorder()
		r.Render(w, lang, Page{Name: PageRetryCallback, Bank: "Example Bank", Outcome: oauth.ReasonRetryCallback})
		body := html.UnescapeString(w.Body.String())
		if w.Code != http.StatusServiceUnavailable || !strings.Contains(body, "Example Bank") ||
			strings.Contains(body, languages[lang].pages[PageUnavailable].next) {
			t.Errorf("%s: %d, want 503:\n%s", lang, w.Code, body)
		}
		for _, s := range want {
			if !strings.Contains(body, s) {
				t.Errorf("%s: the page does not say %q:\n%s", lang, s, body)
			}
		}
	}
}

// TestPagesWithoutTheirTemplate: a set of templates with a file per page
// and no page.html, made before the retry_callback and cross_site pages
// existed, still loads: each of them shows with unavailable.html, with
// its own status and texts.
func TestPagesWithoutTheirTemplate(t *testing.T) {
	for _, tc := range []struct {
		page    string
		outcome string
		status  int
		next    string
	}{
		{PageRetryCallback, oauth.ReasonRetryCallback, http.StatusServiceUnavailable, "Please reload this page in a moment."},
		{PageCrossSite, "cross_site", http.StatusForbidden, "Open the consent link you were given and press its button."},
	} {
		t.Run(tc.page, func(t *testing.T) {
			files := map[string]string{}
			for _, p := range Pages() {
				if p != tc.page {
					files[p+".html"] = `<!doctype html><style nonce="{{.Nonce}}"></style><main>custom ` + p + ` {{.Text.Next}}</main>`
				}
			}
			files[PageStart+".html"] = `<main><form method="post" action="start"><input type="hidden" name="link" value="{{.Link}}"><button>{{.Text.Action}}</button></form></main>`
			r, err := New(Config{Templates: writeTemplates(t, files)})
			if err != nil {
				t.Fatalf("templates without %s.html: %v", tc.page, err)
			}
			w := httptest.NewRecorder()
			r.Render(w, "en", Page{Name: tc.page, Outcome: tc.outcome})
			if body := w.Body.String(); !strings.Contains(body, "custom "+PageUnavailable+" "+tc.next) || w.Code != tc.status {
				t.Errorf("%s with the template of unavailable: %d %s, want %d and %q", tc.page, w.Code, body, tc.status, tc.next)
			}
		})
	}
}
