// Package consentpage renders the pages a merchant's browser sees on the
// consent site (the token_broker_consent handler): the outcome of a
// consent, in the partner's brand and the merchant's language, from the
// built-in templates or an operator's own html/template files (Renderer).
// It also keeps the result of each callback, sealed, so that the outcome
// page shows it on every load until ResultTTL (Results).
//
// The pages load nothing from elsewhere: the stylesheet is inline (allowed
// by a per-response CSP nonce), a logo is a data: URI or a path on the
// consent site itself, and the Content-Security-Policy says so.
package consentpage

import (
	"bytes"
	"crypto/rand"
	"embed"
	"encoding/base64"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"path"
	"regexp"
	"slices"
	"strings"

	"golang.org/x/net/html"
	"golang.org/x/net/html/atom"
)

// The pages, by name: Data.Page, and the file names of a template
// directory (success.html, ...).
const (
	// PageStart: a consent link that can be used, shown on opening it:
	// whose consent it is, and a button that starts the consent (a form
	// posting the link back to …/start). Opening it changes nothing, so
	// that a mail or chat scanner that fetches the link leaves it usable.
	PageStart = "start"
	// PageSuccess: the consent is recorded.
	PageSuccess = "success"
	// PageDenied: the merchant did not consent at the bank.
	PageDenied = "denied"
	// PageExpired: the link, or the time to finish at the bank, ran out.
	PageExpired = "expired"
	// PageUsed: the link or authorization state was already used, or is
	// not known.
	PageUsed = "used"
	// PageMissing: /start without a link.
	PageMissing = "missing"
	// PageInvalid: a link that is not one this service hands out (cut
	// short, garbled).
	PageInvalid = "invalid"
	// PageProviderError: the bank refused the authorization request (a
	// configuration problem of the service, not the merchant's choice).
	PageProviderError = "provider_error"
	// PageFailed: the code exchange, the ID token or the issuer check
	// failed.
	PageFailed = "failed"
	// PageUnavailable: the bank's discovery or the consent storage could
	// not be reached.
	PageUnavailable = "unavailable"
	// PageRetryCallback: the callback arrived while the bank's endpoints
	// could not be discovered, or the bank very likely did not process the
	// code exchange (it was busy or not reached); its state is kept, and
	// reloading the page in a moment completes the consent.
	PageRetryCallback = "retry_callback"
	// PageCrossSite: a start posted from another site (not the start
	// page's own form): nothing was started.
	PageCrossSite = "cross_site"
	// PageWrongBrowser: the callback came without the consent cookie of
	// the browser that opened the link.
	PageWrongBrowser = "wrong_browser"
	// PageNotFound: any other path of the consent site.
	PageNotFound = "not_found"
	// PageGone: a result page whose result has expired.
	PageGone = "gone"
	// PageResultUnavailable: a result page whose result cannot be read
	// because the consent storage failed; reloading may show it.
	PageResultUnavailable = "result_unavailable"
)

// pageInfo is what a page is, besides its texts.
type pageInfo struct {
	status    int
	tone      string // ok, error or info
	noOutcome bool   // not the outcome of a consent: no Outcome, no Code
}

// pages are the pages with their HTTP status and tone, in the order the
// README lists them.
var pages = map[string]pageInfo{
	PageStart:             {status: http.StatusOK, tone: "info", noOutcome: true},
	PageSuccess:           {status: http.StatusOK, tone: "ok"},
	PageDenied:            {status: http.StatusOK, tone: "info"},
	PageExpired:           {status: http.StatusBadRequest, tone: "error"},
	PageUsed:              {status: http.StatusBadRequest, tone: "error"},
	PageMissing:           {status: http.StatusBadRequest, tone: "error", noOutcome: true},
	PageInvalid:           {status: http.StatusBadRequest, tone: "error", noOutcome: true},
	PageProviderError:     {status: http.StatusBadGateway, tone: "error"},
	PageFailed:            {status: http.StatusBadGateway, tone: "error"},
	PageUnavailable:       {status: http.StatusServiceUnavailable, tone: "error"},
	PageRetryCallback:     {status: http.StatusServiceUnavailable, tone: "error"},
	PageCrossSite:         {status: http.StatusForbidden, tone: "error"},
	PageWrongBrowser:      {status: http.StatusForbidden, tone: "error"},
	PageNotFound:          {status: http.StatusNotFound, tone: "info", noOutcome: true},
	PageGone:              {status: http.StatusGone, tone: "info", noOutcome: true},
	PageResultUnavailable: {status: http.StatusServiceUnavailable, tone: "error", noOutcome: true},
}

