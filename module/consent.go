package module

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentpage"
	"github.com/tokenbroker/caddy-token-broker/config"
)

func init() {
	caddy.RegisterModule(Consent{})
	httpcaddyfile.RegisterHandlerDirective("token_broker_consent", parseConsentCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("token_broker_consent", httpcaddyfile.Before, "respond")
}

// Consent is the token_broker_consent handler: the merchants' consent
// (OAuth authorization-code flow) for one refresh_token provider with a
// [providers.NAME.consent] table in the token_broker app's registry.
//
// On the public callback site (a domain of the provider's redirect_uris,
// with Caddy's automatic HTTPS) it serves, under any path prefix:
//
//	GET  …/start?link=…   consume a one-time consent link, set the browser's consent cookie,
//	                      redirect to the provider
//	GET  …/callback       the provider's redirect: check the state and that the browser holds its
//	                      cookie, exchange the code, store the refresh token, redirect to the app's
//	                      return URL with merchant and outcome (ok or the refusal reason; with
//	                      outcome provider_error, also error, the provider's error code); without
//	                      a return URL, redirect to …/done
//	GET  …/done?result=…  the outcome page of a callback, the same on every load for an hour
//
// Every other path, and every refusal, gets a page of its own
// (broker/oauth/consentpage: the built-in pages, branded with Partner,
// Logo and Accent, in Lang or the browser's language, or the operator's
// Templates), with a strict Content-Security-Policy.
//
// The consent cookie binds the authorization state to the browser that
// opened the link (RFC 9700 §4.7.1): "__Host-token_broker_consent"
// (Secure, HttpOnly, SameSite=Lax, Path=/) on HTTPS or a host that is not
// loopback, "token_broker_consent" (HttpOnly, SameSite=Lax, Path=/) on
// plain HTTP to a loopback host. A callback without the cookie of the
// browser that started it is refused (403, outcome wrong_browser) and its
// state is left for that browser.
//
// With links (on the localhost sidecar site) it serves instead:
//
//	POST …/links  {"merchant": "acme", "return_url": "https://app…", "callback_host": "cb1…"}
//	              → {"url": "https://cb1…/consent/start?link=…", "expires": "…"}
//
// for the merchants of every provider with a consent table: the link is
// for the merchant's provider (Provider is not needed). The app's caller
// policy, when configured, decides which merchants a caller may ask links
// for; the provider's link limits answer 429 with Retry-After.
// Everything else is 404. Every answer sets
// Cache-Control: no-store and Referrer-Policy: no-referrer; the requests are
// left out of Caddy's access log (their URLs hold a code, a state or a
// link), and the handler logs each outcome without them.
//
// The consents in progress live in Caddy's storage, sealed: several
// instances with several callback domains share them when they share the
// storage (as they must for the refresh tokens), and they survive reloads
// and restarts; expired ones are swept (see storagePending).
type Consent struct {
	// Provider is the name of the provider (in the registry) whose consents
	// this handler runs. Required without Links; with Links it is
	// optional and only checked (links are for the merchant's provider).
	Provider string `json:"provider,omitempty"`

	// Links serves the consent-link API instead of start and callback, for
	// the merchants of every provider with a consent table. Put it on the
	// localhost sidecar site, never on the public one.
	Links bool `json:"links,omitempty"`

	// Partner is the partner's name on the consent pages. At most 100
	// characters. Optional.
	Partner string `json:"partner,omitempty"`
	// Logo is the partner's logo on the consent pages: a base64 data: URI
	// of a PNG, JPEG, GIF, WebP or SVG image (at most 64 KiB), or an
	// absolute path on the consent site ("/brand/logo.svg") that the site
	// serves; nothing is loaded from another origin. Optional.
	Logo string `json:"logo,omitempty"`
	// Accent is the pages' accent colour, a CSS hex colour (#rgb or
	// #rrggbb). Default #1f5fbf.
	Accent string `json:"accent,omitempty"`
	// Lang fixes the pages' language: en, de or fr. Default: the best
	// match of the browser's Accept-Language, else en.
	Lang string `json:"lang,omitempty"`
	// Templates is a directory of Go html/template files replacing the
	// built-in pages: page.html for every page and/or <page>.html for one
	// (success, denied, expired, used, missing, invalid, provider_error,
	// failed, unavailable, wrong_browser, not_found, gone), _*.html for
	// shared definitions. They are executed with consentpage.Data; each
	// is parsed and executed against sample data at provision time, and a
	// template that fails (syntax, unknown field) is refused with its file
	// and line. Optional.
	Templates string `json:"templates,omitempty"`

	app     *App
	flow    *oauth.AuthCode
	reg     *config.Registry
	logger  *zap.Logger
	metrics *consentMetrics
	pages   *consentpage.Renderer
	results *consentpage.Results
	bank    string // the provider's display name
}

// CaddyModule returns the Caddy module information.
func (Consent) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_broker_consent",
		New: func() caddy.Module { return new(Consent) },
	}
}

