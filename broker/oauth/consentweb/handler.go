// Package consentweb serves the merchants' consent (the OAuth
// authorization-code flow of broker/oauth) over plain net/http: the
// public start, callback and result steps, the consent-link API, and
// the merchants' consent state.
//
// On the public callback site a Handler serves, under any path prefix:
//
//	GET  …/start?link=…   the start page of a consent link: whose consent it is and a button that
//	                      posts the link to …/start. It changes nothing (no state, no request to
//	                      the provider), so that a mail or chat scanner fetching the link (HEAD
//	                      too) leaves it usable
//	POST …/start          form field link: a same-origin post only (http.CrossOriginProtection);
//	                      start the authorization request, set the browser's consent cookie,
//	                      redirect to the provider. The link stays usable until a callback
//	                      consumes it: starting it again (a second tab, a double click) starts
//	                      another authorization request
//	GET  …/callback       the provider's redirect: check the state and that the browser holds its
//	                      cookie, consume the link (a callback whose link another one consumed
//	                      first gets unknown_state, as a used link; a failed exchange or save puts
//	                      the link back), exchange the code, store the refresh
//	                      token, redirect to the app's return URL with merchant and outcome (ok or
//	                      the refusal reason; with outcome provider_error, also error, the
//	                      provider's error code); without a return URL, redirect to …/done.
//	                      While the bank cannot be discovered, or it very likely did not process the
//	                      code exchange (oauth.ReasonRetryCallback), the retry_callback page (503,
//	                      Retry-After), the state kept for the reload of the same URL
//	GET  …/done?result=…  the outcome page of a callback, the same on every load for an hour
//
// With Options.Links (on the localhost sidecar site) it serves instead:
//
//	POST …/links  {"merchant": "acme", "return_url": "https://app…", "callback_host": "cb1…"}
//	              → {"url": "https://cb1…/consent/start?link=…", "expires": "…"}
//
// Every other path, and every refusal, gets a page of broker/oauth/consentpage.
// Each step is counted, traced under the request's span and logged,
// never with a code, token, link or state.
package consentweb

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/trace"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/callers"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentpage"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/spans"
)

// Options are the parts of a Handler.
type Options struct {
	// Provider is the provider (in Registry) whose consents the handler
	// runs. Required without Links; with Links it is optional and only
	// checked (links are for the merchant's provider).
	Provider string
	// Links serves the consent-link API instead of start and callback.
	Links bool
	// Registry holds the merchants and their providers' consent flows.
	Registry *config.Registry
	// Broker's cached tokens of a merchant are dropped, and its
	// remembered consent_required forgotten, once a callback stores the
	// merchant's refresh token.
	Broker *broker.Broker
	// Gate admits the requests of the links API. Its zero value admits
	// any caller, for any merchant, on a loopback Host only.
	Gate CallerGate
	// Pages renders the consent pages.
	Pages *consentpage.Renderer
	// Results keeps the outcomes of callbacks for …/done.
	Results *consentpage.Results
	// Steps counts the steps by provider, step and outcome.
	Steps *prometheus.CounterVec
	// Logger logs each step's outcome.
	Logger *zap.Logger
	// Consented, when set, is told of each consent completed: a callback
	// stored the merchant's refresh token.
	Consented func(provider, merchant string)
}

// Handler serves the consent steps of one provider, or the links API.
// It is safe for concurrent use.
type Handler struct {
	o     Options
	flow  *oauth.AuthCode
	bank  string                      // the provider's display name
	posts *http.CrossOriginProtection // admits same-origin posts to …/start only
}

// New checks that the registry has the consent flow the handler serves.
func New(o Options) (*Handler, error) {
	reg := o.Registry
	if reg == nil {
		return nil, fmt.Errorf("provider %q: the token_broker app has no registry (set its config)", o.Provider)
	}
	h := &Handler{o: o, posts: http.NewCrossOriginProtection()}
	if o.Provider == "" {
		if reg.HasConsent() {
			return h, nil
		}
		return nil, fmt.Errorf("links: no provider of the registry %s has a consent table ([providers.NAME.consent])", reg.Path)
	}
	p := reg.Providers[o.Provider]
	switch {
	case p == nil:
		return nil, fmt.Errorf("provider %q is not in the registry %s", o.Provider, reg.Path)
	case p.Consent == nil:
		return nil, fmt.Errorf("provider %q (%s line %d) has no consent table: add [providers.%s.consent] with redirect_uris", o.Provider, reg.Path, p.Line, o.Provider)
	}
	for _, u := range p.Consent.RedirectURIs() {
		if pu, err := url.Parse(u); err == nil && pu.Scheme == "http" && !callers.IsLoopback(pu.Host) {
			return nil, fmt.Errorf("provider %q (%s line %d): redirect_uri %q is plain HTTP on a host that is not loopback: the code would travel in clear, and browsers drop the Secure consent cookie so that every callback would be refused: use https (TLS may end at a proxy in front)", o.Provider, reg.Path, p.Line, u)
		}
	}
	h.flow = p.Consent
	h.bank = p.DisplayName
	return h, nil
}