// Pages returns the names of all pages.
func Pages() []string {
	return []string{PageStart, PageSuccess, PageDenied, PageExpired, PageUsed, PageMissing, PageInvalid,
		PageProviderError, PageFailed, PageUnavailable, PageRetryCallback, PageCrossSite, PageWrongBrowser, PageNotFound, PageGone, PageResultUnavailable}
}

// Data is what a page template is executed with. Every field is set on
// every page (empty when it does not apply); a template that names
// another field is refused when it is loaded.
type Data struct {
	// Page is the page's name: one of the Page constants ("success",
	// "denied", ...).
	Page string
	// Status is the page's HTTP status (200 for success, 400 for an
	// expired link, ...).
	Status int
	// Tone is "ok" (success), "error" (a failure) or "info" (denied, not
	// found, gone), for styling.
	Tone string
	// Lang is the page's language, a BCP 47 tag of Languages ("en", "de",
	// "fr"): the handler's lang option, else the best match of the
	// browser's Accept-Language, else "en".
	Lang string
	// Text is the built-in wording of the page in Lang, the names filled
	// in.
	Text Text
	// Partner is the partner's name (the handler's partner option);
	// empty when not configured.
	Partner string
	// Logo is the partner's logo (the handler's logo option): a data: URI
	// or a path on the consent site; empty when not configured.
	Logo template.URL
	// Accent is the accent colour, a CSS hex colour ("#1f5fbf").
	Accent string
	// MerchantID is the merchant's id in the registry; empty when the
	// merchant is not known (a link that did not open).
	MerchantID string
	// Merchant is the merchant's display_name from the registry, else its
	// id; empty when not known.
	Merchant string
	// Bank is the display_name of the provider's consent table; empty when
	// not configured.
	Bank string
	// Outcome is the consent's outcome as the app's return URL gets it:
	// "ok" or a refusal reason ("denied", "expired", "provider_error",
	// ...); empty on the pages that are no outcome (not_found, missing,
	// invalid, gone, result_unavailable).
	Outcome string
	// Code is the reference a merchant can quote to support on an error
	// page: the outcome, with the provider's error code for
	// provider_error ("provider_error:invalid_request"); empty otherwise.
	Code string
	// Link is the consent link on the start page, for the form that
	// starts the consent: a template's start page must post it back to
	// …/start as the form field "link" (the built-in page: <form
	// method="post" action="start"><input type="hidden" name="link"
	// value="{{.Link}}"><button type="submit">{{.Text.Action}}</button></form>);
	// empty on every other page.
	Link string
	// Nonce is this response's CSP nonce: a template's inline <style>
	// needs nonce="{{.Nonce}}" (no other inline style or script runs).
	Nonce string
	// CSS is the built-in stylesheet with the accent colour, for a
	// template that keeps the built-in look.
	CSS template.CSS
}

//go:embed builtin/page.html builtin/style.css
var builtin embed.FS

// Renderer renders the pages of one consent handler. It is safe for
// concurrent use.
type Renderer struct {
	cfg   Config
	css   template.CSS
	tmpls map[string]*template.Template // by page
}

// New checks cfg and returns its Renderer: the built-in pages, or the
// templates of cfg.Templates, each executed once against sample data so
// that a template that does not parse, names an unknown field or fails
// is refused here, with its file and line.
func New(cfg Config) (*Renderer, error) {
	if err := cfg.check(); err != nil {
		return nil, err
	}
	css, err := builtin.ReadFile("builtin/style.css")
	if err != nil {
		return nil, err
	}
	r := &Renderer{cfg: cfg, css: template.CSS(fmt.Sprintf(":root{--accent:%s;--on-accent:%s}\n%s", cfg.accent(), onAccent(cfg.accent()), css))}
	if cfg.Templates == "" {
		t, err := template.New("page.html").Option("missingkey=error").ParseFS(builtin, "builtin/page.html")
		if err != nil {
			return nil, err
		}
		r.tmpls = map[string]*template.Template{}
		for _, p := range Pages() {
			r.tmpls[p] = t
		}
	} else if r.tmpls, err = loadTemplates(cfg.Templates); err != nil {
		return nil, err
	}
	var start string // the start page of its full sample
	for _, p := range Pages() {
		for _, d := range r.samples(p) {
			var out bytes.Buffer
			if err := r.tmpls[p].Execute(&out, d); err != nil {
				return nil, fmt.Errorf("%s: page %s: %w", r.where(), p, err)
			}
			if d.Link != "" {
				start = out.String()
			}
		}
	}
	if !postsLink(start, sampleLink) {
		return nil, fmt.Errorf(`%s: page %s has no form that posts the consent link, so the merchant cannot start: add <form method="post" action="start"><input type="hidden" name="link" value="{{.Link}}"><button type="submit">{{.Text.Action}}</button></form> to %s.html (or page.html)`,
			r.where(), PageStart, PageStart)
	}
	return r, nil
}