// Provision finds the provider's consent flow in the app's registry.
func (c *Consent) Provision(ctx caddy.Context) error {
	c.logger = ctx.Logger()
	appIface, err := ctx.App("token_broker")
	if err != nil {
		return err
	}
	c.app = appIface.(*App)
	c.reg = c.app.registry
	if c.Provider == "" && !c.Links {
		return errors.New("token_broker_consent: provider is required: name the refresh_token provider whose merchants consent here")
	}
	pageCfg := consentpage.Config{Partner: c.Partner, Logo: c.Logo, Accent: c.Accent, Lang: c.Lang, Templates: c.Templates}
	if c.Links && pageCfg != (consentpage.Config{}) {
		return errors.New("token_broker_consent: links: partner, logo, accent, lang and templates brand the pages of the public consent site, not the links endpoint: move them to the handler with the provider")
	}
	if c.pages, err = consentpage.New(pageCfg); err != nil {
		return fmt.Errorf("token_broker_consent: %w", err)
	}
	c.results = &consentpage.Results{Store: storagePending{s: ctx.Storage()}}
	if c.reg == nil {
		return fmt.Errorf("token_broker_consent: provider %q: the token_broker app has no registry (set its config)", c.Provider)
	}
	if c.Provider == "" {
		if !hasConsent(c.reg) {
			return fmt.Errorf("token_broker_consent: links: no provider of the registry %s has a consent table ([providers.NAME.consent])", c.reg.Path)
		}
		c.metrics, err = loadConsentMetrics(ctx.GetMetricsRegistry())
		return err
	}
	p := c.reg.Providers[c.Provider]
	switch {
	case p == nil:
		return fmt.Errorf("token_broker_consent: provider %q is not in the registry %s", c.Provider, c.reg.Path)
	case p.Consent == nil:
		return fmt.Errorf("token_broker_consent: provider %q (%s line %d) has no consent table: add [providers.%s.consent] with redirect_uris", c.Provider, c.reg.Path, p.Line, c.Provider)
	}
	c.flow = p.Consent
	c.bank = p.DisplayName
	c.metrics, err = loadConsentMetrics(ctx.GetMetricsRegistry())
	return err
}

// ServeHTTP serves start, callback or links; everything else is 404.
func (c *Consent) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	caddyhttp.SetVar(r.Context(), caddyhttp.LogSkipVar, true)
	path := r.URL.Path
	switch {
	case c.Links && strings.HasSuffix(path, "/links") && r.Method == http.MethodPost:
		c.link(w, r)
	case !c.Links && strings.HasSuffix(path, "/start") && r.Method == http.MethodGet:
		c.start(w, r)
	case !c.Links && strings.HasSuffix(path, "/callback") && r.Method == http.MethodGet:
		c.callback(w, r)
	case !c.Links && strings.HasSuffix(path, "/done") && r.Method == http.MethodGet:
		c.result(w, r)
	default:
		c.render(w, r, consentpage.Page{Name: consentpage.PageNotFound})
	}
	return nil
}

// render writes a consent page, with the merchant's and the provider's
// display names from the registry.
func (c *Consent) render(w http.ResponseWriter, r *http.Request, p consentpage.Page) {
	if p.MerchantID != "" {
		if m, _, ok := c.reg.Merchant(p.MerchantID); ok {
			p.Merchant = m.DisplayName
		}
	}
	p.Bank = c.bank
	c.pages.Render(w, r.Header.Get("Accept-Language"), p)
}