// ServeHTTP serves start (GET and HEAD: the start page; POST: the
// start), callback, done or links; everything else is a not_found page.
// Every answer sets Cache-Control: no-store and Referrer-Policy:
// no-referrer.
func (c *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	h := w.Header()
	h.Set("Cache-Control", "no-store")
	h.Set("Referrer-Policy", "no-referrer")
	h.Set("X-Content-Type-Options", "nosniff")
	path := r.URL.Path
	links := c.o.Links
	switch {
	case links && strings.HasSuffix(path, "/links") && r.Method == http.MethodPost:
		c.link(w, r)
	case !links && strings.HasSuffix(path, "/start") && (r.Method == http.MethodGet || r.Method == http.MethodHead):
		c.startPage(w, r)
	case !links && strings.HasSuffix(path, "/start") && r.Method == http.MethodPost:
		c.start(w, r)
	case !links && strings.HasSuffix(path, "/callback") && r.Method == http.MethodGet:
		c.callback(w, r)
	case !links && strings.HasSuffix(path, "/done") && r.Method == http.MethodGet:
		c.result(w, r)
	default:
		c.render(w, r, consentpage.Page{Name: consentpage.PageNotFound})
	}
}

// render writes a consent page, with the merchant's and the provider's
// display names from the registry.
func (c *Handler) render(w http.ResponseWriter, r *http.Request, p consentpage.Page) {
	if p.MerchantID != "" {
		if m, _, ok := c.o.Registry.Merchant(p.MerchantID); ok {
			p.Merchant = m.DisplayName
		}
	}
	p.Bank = c.bank
	c.o.Pages.Render(w, r.Header.Get("Accept-Language"), p)
}

// resultRetryAfter is the Retry-After of a result page whose result
// cannot be read because the consent storage failed.
const resultRetryAfter = 30 * time.Second

// result serves …/done: the page of a callback's stored result; gone
// when there is none (or it has expired), result_unavailable (503, with
// Retry-After) when the consent storage cannot be read, the error logged
// and never shown; nothing when the browser left meanwhile.
func (c *Handler) result(w http.ResponseWriter, r *http.Request) {
	res, err := c.o.Results.Load(r.Context(), r.URL.Query().Get("result"))
	switch {
	case errors.Is(err, oauth.ErrUnknownPending):
		c.render(w, r, consentpage.Page{Name: consentpage.PageGone})
		return
	case err != nil && r.Context().Err() != nil:
		return // the browser left while the result was read: nobody to answer
	case err != nil:
		c.o.Logger.Warn("consent result page: the consent storage cannot be read; the page asks the browser to reload",
			zap.String("provider", c.o.Provider), zap.Error(err))
		w.Header().Set("Retry-After", strconv.FormatInt(retryAfterSeconds(resultRetryAfter), 10))
		c.render(w, r, consentpage.Page{Name: consentpage.PageResultUnavailable})
		return
	}
	c.render(w, r, consentpage.Page{Name: consentpage.ForOutcome(res.Outcome), MerchantID: res.MerchantID,
		Outcome: res.Outcome, ProviderCode: res.ProviderCode})
}

// outcomeOf is the outcome of a consent step: "ok", the
// *oauth.ConsentError's reason (and the provider's error code of a
// provider_error), or "error".
func outcomeOf(err error) (outcome, code string) {
	if err == nil {
		return "ok", ""
	}
	if ce, ok := errors.AsType[*oauth.ConsentError](err); ok {
		return ce.Reason, ce.Code
	}
	return "error", ""
}

// span starts a span for a consent step under the request's span.
func (c *Handler) span(r *http.Request, provider, step string) (context.Context, trace.Span) {
	parent := trace.SpanFromContext(r.Context())
	return parent.TracerProvider().Tracer(spans.TracerName).Start(r.Context(), "token_broker.consent."+step,
		trace.WithAttributes(spans.Provider.String(provider)))
}

// Consent steps, as logged and counted.
const (
	// StepLink is the creation of a consent link (the links route or the
	// admin API).
	StepLink = "link"
	// StepStart is the start of a consent in the merchant's browser.
	StepStart = "start"
	// StepCallback is the provider's redirect back with the outcome.
	StepCallback = "callback"
)