// sampleLink is the consent link of the start page's sample data.
const sampleLink = "c2FtcGxlLWNvbnNlbnQtbGluay1mb3ItdGhlLWNoZWNr"

// sampleStart is where the sample start page is served from, to resolve
// its form's action against.
var sampleStart = &url.URL{Scheme: "https", Host: "consent.invalid", Path: "/consent/start", RawQuery: "link=" + sampleLink}

// postsLink reports whether the page page, parsed as a browser does, has
// a form that posts link back to …/start: a form with method post whose
// action is relative and resolves to the start page's path (or is
// absent), or is absolute with a path ending in /start (the path prefix
// is not known here), holding an enabled input named "link" of type
// hidden or text with the value link.
func postsLink(page, link string) bool {
	doc, err := html.Parse(strings.NewReader(page))
	if err != nil {
		return false
	}
	for n := range doc.Descendants() {
		if n.Type != html.ElementNode || n.DataAtom != atom.Form || !strings.EqualFold(attr(n, "method"), "post") || !postsToStart(n) {
			continue
		}
		for in := range n.Descendants() {
			if in.Type == html.ElementNode && in.DataAtom == atom.Input && attr(in, "name") == "link" && attr(in, "value") == link &&
				slices.Contains([]string{"", "hidden", "text"}, strings.ToLower(attr(in, "type"))) && !hasAttr(in, "disabled") {
				return true
			}
		}
	}
	return false
}

// postsToStart reports whether the form's action leads to …/start (see
// postsLink).
func postsToStart(form *html.Node) bool {
	action := strings.TrimSpace(attr(form, "action"))
	u, err := sampleStart.Parse(action)
	if err != nil || u.Scheme != "https" && u.Scheme != "http" {
		return false
	}
	if ref, _ := url.Parse(action); ref.IsAbs() || strings.HasPrefix(action, "/") {
		return path.Base(u.Path) == "start"
	}
	return u.Host == sampleStart.Host && u.Path == sampleStart.Path
}

// attr is the value of the attribute key of n, "" without it.
func attr(n *html.Node, key string) string {
	for _, a := range n.Attr {
		if a.Namespace == "" && a.Key == key {
			return a.Val
		}
	}
	return ""
}

// hasAttr reports whether n has the attribute key.
func hasAttr(n *html.Node, key string) bool {
	return slices.ContainsFunc(n.Attr, func(a html.Attribute) bool { return a.Namespace == "" && a.Key == key })
}

// where names the templates, for errors.
func (r *Renderer) where() string {
	if r.cfg.Templates == "" {
		return "built-in templates"
	}
	return "templates " + r.cfg.Templates
}

// samples are the data a page's template is checked with: every field
// set, and the optional ones empty.
func (r *Renderer) samples(page string) []Data {
	full := r.data(page, "en", "acme", "Acme Ltd", "Example Bank")
	full.Outcome, full.Code = "provider_error", "provider_error:invalid_request"
	full.Nonce = "c2FtcGxl"
	if page == PageStart {
		full.Link = sampleLink
	}
	bare := r.data(page, "en", "", "", "")
	bare.Partner, bare.Logo = "", ""
	return []Data{full, bare}
}

// Page is what the handler knows of the page to show.
type Page struct {
	// Name is the page: one of the Page constants.
	Name string
	// MerchantID is the merchant's id, when known.
	MerchantID string
	// Merchant is the merchant's display name, when it has one.
	Merchant string
	// Bank is the provider's display name, when it has one.
	Bank string
	// Outcome is the outcome code, when the page shows one.
	Outcome string
	// ProviderCode is the provider's error code of a provider_error.
	ProviderCode string
	// Link is the consent link of the start page.
	Link string
	// BankOrigin is the origin (scheme://host[:port]) of the provider's
	// authorization endpoint, on the start page: its form's post is
	// redirected there, which the page's CSP (form-action) must allow
	// (see CSP).
	BankOrigin string
}