// result serves …/done: the page of a callback's stored result.
func (c *Consent) result(w http.ResponseWriter, r *http.Request) {
	res, ok := c.results.Load(r.Context(), r.URL.Query().Get("result"))
	if !ok {
		c.render(w, r, consentpage.Page{Name: consentpage.PageGone})
		return
	}
	c.render(w, r, consentpage.Page{Name: consentpage.ForOutcome(res.Outcome), MerchantID: res.MerchantID,
		Outcome: res.Outcome, ProviderCode: res.ProviderCode})
}

// consentOutcome is the outcome of a consent step: "ok", the
// *oauth.ConsentError's reason (and the provider's error code of a
// provider_error), or "error".
func consentOutcome(err error) (outcome, code string) {
	var ce *oauth.ConsentError
	switch {
	case err == nil:
		return "ok", ""
	case errors.As(err, &ce):
		return ce.Reason, ce.Code
	}
	return "error", ""
}

// span starts a span for a consent step under the request's span.
func (c *Consent) span(r *http.Request, provider, step string) (context.Context, trace.Span) {
	parent := trace.SpanFromContext(r.Context())
	return parent.TracerProvider().Tracer(tracerName).Start(r.Context(), "token_broker.consent."+step,
		trace.WithAttributes(attrProvider.String(provider)))
}

// done records a step's outcome: metric, span and log, never a code,
// token, link or state.
func (c *Consent) done(span trace.Span, provider, step, merchant string, err error) {
	outcome, code := consentOutcome(err)
	c.metrics.steps.WithLabelValues(provider, step, outcome).Inc()
	span.SetAttributes(attrMerchant.String(merchant), attrOutcome.String(outcome))
	fields := []zap.Field{zap.String("provider", provider), zap.String("step", step), zap.String("merchant", merchant), zap.String("outcome", outcome)}
	var le *oauth.LinkLimitError
	switch {
	case errors.As(err, &le): // a flood of these is counted, not logged one by one
		span.SetStatus(codes.Error, outcome)
		c.logger.Debug("consent link refused", append(fields, zap.String("error", err.Error()))...)
	case outcome == oauth.ReasonProviderError:
		// Not the merchant's doing: the error says what the operator
		// should check or set.
		span.SetStatus(codes.Error, outcome)
		c.logger.Error("consent failed: the provider refused the authorization request; fix the provider's configuration",
			append(fields, zap.String("provider_error", code), zap.String("error", err.Error()))...)
	case err != nil:
		span.SetStatus(codes.Error, outcome)
		c.logger.Warn("consent refused", append(fields, zap.String("error", err.Error()))...)
	default:
		c.logger.Info("consent step", fields...)
	}
	span.End()
}

// start consumes a consent link, binds the browser with its consent
// cookie (the one it has, or a new one) and redirects to the provider.
func (c *Consent) start(w http.ResponseWriter, r *http.Request) {
	ctx, span := c.span(r, c.Provider, "start")
	name, secure := browserCookie(r)
	browser := oauth.NewBrowser()
	if ck, err := r.Cookie(name); err == nil && validBrowser(ck.Value) {
		browser = oauth.Browser(ck.Value)
	}
	authURL, rec, err := c.flow.Start(ctx, r.URL.Query().Get("link"), r.Host, browser)
	c.done(span, c.Provider, "start", rec.Merchant, err)
	if err != nil {
		outcome, code := consentOutcome(err)
		c.render(w, r, consentpage.Page{Name: consentpage.ForStart(r.URL.Query().Get("link"), outcome),
			MerchantID: rec.Merchant, Outcome: outcome, ProviderCode: code})
		return
	}
	http.SetCookie(w, &http.Cookie{Name: name, Value: string(browser), Path: "/", MaxAge: int(oauth.StateTTL / time.Second),
		Secure: secure, HttpOnly: true, SameSite: http.SameSiteLaxMode})
	http.Redirect(w, r, authURL, http.StatusSeeOther)
}

