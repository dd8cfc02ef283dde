// Package module is the Caddy adapter of the token broker: the
// http.handlers.token_broker handler, its Caddyfile directive and its
// placeholders. It translates Caddy configuration into broker bindings; the
// decisions are made in package broker.
package module

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"strconv"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// interactionIDHeader is x-fapi-interaction-id in canonical form.
const interactionIDHeader = "X-Fapi-Interaction-Id"

// DefaultMerchant is the default merchant selector.
const DefaultMerchant = "{http.request.header.X-Merchant-Id}"

// Handler obtains a scoped OAuth token for the merchant a request is for and
// sets it as "Authorization: Bearer <token>" before the request goes on to
// the next handler (normally reverse_proxy). Tokens come from the broker's
// cache, shared by every token_broker handler with the same broker settings
// and kept across config reloads, or from the merchant's provider.
//
// Before the request goes on, the merchant header (when the merchant comes
// from a header) and any Authorization header the caller sent are removed:
// nothing the caller sends can override the injected token.
//
// This handler sets these placeholders (never the token itself):
//
// Placeholder | Description
// ------------|-------------
// `{http.token_broker.merchant}` | The merchant the request is for
// `{http.token_broker.organisation}` | The merchant's organisation at the provider
// `{http.token_broker.provider}` | The provider's name in the registry
// `{http.token_broker.fingerprint}` | First 8 hex digits of the SHA-256 of the token
// `{http.token_broker.cache}` | How the token was found: hit, refresh, miss, shared
// `{http.token_broker.error}` | On failure, the error code sent to the caller
//
// Errors are answered with a JSON body {"error", "message", "merchant"}:
// 400 when the merchant is missing or malformed, 403 when it is not in the
// registry, 502 when the token API fails, 504 when it times out. With
// `errors caddy` they are returned as caddyhttp.Errors instead, for
// handle_errors routes.
type Handler struct {
	// Config is the path of a TOML merchant registry for this handler
	// only. Default: the registry of the token_broker app (the
	// `token_broker` global option).
	Config string `json:"config,omitempty"`

	// Merchant is a placeholder selecting the merchant a request is for.
	// Default: `{http.request.header.X-Merchant-Id}`.
	Merchant string `json:"merchant,omitempty"`

	// Scopes, when set, replace the merchant's default scopes on this
	// route (e.g. openbanking_aisp for /tpp/accounts*).
	Scopes []string `json:"scopes,omitempty"`

	// Header is the request header the token is set in, as
	// "Bearer <token>". Default: Authorization.
	Header string `json:"header,omitempty"`

	// Errors chooses how failures are answered: "json" (default) writes a
	// small JSON body; "caddy" returns a caddyhttp.Error so that the
	// server's handle_errors routes answer.
	Errors string `json:"errors,omitempty"`

	// InteractionID, when true, gives a request that carries no
	// x-fapi-interaction-id (UK Open Banking, FAPI) a new random UUID in
	// that header, so that the call can be followed end to end. One the
	// caller sent is passed on unchanged. Default false.
	InteractionID bool `json:"interaction_id,omitempty"`

	// RetryOn401 says which upstream 401 answers purge the token and retry
	// the request once with a new one: "invalid_token" (default: a 401
	// with `WWW-Authenticate: Bearer error="invalid_token"`), "any" (every
	// 401) or "off". A 403 never purges.
	RetryOn401 string `json:"retry_on_401,omitempty"`

	// RetryBodyLimit is the largest request body, in bytes, kept in memory
	// so that the request can be retried after a 401. Larger requests are
	// streamed and not retried. Default 65536.
	RetryBodyLimit int64 `json:"retry_body_limit,omitempty"`

	callers        *CallerPolicy
	bindings       map[string]*binding
	merchantHeader string // canonical header name when Merchant is a plain header placeholder
	header         string // canonical Header
	broker         *broker.Broker
	logger         *zap.Logger
	metrics        *handlerMetrics // see metrics.go
}