// data builds the Data of a page (without nonce).
func (r *Renderer) data(page, lang, merchantID, merchant, bank string) Data {
	info := pages[page]
	if merchant == "" {
		merchant = merchantID
	}
	return Data{Page: page, Status: info.status, Tone: info.tone, Lang: lang, Text: text(lang, page, r.cfg.Partner, merchant, bank),
		Partner: r.cfg.Partner, Logo: template.URL(r.cfg.Logo), Accent: r.cfg.accent(),
		MerchantID: merchantID, Merchant: merchant, Bank: bank, CSS: r.css}
}

// text is the built-in wording of page in lang, with the names filled in.
func text(lang, page, partner, merchant, bank string) Text {
	l := languages[lang]
	if partner == "" {
		partner = l.partner
	}
	if bank == "" {
		bank = l.bank
	}
	fill := strings.NewReplacer("{partner}", partner, "{merchant}", merchant, "{bank}", bank).Replace
	p := l.pages[page]
	t := Text{Title: fill(p.title), Message: fill(p.message), NextLabel: l.nextLabel, Next: fill(p.next),
		CodeLabel: l.codeLabel, Consent: l.consent, Footer: l.footer}
	if page == PageStart {
		t.Action = fill(l.action)
	}
	if merchant != "" {
		t.About = fill(l.about)
	}
	return t
}

// Render writes page p to w, in the language chosen for acceptLanguage
// (the request's Accept-Language header), with its status and headers:
// Content-Type, Content-Security-Policy (nothing but the inline style of
// this response's nonce, and images from data: or the site itself) and
// X-Content-Type-Options. The caller sets the caching headers. p.Name
// must be one of the page-name constants (PageSuccess, ...).
func (r *Renderer) Render(w http.ResponseWriter, acceptLanguage string, p Page) {
	d := r.data(p.Name, r.language(acceptLanguage), p.MerchantID, p.Merchant, p.Bank)
	if !pages[p.Name].noOutcome {
		d.Outcome = p.Outcome
	}
	if p.Name == PageStart {
		d.Link = p.Link
	}
	if d.Tone == "error" && d.Outcome != "" {
		d.Code = p.Outcome
		if p.ProviderCode != "" {
			d.Code += ":" + p.ProviderCode
		}
	}
	nonce := make([]byte, 16)
	_, _ = rand.Read(nonce) // crypto/rand.Read never fails
	d.Nonce = base64.RawURLEncoding.EncodeToString(nonce)
	var buf bytes.Buffer
	if err := r.tmpls[p.Name].Execute(&buf, d); err != nil {
		// Checked at load: only a write to buf could fail, and does not.
		http.Error(w, http.StatusText(http.StatusInternalServerError), http.StatusInternalServerError)
		return
	}
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Language", d.Lang)
	h.Set("Content-Security-Policy", CSP(d.Nonce, p.BankOrigin))
	h.Set("X-Content-Type-Options", "nosniff")
	h.Add("Vary", "Accept-Language")
	w.WriteHeader(d.Status)
	_, _ = w.Write(buf.Bytes())
}

// CSP is the Content-Security-Policy of a page with the style nonce
// nonce: nothing loads but that inline style and images from data: URIs
// or the consent site; no base URL, no framing. A page without
// bankOrigin posts forms to the consent site only. The start page (with
// bankOrigin, the origin of the provider's authorization endpoint) posts
// to the consent site, which redirects to the provider; browsers check
// form-action on every redirect that follows a post, and a provider's
// authorization endpoint may redirect on to a login page on another
// origin, so that form-action also allows any https origin, and
// bankOrigin itself when it is not https (a local sandbox bank on http)
// and a plain origin (scheme://host[:port]).
func CSP(nonce, bankOrigin string) string {
	formAction := "'self'"
	if bankOrigin != "" {
		formAction += " https:"
		if !strings.HasPrefix(bankOrigin, "https://") && origin.MatchString(bankOrigin) {
			formAction += " " + bankOrigin
		}
	}
	return "default-src 'none'; style-src 'nonce-" + nonce + "'; img-src data: 'self'; base-uri 'none'; form-action " + formAction + "; frame-ancestors 'none'"
}

// origin matches a plain http origin, as a CSP source may name it.
var origin = regexp.MustCompile(`^http://[A-Za-z0-9.-]+(?::[0-9]{1,5})?$|^http://\[[0-9A-Fa-f:.]+\](?::[0-9]{1,5})?$`)
