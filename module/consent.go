package module

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"html"
	"io"
	"io/fs"
	"net/http"
	"net/url"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/certmagic"
	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
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
//	GET  …/start?link=…   consume a one-time consent link, redirect to the provider
//	GET  …/callback       the provider's redirect: check, exchange the code, store the refresh token,
//	                      redirect to the app's return URL with merchant and outcome
//	                      (ok or the refusal reason; with outcome provider_error, also
//	                      error, the provider's error code)
//
// With links (on the localhost sidecar site) it serves instead:
//
//	POST …/links  {"merchant": "acme", "return_url": "https://app…", "callback_host": "cb1…"}
//	              → {"url": "https://cb1…/consent/start?link=…", "expires": "…"}
//
// where the app's caller policy, when configured, decides which merchants a
// caller may ask links for. Everything else is 404. Every answer sets
// Cache-Control: no-store and Referrer-Policy: no-referrer; the requests are
// left out of Caddy's access log (their URLs hold a code, a state or a
// link), and the handler logs each outcome without them.
//
// The consents in progress live in Caddy's storage, sealed: several
// instances with several callback domains share them when they share the
// storage (as they must for the refresh tokens), and they survive reloads.
type Consent struct {
	// Provider is the name of the provider (in the registry) whose consents
	// this handler runs. Required.
	Provider string `json:"provider,omitempty"`

	// Links serves the consent-link API instead of start and callback. Put
	// it on the localhost sidecar site, never on the public one.
	Links bool `json:"links,omitempty"`

	app     *App
	flow    *oauth.AuthCode
	reg     *config.Registry
	logger  *zap.Logger
	metrics *consentMetrics
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
	if c.Provider == "" {
		return errors.New("token_broker_consent: provider is required: name the refresh_token provider whose merchants consent here")
	}
	if c.reg == nil {
		return fmt.Errorf("token_broker_consent: provider %q: the token_broker app has no registry (set its config)", c.Provider)
	}
	p := c.reg.Providers[c.Provider]
	switch {
	case p == nil:
		return fmt.Errorf("token_broker_consent: provider %q is not in the registry %s", c.Provider, c.reg.Path)
	case p.Consent == nil:
		return fmt.Errorf("token_broker_consent: provider %q (%s line %d) has no consent table: add [providers.%s.consent] with redirect_uris", c.Provider, c.reg.Path, p.Line, c.Provider)
	}
	c.flow = p.Consent
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
	default:
		page(w, http.StatusNotFound, "Not found.")
	}
	return nil
}

// page writes a plain HTML page.
func page(w http.ResponseWriter, status int, msg string) {
	h := w.Header()
	h.Set("Content-Type", "text/html; charset=utf-8")
	h.Set("Content-Security-Policy", "default-src 'none'")
	w.WriteHeader(status)
	fmt.Fprintf(w, "<!doctype html><meta charset=utf-8><title>Consent</title><p>%s</p>\n", html.EscapeString(msg))
}

// span starts a span for a consent step under the request's span.
func (c *Consent) span(r *http.Request, step string) (context.Context, trace.Span) {
	parent := trace.SpanFromContext(r.Context())
	return parent.TracerProvider().Tracer(tracerName).Start(r.Context(), "token_broker.consent."+step,
		trace.WithAttributes(attrProvider.String(c.Provider)))
}