// binding is what the handler knows about one merchant on its route.
type binding struct {
	*broker.Binding
	provider string

	// Placeholder values boxed once, so that setting them on every
	// request does not allocate.
	merchantV, organisationV, providerV any
	// current caches, for the entry last served, its boxed fingerprint.
	current atomic.Pointer[servedEntry]
}

// servedEntry is what a binding precomputed for one cache entry.
type servedEntry struct {
	entry       *broker.Entry
	fingerprint any
}

func newBinding(b *broker.Binding, provider string) *binding {
	return &binding{Binding: b, provider: provider,
		merchantV: b.Request.Merchant, organisationV: b.Request.Organisation, providerV: provider}
}

// served returns the precomputed values of e, computing them when the
// binding's entry changed (a new token).
func (b *binding) served(e *broker.Entry) *servedEntry {
	if s := b.current.Load(); s != nil && s.entry == e {
		return s
	}
	s := &servedEntry{entry: e, fingerprint: e.Fingerprint()}
	b.current.Store(s)
	return s
}

// cacheResults are the boxed values of {http.token_broker.cache}.
var cacheResults = [...]any{broker.Hit: broker.Hit.String(), broker.RefreshAhead: broker.RefreshAhead.String(),
	broker.Miss: broker.Miss.String(), broker.Shared: broker.Shared.String(), broker.Adopted: broker.Adopted.String()}

// CaddyModule returns the Caddy module information.
func (Handler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_broker",
		New: func() caddy.Module { return new(Handler) },
	}
}

// Provision builds one broker binding per merchant of the registry, with
// this route's scopes, and attaches the handler to the app's token cache.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	appIface, err := ctx.App("token_broker")
	if err != nil {
		return err
	}
	app := appIface.(*App)
	h.broker = app.broker
	h.callers = app.Callers
	if h.Merchant == "" {
		h.Merchant = DefaultMerchant
	}
	if name, ok := strings.CutPrefix(h.Merchant, "{http.request.header."); ok && strings.HasSuffix(name, "}") && !strings.ContainsAny(name[:len(name)-1], "{}") {
		h.merchantHeader = textproto.CanonicalMIMEHeaderKey(name[:len(name)-1])
	}
	if h.Header == "" {
		h.Header = "Authorization"
	}
	h.header = textproto.CanonicalMIMEHeaderKey(h.Header)
	if h.Errors == "" {
		h.Errors = "json"
	}
	reg := app.registry
	if h.Config != "" {
		if reg, err = loadRegistry(ctx, h.Config); err != nil {
			return err
		}
	}
	if reg == nil {
		return errors.New("token_broker: no merchant registry: set `config <file.toml>` in the token_broker global option (or in this handler)")
	}
	h.bindings = make(map[string]*binding, len(reg.Merchants))
	for id, m := range reg.Merchants {
		b, err := reg.Binding(id, h.Scopes)
		if err != nil {
			return fmt.Errorf("token_broker: %s: %w", reg.Path, err)
		}
		b.Observer = h
		h.bindings[id] = newBinding(b, m.Provider)
	}
	h.instrument(app.metrics)
	return nil
}

// Validate checks the handler's configuration.
func (h *Handler) Validate() error {
	if h.Errors != "json" && h.Errors != "caddy" {
		return fmt.Errorf("token_broker: errors %q must be json or caddy", h.Errors)
	}
	// Caddy's logs redact these two headers only: a token in any other
	// header would be logged in clear by reverse_proxy at debug level.
	if c := textproto.CanonicalMIMEHeaderKey(h.Header); h.Header != "" && c != "Authorization" && c != "Proxy-Authorization" {
		return fmt.Errorf("token_broker: header %q: the token can only be set in Authorization or Proxy-Authorization, which Caddy's logs redact", h.Header)
	}
	switch h.RetryOn401 {
	case "", "invalid_token", "any", "off":
	default:
		return fmt.Errorf("token_broker: retry_on_401 %q must be invalid_token, any or off", h.RetryOn401)
	}
	if h.RetryBodyLimit < 0 {
		return fmt.Errorf("token_broker: retry_body_limit %d must not be negative", h.RetryBodyLimit)
	}
	return nil
}