// browserCookie is the name of the consent cookie for r and whether it is
// Secure: "__Host-" prefixed and Secure unless r is plain HTTP to a
// loopback host (a browser keeps no Secure cookie from plain HTTP, but
// one behind a TLS-terminating proxy is on HTTPS).
func browserCookie(r *http.Request) (name string, secure bool) {
	if r.TLS == nil && isLoopbackHost(r.Host) {
		return consentCookie, false
	}
	return "__Host-" + consentCookie, true
}

// consentCookie is the consent cookie's name, without prefix.
const consentCookie = "token_broker_consent"

// isLoopbackHost reports whether a Host header names the local machine:
// localhost, 127.0.0.0/8 or ::1, with any port.
func isLoopbackHost(host string) bool {
	if h, _, err := net.SplitHostPort(host); err == nil {
		host = h
	}
	host = strings.TrimSuffix(strings.Trim(host, "[]"), ".")
	if strings.EqualFold(host, "localhost") {
		return true
	}
	ip, err := netip.ParseAddr(host)
	return err == nil && ip.IsLoopback()
}

// validBrowser reports whether v looks like a browser secret made by
// oauth.NewBrowser (32 random bytes, base64url): another value is
// replaced by a new one.
func validBrowser(v string) bool {
	b, err := base64.RawURLEncoding.DecodeString(v)
	return err == nil && len(b) == 32
}

// callback finishes the consent and sends the browser back to the app.
func (c *Consent) callback(w http.ResponseWriter, r *http.Request) {
	ctx, span := c.span(r, c.Provider, "callback")
	var browser oauth.Browser // none: refused if the state is bound
	name, _ := browserCookie(r)
	if ck, cerr := r.Cookie(name); cerr == nil {
		browser = oauth.Browser(ck.Value)
	}
	res, err := c.flow.Callback(ctx, r.Host, r.URL.Query(), browser)
	c.done(span, c.Provider, "callback", res.Merchant, err)
	if err == nil {
		c.app.broker.PurgeMerchant(res.Merchant)
		forgetConsentRequired(c.app.broker, c.Provider, res.Merchant)
		c.logger.Info("refresh token stored by consent", zap.String("provider", c.Provider),
			zap.String("merchant", res.Merchant), zap.String("fingerprint", res.Fingerprint))
	}
	outcome, code := consentOutcome(err)
	if res.ReturnURL != "" {
		params := url.Values{"merchant": {res.Merchant}, "outcome": {outcome}}
		if code != "" { // provider_error: the provider's error code
			params.Set("error", code)
		}
		http.Redirect(w, r, withParams(res.ReturnURL, params), http.StatusSeeOther)
		return
	}
	if res.Merchant != "" {
		// The outcome of a known state goes to …/done, which shows it
		// again on a reload (the state is consumed by now).
		id, serr := c.results.Save(ctx, consentpage.Result{MerchantID: res.Merchant, Outcome: outcome, ProviderCode: code})
		if serr == nil {
			// Relative, so that it resolves against the path the browser
			// used, whatever a handle_path stripped.
			w.Header().Set("Location", "done?"+url.Values{"result": {id}}.Encode())
			w.WriteHeader(http.StatusSeeOther)
			return
		}
		c.logger.Warn("consent result not stored: its page is shown once", zap.String("provider", c.Provider),
			zap.String("merchant", res.Merchant), zap.Error(serr))
	}
	c.render(w, r, consentpage.Page{Name: consentpage.ForOutcome(outcome), MerchantID: res.Merchant, Outcome: outcome, ProviderCode: code})
}

// forgetConsentRequired drops the broker's remembered consent_required of
// a merchant at a provider, once it has a new refresh token (by consent or
// through the admin API), so that its next call refreshes at once.
func forgetConsentRequired(br *broker.Broker, provider, merchant string) {
	br.ForgetFailures(func(err error) bool {
		var cr *oauth.ConsentRequiredError
		return errors.As(err, &cr) && cr.Merchant == merchant && cr.Provider == provider
	})
}

func withParams(u string, v url.Values) string {
	if strings.Contains(u, "?") {
		return u + "&" + v.Encode()
	}
	return u + "?" + v.Encode()
}

// LinkRequest is the body of a consent-link request.
type LinkRequest struct {
	// Merchant whose consent is asked.
	Merchant string `json:"merchant"`
	// ReturnURL is where the browser goes after the callback; it must be
	// on the provider's return_urls allow-list. Optional.
	ReturnURL string `json:"return_url,omitempty"`
	// CallbackHost picks the callback domain; default the first of the
	// provider's redirect_uris.
	CallbackHost string `json:"callback_host,omitempty"`
}