// done records a step's outcome: metric, span and log, never a code,
// token, link or state.
func (c *Consent) done(span trace.Span, step, merchant string, err error) {
	outcome := "ok"
	var ce *oauth.ConsentError
	switch {
	case errors.As(err, &ce):
		outcome = ce.Reason
	case err != nil:
		outcome = "error"
	}
	c.metrics.steps.WithLabelValues(c.Provider, step, outcome).Inc()
	span.SetAttributes(attrMerchant.String(merchant), attrOutcome.String(outcome))
	fields := []zap.Field{zap.String("provider", c.Provider), zap.String("step", step), zap.String("merchant", merchant), zap.String("outcome", outcome)}
	switch {
	case ce != nil && ce.Reason == oauth.ReasonProviderError:
		// Not the merchant's doing: the error says what the operator
		// should check or set.
		span.SetStatus(codes.Error, outcome)
		c.logger.Error("consent failed: the provider refused the authorization request; fix the provider's configuration",
			append(fields, zap.String("provider_error", ce.Code), zap.String("error", err.Error()))...)
	case err != nil:
		span.SetStatus(codes.Error, outcome)
		c.logger.Warn("consent refused", append(fields, zap.String("error", err.Error()))...)
	default:
		c.logger.Info("consent step", fields...)
	}
	span.End()
}

// start consumes a consent link and redirects to the provider.
func (c *Consent) start(w http.ResponseWriter, r *http.Request) {
	ctx, span := c.span(r, "start")
	authURL, rec, err := c.flow.Start(ctx, r.URL.Query().Get("link"), r.Host)
	c.done(span, "start", rec.Merchant, err)
	if err != nil {
		page(w, http.StatusBadRequest, consentMessage(err))
		return
	}
	http.Redirect(w, r, authURL, http.StatusSeeOther)
}

// callback finishes the consent and sends the browser back to the app.
func (c *Consent) callback(w http.ResponseWriter, r *http.Request) {
	ctx, span := c.span(r, "callback")
	res, err := c.flow.Callback(ctx, r.Host, r.URL.Query())
	c.done(span, "callback", res.Merchant, err)
	if err == nil {
		c.app.broker.PurgeMerchant(res.Merchant)
		forgetConsentRequired(c.app.broker, c.Provider, res.Merchant)
		c.logger.Info("refresh token stored by consent", zap.String("provider", c.Provider),
			zap.String("merchant", res.Merchant), zap.String("fingerprint", res.Fingerprint))
	}
	if res.ReturnURL != "" {
		outcome := "ok"
		params := url.Values{"merchant": {res.Merchant}}
		var ce *oauth.ConsentError
		if errors.As(err, &ce) {
			outcome = ce.Reason
			if ce.Code != "" { // provider_error: the provider's error code
				params.Set("error", ce.Code)
			}
		} else if err != nil {
			outcome = "error"
		}
		params.Set("outcome", outcome)
		http.Redirect(w, r, withParams(res.ReturnURL, params), http.StatusSeeOther)
		return
	}
	if err != nil {
		page(w, http.StatusBadRequest, consentMessage(err))
		return
	}
	page(w, http.StatusOK, "Thank you: your consent is recorded. You can close this window.")
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

// consentMessage is the page text of a refused step: what happened and
// what to do, without the provider's or merchant's details.
func consentMessage(err error) string {
	var ce *oauth.ConsentError
	if !errors.As(err, &ce) {
		return "The consent could not be completed. Please ask for a new consent link."
	}
	switch ce.Reason {
	case oauth.ReasonExpired:
		return "This consent link has expired. Please ask for a new one."
	case oauth.ReasonUnknownState:
		return "This consent link is unknown or was already used. Please ask for a new one."
	case oauth.ReasonDenied:
		return "The consent was not given at the bank."
	case oauth.ReasonProviderError:
		return "The bank could not process this consent request (" + ce.Code + "). This is a configuration problem of the service, not a decision of yours; its operator has been told. Please try again later with a new consent link."
	case oauth.ReasonProviderFailure, oauth.ReasonStoreFailure:
		return "The consent service is unavailable. Please try again later with a new consent link."
	}
	return "The consent could not be completed (" + ce.Reason + "). Please ask for a new consent link."
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
	if status, code, err := c.app.site.check(r); status != 0 { // site.go: as the token_broker handler
		c.logger.Warn("consent link refused", zap.String("error_code", code), zap.Error(err))
		linkError(w, status, code, message(code, ""))
		return
	}
	var req LinkRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<10)).Decode(&req); err != nil {
		linkError(w, http.StatusBadRequest, "bad_request", `the body must be JSON: {"merchant": "...", "return_url": "..."}`)
		return
	}
	if pol := c.app.Callers; pol != nil {
		sub, cerr := pol.authenticate(r)
		if cerr != nil {
			linkError(w, cerr.status, cerr.code, "the caller must present a valid JWT from the trusted issuer as a Bearer token")
			return
		}
		if !pol.allows(sub, req.Merchant) {
			linkError(w, http.StatusForbidden, "merchant_not_allowed", fmt.Sprintf("caller %q may not act for merchant %q", sub, req.Merchant))
			return
		}
	}
	ctx, span := c.span(r, "link")
	link, status, err := createLink(ctx, c.reg, c.flow, req)
	c.done(span, "link", req.Merchant, err)
	if err != nil {
		code := "bad_request"
		var ce *oauth.ConsentError
		if errors.As(err, &ce) {
			code = ce.Reason
		}
		linkError(w, status, code, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(link)
}

// createLink checks that the merchant consents through flow's provider and
// creates its link; status is the HTTP status of a failure.
func createLink(ctx context.Context, reg *config.Registry, flow *oauth.AuthCode, req LinkRequest) (LinkResponse, int, error) {
	m := reg.Merchants[req.Merchant]
	if m == nil {
		return LinkResponse{}, http.StatusNotFound, fmt.Errorf("merchant %q is not in the registry %s", req.Merchant, reg.Path)
	}
	if m.Provider != flow.Provider() {
		return LinkResponse{}, http.StatusConflict, fmt.Errorf("merchant %q belongs to provider %q, not %q", req.Merchant, m.Provider, flow.Provider())
	}
	link, err := flow.NewLink(ctx, req.Merchant, req.ReturnURL, req.CallbackHost)
	if err != nil {
		status := http.StatusInternalServerError
		var ce *oauth.ConsentError
		if errors.As(err, &ce) && (ce.Reason == oauth.ReasonReturnURL || ce.Reason == oauth.ReasonWrongCallback) {
			status = http.StatusBadRequest
		}
		return LinkResponse{}, status, err
	}
	return LinkResponse{Merchant: req.Merchant, Provider: flow.Provider(), URL: link.URL, Expires: link.Expires.UTC()}, 0, nil
}

func linkError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "message": msg})
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