// ServeHTTP sets the merchant's token on the request and calls next.
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	var caller string
	if h.callers != nil {
		sub, cerr := h.callers.authenticate(r)
		if cerr != nil {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			return h.fail(w, repl, cerr.status, cerr.code, "", cerr.err)
		}
		caller = sub
		r.Header.Del(h.callers.header)
	}
	merchant, status, code := h.merchantOf(r, repl)
	if status != 0 {
		return h.fail(w, repl, status, code, "", nil)
	}
	if h.callers != nil && !h.callers.allows(caller, merchant) {
		return h.fail(w, repl, http.StatusForbidden, "caller_forbidden", merchant, nil)
	}
	b, ok := h.bindings[merchant]
	if !ok {
		return h.fail(w, repl, http.StatusForbidden, "unknown_merchant", merchant, nil)
	}
	e, res, err := h.token(r.Context(), b) // tracing.go: the token span
	if err != nil {
		status, code := classify(err)
		return h.fail(w, repl, status, code, merchant, err)
	}
	// The keys are canonical already: delete without canonicalising again.
	if h.merchantHeader != "" {
		delete(r.Header, h.merchantHeader)
	}
	delete(r.Header, "Authorization")
	served := b.served(e)
	// A slice of its own: later handlers may change header values in place.
	r.Header[h.header] = []string{e.Header()}

	repl.Set("http.token_broker.merchant", b.merchantV)
	repl.Set("http.token_broker.organisation", b.organisationV)
	repl.Set("http.token_broker.provider", b.providerV)
	repl.Set("http.token_broker.fingerprint", served.fingerprint)
	repl.Set("http.token_broker.cache", cacheResults[res])
	if h.InteractionID && len(r.Header[interactionIDHeader]) == 0 {
		r.Header[interactionIDHeader] = []string{uuid.NewString()}
	}
	return h.forward(w, r, next, b, e)
}

// merchantOf reads and checks the merchant of a request. A non-zero status
// means the request is refused with that status and error code.
func (h *Handler) merchantOf(r *http.Request, repl *caddy.Replacer) (string, int, string) {
	var merchant string
	if h.merchantHeader != "" {
		vals := r.Header[h.merchantHeader]
		if len(vals) > 1 {
			return "", http.StatusBadRequest, "ambiguous_merchant"
		}
		if len(vals) == 1 {
			merchant = vals[0]
		}
	} else {
		merchant = repl.ReplaceAll(h.Merchant, "")
	}
	switch {
	case merchant == "":
		return "", http.StatusBadRequest, "missing_merchant"
	case !config.ValidMerchantID(merchant):
		return "", http.StatusBadRequest, "invalid_merchant"
	}
	return merchant, 0, ""
}

// errorMessages are the messages sent to callers, by error code. They tell
// the caller what to do and reveal nothing about credentials or tokens.
var errorMessages = map[string]string{
	"missing_merchant":        "the request does not say which merchant it is for: set the merchant header (default X-Merchant-Id)",
	"ambiguous_merchant":      "the request names the merchant more than once: send one merchant header",
	"invalid_merchant":        "the merchant id is malformed: 1 to 128 ASCII letters, digits and . _ - : @",
	"unknown_merchant":        "this merchant is not in the token broker's registry",
	"token_unavailable":       "the provider's token API failed; the request was not forwarded",
	"token_timeout":           "the provider's token API did not answer in time; the request was not forwarded",
	"token_refused":           "the provider refused to issue a token for this merchant; check the merchant's organisation, scopes and the partner credentials",
	"client_gone":             "the request was cancelled while waiting for a token",
	"caller_unauthenticated":  "the caller must present a valid JWT from the trusted issuer, for this sidecar's audience, as a Bearer token",
	"caller_keys_unavailable": "the caller's JWT cannot be checked now: the issuer's keys are unavailable",
	"caller_forbidden":        "this caller may not act for this merchant",
	"token_api_down":          "the provider's token API keeps failing, so the broker is not calling it for a while; retry after the Retry-After delay",
	"token_rate_limited":      "the provider's token API asked the broker to slow down; retry after the Retry-After delay",
	"token_bad_response":      "the provider's token API answered with something that is not a usable token; the request was not forwarded",
}