// LinkResponse is a created consent link.
type LinkResponse struct {
	// Merchant whose consent the link asks.
	Merchant string `json:"merchant"`
	// Provider whose consent it is.
	Provider string `json:"provider"`
	// URL is the one-time link for the merchant's browser.
	URL string `json:"url"`
	// Expires is when the link stops working.
	Expires time.Time `json:"expires"`
}

// link serves POST …/links on the sidecar: the caller policy applies.
func (c *Consent) link(w http.ResponseWriter, r *http.Request) {
	if code, err := c.app.site.Check(r); code != 0 { // as the token_broker handler
		c.logger.Warn("consent link refused", zap.String("error_code", code.String()), zap.Error(err))
		linkError(w, code.Status(), code.String(), code.Message(""))
		return
	}
	var req LinkRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<10)).Decode(&req); err != nil {
		linkError(w, http.StatusBadRequest, "bad_request", `the body must be JSON: {"merchant": "...", "return_url": "..."}`)
		return
	}
	if pol := c.app.Callers; pol != nil {
		sub, cerr := pol.policy.Authenticate(r)
		if cerr != nil {
			linkError(w, cerr.Code.Status(), cerr.Code.String(), "the caller must present a valid JWT from the trusted issuer as a Bearer token")
			return
		}
		if !pol.policy.Allows(sub, req.Merchant) {
			linkError(w, http.StatusForbidden, "merchant_not_allowed", fmt.Sprintf("caller %q may not act for merchant %q", sub, req.Merchant))
			return
		}
	}
	provider := c.Provider
	if m := c.reg.Merchants[req.Merchant]; m != nil {
		provider = m.Provider
	}
	ctx, span := c.span(r, provider, "link")
	link, status, err := createLink(ctx, c.reg, req)
	c.done(span, provider, "link", req.Merchant, err)
	if err != nil {
		code := "bad_request"
		var ce *oauth.ConsentError
		if errors.As(err, &ce) {
			code = ce.Reason
		}
		setRetryAfter(w, err)
		linkError(w, status, code, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(link)
}

// createLink creates the link of the merchant's provider; status is the
// HTTP status of a failure: 404 for a merchant not in the registry, 409
// for one whose provider has no consent table, 400 for a return URL or
// callback host refused, 429 for a link limit.
func createLink(ctx context.Context, reg *config.Registry, req LinkRequest) (LinkResponse, int, error) {
	m := reg.Merchants[req.Merchant]
	if m == nil {
		return LinkResponse{}, http.StatusNotFound, fmt.Errorf("merchant %q is not in the registry %s", req.Merchant, reg.Path)
	}
	p := reg.Providers[m.Provider]
	if p == nil || p.Consent == nil {
		return LinkResponse{}, http.StatusConflict, fmt.Errorf("merchant %q: provider %q has no consent table ([providers.%s.consent])", req.Merchant, m.Provider, m.Provider)
	}
	flow := p.Consent
	link, err := flow.NewLink(ctx, req.Merchant, req.ReturnURL, req.CallbackHost)
	if err != nil {
		status := http.StatusInternalServerError
		var ce *oauth.ConsentError
		var le *oauth.LinkLimitError
		switch {
		case errors.As(err, &le):
			status = http.StatusTooManyRequests
		case errors.As(err, &ce) && (ce.Reason == oauth.ReasonReturnURL || ce.Reason == oauth.ReasonWrongCallback):
			status = http.StatusBadRequest
		}
		return LinkResponse{}, status, err
	}
	return LinkResponse{Merchant: req.Merchant, Provider: flow.Provider(), URL: link.URL, Expires: link.Expires.UTC()}, 0, nil
}

// setRetryAfter sets Retry-After (whole seconds, rounded up) when err is a
// link limit.
func setRetryAfter(w http.ResponseWriter, err error) {
	var le *oauth.LinkLimitError
	if errors.As(err, &le) {
		w.Header().Set("Retry-After", strconv.FormatInt(retryAfterSeconds(le.RetryAfter), 10))
	}
}

// retryAfterSeconds is d in whole seconds, rounded up, at least 1.
func retryAfterSeconds(d time.Duration) int64 {
	return max(1, int64((d+time.Second-1)/time.Second))
}

// linkError writes a JSON error: {"error": code, "message": msg}, and
// "retry_after" (seconds) when Retry-After is set.
func linkError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	body := map[string]any{"error": code, "message": msg}
	if ra, err := strconv.Atoi(w.Header().Get("Retry-After")); err == nil {
		body["retry_after"] = ra
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}

// consentMetrics count consent steps.
type consentMetrics struct {
	steps *prometheus.CounterVec
}

func (m *consentMetrics) Destruct() error { return nil }

// consentMetricsKey is the key of the consent metrics in metricsPool.
const consentMetricsKey = "consent metrics"

// loadConsentMetrics returns the shared consent counter, registered in
// registry: caddy_token_broker_consent_steps_total{provider, step,
// outcome}, step link, start or callback, outcome ok or a refusal reason.
func loadConsentMetrics(registry *prometheus.Registry) (*consentMetrics, error) {
	val, _, err := metricsPool.LoadOrNew(consentMetricsKey, func() (caddy.Destructor, error) {
		return &consentMetrics{steps: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: "caddy", Subsystem: "token_broker", Name: "consent_steps_total",
			Help: "Merchant consent steps (link, start, callback) by outcome: ok or the refusal reason.",
		}, []string{"provider", "step", "outcome"})}, nil
	})
	if err != nil {
		return nil, err
	}
	m := val.(*consentMetrics)
	if registry != nil {
		if err := registry.Register(m.steps); err != nil {
			var are prometheus.AlreadyRegisteredError
			if !errors.As(err, &are) || are.ExistingCollector != m.steps {
				return nil, fmt.Errorf("token_broker_consent: registering metrics: %w", err)
			}
		}
	}
	return m, nil
}