// storagePending keeps consents in progress in Caddy's storage, under
// token_broker/consents/. Take holds the storage lock of the key, so a
// link or state is used once across the instances sharing the storage.
type storagePending struct {
	s certmagic.Storage
}

const pendingPrefix = "token_broker/consents/"

// Put implements oauth.PendingStore.
func (st storagePending) Put(ctx context.Context, key string, val []byte, _ time.Time) error {
	return st.s.Store(ctx, pendingPrefix+key, val)
}

// Take implements oauth.PendingStore.
func (st storagePending) Take(ctx context.Context, key string) ([]byte, error) {
	name := pendingPrefix + key
	if err := st.s.Lock(ctx, name+".lock"); err != nil {
		return nil, err
	}
	defer func() { _ = st.s.Unlock(context.WithoutCancel(ctx), name+".lock") }()
	b, err := st.s.Load(ctx, name)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, oauth.ErrUnknownPending
	}
	if err != nil {
		return nil, err
	}
	if err := st.s.Delete(ctx, name); err != nil {
		return nil, fmt.Errorf("consuming the consent record: %w", err)
	}
	return b, nil
}

var _ oauth.PendingStore = storagePending{}

func parseConsentCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var c Consent
	err := c.UnmarshalCaddyfile(h.Dispenser)
	return &c, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	token_broker_consent [<matcher>] <provider> {
//	    links
//	}
func (c *Consent) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if !d.NextArg() {
		return d.Err("token_broker_consent needs the provider's name")
	}
	c.Provider = d.Val()
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
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
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