// errorBody is the JSON body of a refused request.
type errorBody struct {
	Error    string `json:"error"`
	Message  string `json:"message"`
	Merchant string `json:"merchant,omitempty"`
}

// classify maps a token failure to the caller's status and error code.
func classify(err error) (int, string) {
	var ae *broker.APIError
	var re *broker.RequestError
	var ue *broker.UnavailableError
	var ce *oauth.ConsentRequiredError
	switch {
	case errors.Is(err, context.Canceled):
		return 499, "client_gone"
	case errors.As(err, &ce):
		return http.StatusBadGateway, "consent_required"
	case errors.As(err, &ue):
		return http.StatusServiceUnavailable, "token_api_down"
	case broker.IsTimeout(err):
		return http.StatusGatewayTimeout, "token_timeout"
	case errors.As(err, &re):
		return http.StatusBadGateway, "token_refused"
	case errors.As(err, &ae) && ae.StatusCode == http.StatusTooManyRequests:
		return http.StatusServiceUnavailable, "token_rate_limited"
	case errors.As(err, &ae) && ae.StatusCode >= 200 && ae.StatusCode < 300:
		return http.StatusBadGateway, "token_bad_response"
	case errors.As(err, &ae) && !ae.Temporary():
		return http.StatusBadGateway, "token_refused"
	}
	return http.StatusBadGateway, "token_unavailable"
}

// fail answers a refused request. The cause is logged (it never holds a
// secret) but not sent to the caller.
func (h *Handler) fail(w http.ResponseWriter, repl *caddy.Replacer, status int, code, merchant string, cause error) error {
	repl.Set("http.token_broker.error", code)
	if cause != nil {
		h.logger.Warn("no token for request", zap.String("merchant", merchant), zap.String("error_code", code),
			zap.Int("status", status), zap.Error(cause))
		if ra := broker.RetryAfterOf(cause); ra > 0 && status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", strconv.Itoa(int((ra+time.Second-1)/time.Second)))
		}
	}
	msg := errorMessages[code]
	if h.Errors == "caddy" {
		// Only the code and the message: {http.error.message} may be shown
		// to the caller, and the cause may quote the provider (it is
		// logged above instead).
		return caddyhttp.Error(status, errors.New(code+": "+msg))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(errorBody{Error: code, Message: msg, Merchant: merchant})
}

// Lookup implements broker.Observer. Lookups are counted by each binding's
// own observer (metrics.go), whose counters are resolved at provision time.
func (h *Handler) Lookup(*broker.Binding, broker.Result) {}

// Fetched implements broker.Observer: one log line per token fetch.
func (h *Handler) Fetched(ctx context.Context, b *broker.Binding, tok broker.Token, elapsed time.Duration, background bool, err error) {
	provider := h.providerOf(b)
	outcome := h.observeFetch(ctx, b, provider, elapsed, err)
	fields := []zap.Field{
		zap.String("merchant", b.Request.Merchant),
		zap.String("provider", provider),
		zap.String("source", b.SourceID),
		zap.String("outcome", outcome),
		zap.Strings("scopes", b.Request.Scopes),
		zap.Duration("duration", elapsed),
		zap.Bool("background", background),
	}
	if err != nil {
		h.logger.Warn("token fetch failed", append(fields, zap.Error(err))...)
		return
	}
	h.logger.Info("token fetched", append(fields, zap.String("fingerprint", tok.Fingerprint()),
		zap.Time("expiry", tok.Expiry))...)
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
	_ broker.Observer             = (*Handler)(nil)
)