// done records a step's outcome: metric, span and log (LogStep).
func (c *Handler) done(span trace.Span, provider, step, merchant string, err error) {
	outcome, _ := outcomeOf(err)
	c.o.Steps.WithLabelValues(provider, step, outcome).Inc()
	span.SetAttributes(spans.Merchant.String(merchant), spans.Outcome.String(outcome))
	if err != nil {
		span.SetStatus(codes.Error, outcome)
	}
	LogStep(c.o.Logger, provider, step, merchant, err)
	span.End()
}

// LogStep logs the outcome of a consent step (StepLink, StepStart,
// StepCallback) of a merchant at a provider, the same whichever way it
// came (a link from the links route or from the admin API): "consent
// step" for a success (Info), "consent refused" (Warn), "consent failed:
// …" when the provider refused the authorization request (Error, the
// operator must fix the provider's configuration), "consent link
// refused" for a link limit (Debug: a flood of these is counted, not
// logged one by one). Fields: provider, step, merchant, outcome (ok or
// the refusal reason), and error (and provider_error) on a failure;
// never a code, token, link or state.
func LogStep(logger *zap.Logger, provider, step, merchant string, err error) {
	outcome, code := outcomeOf(err)
	fields := []zap.Field{zap.String("provider", provider), zap.String("step", step), zap.String("merchant", merchant), zap.String("outcome", outcome)}
	var le *oauth.LinkLimitError
	switch {
	case errors.As(err, &le):
		logger.Debug("consent link refused", append(fields, zap.String("error", err.Error()))...)
	case outcome == oauth.ReasonProviderError:
		logger.Error("consent failed: the provider refused the authorization request; fix the provider's configuration",
			append(fields, zap.String("provider_error", code), zap.String("error", err.Error()))...)
	case err != nil:
		logger.Warn("consent refused", append(fields, zap.String("error", err.Error()))...)
	default:
		logger.Info("consent step", fields...)
	}
}

// startPage serves GET (and HEAD) …/start?link=…: the start page of a
// link that can be used, else the page of its refusal. It reads the link
// and the provider's authorization endpoint (for the page's CSP; a
// discovery document is fetched once) and changes nothing: no state, no
// cookie, no authorization or token request.
func (c *Handler) startPage(w http.ResponseWriter, r *http.Request) {
	link := r.URL.Query().Get("link")
	rec, err := c.flow.CheckLink(r.Context(), link, r.Host, c.serves())
	if err != nil {
		outcome, code := outcomeOf(err)
		if outcome == oauth.ReasonStoreFailure {
			c.o.Logger.Warn("consent start page: the consent storage cannot be read", zap.String("provider", c.o.Provider),
				zap.String("merchant", rec.Merchant), zap.Error(err))
		}
		c.render(w, r, consentpage.Page{Name: consentpage.ForStart(link, outcome), MerchantID: rec.Merchant, Outcome: outcome, ProviderCode: code})
		return
	}
	bank, err := c.flow.AuthorizationOrigin(r.Context())
	if err != nil {
		outcome, _ := outcomeOf(err)
		c.o.Logger.Warn("consent start page: the provider's authorization endpoint is not known (discovery failed)", zap.String("provider", c.o.Provider),
			zap.String("merchant", rec.Merchant), zap.Error(err))
		SetRetryAfter(w, err)
		c.render(w, r, consentpage.Page{Name: consentpage.PageUnavailable, MerchantID: rec.Merchant, Outcome: outcome})
		return
	}
	c.render(w, r, consentpage.Page{Name: consentpage.PageStart, MerchantID: rec.Merchant, Link: link, BankOrigin: bank})
}

// maxStartForm is the largest body of a POST …/start, in bytes.
const maxStartForm = 4 << 10

// ReasonCrossSite is the refusal of a POST …/start from another origin:
// a browser's Sec-Fetch-Site says it is not same-origin, or, from a
// browser without Sec-Fetch-Site, its Origin does not match the request's
// Host (http.CrossOriginProtection).
const ReasonCrossSite = "cross_site"