// Cleanup releases the handler's hold on the shared metrics.
func (c *Consent) Cleanup() error {
	if c.metrics != nil {
		_, err := metricsPool.Delete(consentMetricsKey)
		return err
	}
	return nil
}

func parseConsentCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var c Consent
	err := c.UnmarshalCaddyfile(h.Dispenser)
	return &c, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	token_broker_consent [<matcher>] [<provider>] {
//	    links
//	    partner   <name>
//	    logo      <data: URI | /path/on/the/site>
//	    accent    "<#rrggbb>"   (quoted: an unquoted # starts a comment)
//	    lang      <en|de|fr>
//	    templates <directory>
//	}
//
// The provider is required without links; partner, logo, accent, lang
// and templates (the consent pages) only go with a provider.
func (c *Consent) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		c.Provider = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		if err := once(d, seen); err != nil {
			return err
		}
		switch d.Val() {
		case "links":
			if err := noArgs(d); err != nil {
				return err
			}
			c.Links = true
		case "partner", "logo", "accent", "lang", "templates":
			name := d.Val()
			if !d.NextArg() {
				if name == "accent" {
					return d.Err(`accent needs a CSS hex colour, quoted: accent "#1f5fbf" (an unquoted # starts a comment)`)
				}
				return d.ArgErr()
			}
			v := d.Val()
			if d.NextArg() {
				return d.Errf("%s takes one value (quote a value with spaces)", name)
			}
			switch name {
			case "partner":
				c.Partner = v
			case "logo":
				c.Logo = v
			case "accent":
				c.Accent = v
			case "lang":
				c.Lang = v
			case "templates":
				c.Templates = v
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
	}
	if c.Provider == "" && !c.Links {
		return d.Err("token_broker_consent needs the provider's name (or the links subdirective)")
	}
	return nil
}

// Interface guards.
var (
	_ caddyhttp.MiddlewareHandler = (*Consent)(nil)
	_ caddy.Provisioner           = (*Consent)(nil)
	_ caddy.CleanerUpper          = (*Consent)(nil)
	_ caddyfile.Unmarshaler       = (*Consent)(nil)
)

func zapMerchant(m string) zap.Field { return zap.String("merchant", m) }
func zapProvider(p string) zap.Field { return zap.String("provider", p) }