// start serves POST …/start (the start page's form): it starts the
// authorization request of the link in the form field link, binds the
// browser with its consent cookie (the one it has, or a new one) and
// redirects to the provider. A post from another origin is refused with
// ReasonCrossSite (the cross_site page), nothing started.
func (c *Handler) start(w http.ResponseWriter, r *http.Request) {
	provider := c.o.Provider
	ctx, span := c.span(r, provider, StepStart)
	if err := c.posts.Check(r); err != nil {
		c.done(span, provider, StepStart, "", &oauth.ConsentError{Reason: ReasonCrossSite, Provider: provider,
			Err: fmt.Errorf("the start was posted from another site (%w): nothing was started; the merchant must open the consent link and press its button", err)})
		c.render(w, r, consentpage.Page{Name: consentpage.PageCrossSite, Outcome: ReasonCrossSite})
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, maxStartForm)
	_ = r.ParseForm() // a body that does not parse has no link: the missing page
	link := r.PostForm.Get("link")
	name, secure := browserCookie(r)
	browser := oauth.NewBrowser() // unless the browser has a well-formed one
	if ck, err := r.Cookie(name); err == nil && oauth.WellFormed(ck.Value) {
		browser = oauth.Browser(ck.Value)
	}
	authURL, rec, err := c.flow.Start(ctx, link, r.Host, browser, c.serves())
	c.done(span, provider, StepStart, rec.Merchant, err)
	if err != nil {
		outcome, code := outcomeOf(err)
		SetRetryAfter(w, err)
		c.render(w, r, consentpage.Page{Name: consentpage.ForStart(link, outcome),
			MerchantID: rec.Merchant, Outcome: outcome, ProviderCode: code})
		return
	}
	http.SetCookie(w, &http.Cookie{Name: name, Value: string(browser), Path: "/", MaxAge: int(oauth.StateTTL / time.Second),
		Secure: secure, HttpOnly: true, SameSite: http.SameSiteLaxMode})
	http.Redirect(w, r, authURL, http.StatusSeeOther)
}

// serves says whether the registry still has a merchant at the
// handler's provider: a link or state made before a reload may name one
// it removed or moved.
func (c *Handler) serves() oauth.Serves {
	return func(merchant string) bool { return ProviderOf(c.o.Registry, merchant) == c.o.Provider }
}

// callback finishes the consent and sends the browser back to the app.
func (c *Handler) callback(w http.ResponseWriter, r *http.Request) {
	provider := c.o.Provider
	ctx, span := c.span(r, provider, StepCallback)
	var browser oauth.Browser // none: refused if the state is bound
	name, _ := browserCookie(r)
	if ck, cerr := r.Cookie(name); cerr == nil {
		browser = oauth.Browser(ck.Value)
	}
	res, err := c.flow.Callback(ctx, r.Host, r.URL.Query(), browser, c.serves())
	c.done(span, provider, StepCallback, res.Merchant, err)
	if err == nil {
		RefreshTokenStored(c.o.Broker, provider, res.Merchant)
		if c.o.Consented != nil {
			c.o.Consented(provider, res.Merchant)
		}
		c.o.Logger.Info("refresh token stored by consent", zap.String("provider", provider),
			zap.String("merchant", res.Merchant), zap.String("fingerprint", res.Fingerprint))
	}
	outcome, code := outcomeOf(err)
	if res.ReturnURL != "" {
		params := url.Values{oauth.ReturnMerchant: {res.Merchant}, oauth.ReturnOutcome: {outcome}}
		if code != "" { // provider_error: the provider's error code
			params.Set(oauth.ReturnError, code)
		}
		http.Redirect(w, r, httpclient.WithQuery(res.ReturnURL, params), http.StatusSeeOther)
		return
	}
	if res.Merchant != "" {
		// The outcome of a known state goes to …/done, which shows it
		// again on a reload (the state is consumed by now).
		id, serr := c.o.Results.Save(ctx, consentpage.Result{MerchantID: res.Merchant, Outcome: outcome, ProviderCode: code})
		if serr == nil {
			// Relative, so that it resolves against the path the browser
			// used, whatever a handle_path stripped.
			w.Header().Set("Location", "done?"+url.Values{"result": {id}}.Encode())
			w.WriteHeader(http.StatusSeeOther)
			return
		}
		c.o.Logger.Warn("consent result not stored: its page is shown once", zap.String("provider", provider),
			zap.String("merchant", res.Merchant), zap.Error(serr))
	}
	// A kept state: the same callback, reloaded after its Retry-After,
	// completes the consent.
	SetRetryAfter(w, err)
	c.render(w, r, consentpage.Page{Name: consentpage.ForOutcome(outcome), MerchantID: res.Merchant, Outcome: outcome, ProviderCode: code})
}

// RefreshTokenStored drops br's cached access tokens of a merchant at a
// provider and its remembered consent_required, once it has a new
// refresh token (by consent or through the admin API), so that its next
// call refreshes at once.
func RefreshTokenStored(br *broker.Broker, provider, merchant string) {
	br.PurgeMerchant(merchant)
	br.ForgetFailures(func(err error) bool {
		var cr *oauth.ConsentRequiredError
		return errors.As(err, &cr) && cr.Merchant == merchant && cr.Provider == provider
	})
}
