// Package module is the Caddy adapter of the token broker: the
// token_broker app (global option), the handlers token_broker,
// token_broker_consent and token_broker_health with their Caddyfile
// directives and placeholders, the reverse_proxy transport
// token_broker_dpop, the admin routes, the `caddy token-broker` commands,
// and adapters to Caddy's storage, events app, metrics registry, logger
// and usage pools. It turns Caddy configuration into calls of packages
// without a Caddy import, which make every decision: broker and its
// sub-packages, and config.
package module

import (
	"cmp"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/callers"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/lograte"
)

func init() {
	caddy.RegisterModule(Handler{})
}

// DefaultMerchant is the default merchant selector.
const DefaultMerchant = "{http.request.header.X-Merchant-Id}"

// Handler obtains a scoped OAuth token for the merchant a request is for
// and sets it as "Authorization: Bearer <token>" before the request goes
// on to the next handler (normally reverse_proxy); a token bound to the
// provider's DPoP key is not set on the request: the route's reverse_proxy
// must use the token_broker_dpop transport (DPoPTransport), which sets
// "Authorization: DPoP <token>" and a fresh proof on each request it
// sends. Without it the request leaves with no credential, and a 401
// answer to it becomes 502 dpop_transport_missing. Tokens come from the
// broker's cache, shared by every token_broker handler with the same broker
// settings and kept across config reloads, or from the merchant's provider.
//
// Before the request goes on, the outbound-header contract
// (outbound.Contract) is applied: the caller's credentials, the merchant
// header and the caller-JWT header are removed, Connection options and
// trailers naming them are removed or refused, and the token is set:
// nothing the caller sends can remove, replace or reveal the token.
//
// This handler sets these placeholders (never the token itself):
//
// Placeholder | Description
// ------------|-------------
// `{http.token_broker.merchant}` | The merchant the request is for
// `{http.token_broker.organisation}` | The merchant's organisation at the provider
// `{http.token_broker.provider}` | The provider's name in the registry
// `{http.token_broker.fingerprint}` | First 8 hex digits of the SHA-256 of the token
// `{http.token_broker.cache}` | How the token was found: hit, refresh, miss, shared, adopted
// `{http.token_broker.error}` | On failure, the error code sent to the caller
//
// Errors are answered with a JSON body {"error", "message", "merchant"}
// (admission.ErrorBody; each code's status and message are in errcode):
// 421 for a Host that is not a loopback name nor in the app's
// allowed_hosts, 403 for a browser's cross-site request (callers.Site),
// 400 when the merchant is missing or malformed or a trailer names a
// header the broker owns, 405 for TRACE, TRACK and CONNECT, 403 when the merchant
// is not in the registry, 502 when the token API fails, 504 when it times
// out. With `errors caddy` they are caddyhttp.Errors, for handle_errors.
type Handler struct {
	// Config is the path of a TOML merchant registry for this handler
	// only: a file, a directory (every *.toml file in it) or a glob.
	// Default: the registry of the token_broker app (the `token_broker`
	// global option).
	Config string `json:"config,omitempty"`

	// Merchant is a placeholder selecting the merchant a request is for
	// (admission.ParseSelector: no default; a ':' is part of the name).
	// Default: `{http.request.header.X-Merchant-Id}`.
	Merchant string `json:"merchant,omitempty"`

	// Scopes, when set, replace the merchant's default scopes on this
	// route (e.g. openbanking_aisp for /tpp/accounts*).
	Scopes []string `json:"scopes,omitempty"`

	// Header is the request header the token is set in, as
	// "Bearer <token>". Default and only accepted value: Authorization.
	// Proxy-Authorization is refused: reverse_proxy removes it as a
	// hop-by-hop header, so the upstream would get no credential; any
	// other header would be logged in clear by Caddy.
	Header string `json:"header,omitempty"`

	// Errors chooses how failures are answered: "json" (default) writes a
	// small JSON body; "caddy" returns a caddyhttp.Error so that the
	// server's handle_errors routes answer.
	Errors string `json:"errors,omitempty"`

	// InteractionID, when true, gives a request that carries no
	// x-fapi-interaction-id (UK Open Banking, FAPI), or only an empty
	// one, a new random UUID in that header, so that the call can be
	// followed end to end. A value the caller sent is passed on
	// unchanged. Default false.
	InteractionID bool `json:"interaction_id,omitempty"`

	// RetryOn401 says which upstream 401 answers purge the token and retry
	// the request once with a new one: "invalid_token" (default: a 401
	// with `WWW-Authenticate: Bearer error="invalid_token"`), "any" (every
	// 401) or "off". A 403 never purges.
	RetryOn401 string `json:"retry_on_401,omitempty"`

	// RetryBodyLimit is the largest request body, in bytes, kept in memory
	// so that the request can be retried after a 401: only a body whose
	// length is known in advance (Content-Length) is kept. Larger bodies,
	// bodies of unknown length (chunked) and requests marked
	// `Incremental: ?1` are streamed as they arrive and not retried (the
	// caller gets the 401; the token is still purged). Default 65536, at
	// most 16 MiB.
	RetryBodyLimit int64 `json:"retry_body_limit,omitempty"`

	callers     *callers.Policy    // the app's caller policy; nil admits every caller
	site        *callers.Site      // the app's: which Host names and browser requests are served
	registry    *config.Registry   // the app's, or the handler's own (Config)
	bindings    *bindings.Table    // the app's, shared by its routes with the same registry and scopes; the handler's own with Config
	registryKey string             // the handler's own registry in the registries pool
	listingKey  string             // the pooled organisation listing of a handler's own registry
	merchant    admission.Selector // Merchant, read in Provision
	broker      *broker.Broker
	tracker     *opstate.Tracker // the app's: the operator's view (nil in a handler made by hand)
	logger      *zap.Logger
	metrics     *telemetry.Recorder // counts and logs for the bindings (instrument)

	// refusals is the app's: it limits the logs of repeated refusals
	// (nil: not limited).
	refusals *lograte.Limiter[broker.Backoff]

	// retry is the part of the 401 retry that is the same for every
	// request: the broker's tokens with the metrics and logs of
	// rejections, the counters of DPoP nonce challenges and refusals,
	// Incremental and Isolate. Made once, in instrument, so that no
	// request makes a func value; forward sets Mode and BodyLimit.
	retry outbound.Retry
}

// placeholderPrefix starts the names of the placeholders a served request
// gets.
const placeholderPrefix = "http.token_broker."

// placeholders returns the provider of a served request's placeholders
// ({http.token_broker.merchant} etc.): one function added to the
// replacer's providers (one small allocation) rather than five static
// values, each of which takes the replacer's lock and grows its map.
// The values are resolved when a later handler or log asks for them.
func placeholders(b *bindings.Binding, e *broker.Entry, res broker.Result) caddy.ReplacerFunc {
	return func(key string) (any, bool) {
		name, ok := strings.CutPrefix(key, placeholderPrefix)
		if !ok {
			return nil, false
		}
		switch name {
		case "merchant":
			v, _ := b.Values()
			return v, true
		case "organisation":
			_, v := b.Values()
			return v, true
		case "provider":
			return b.Provider.NameValue(), true
		case "fingerprint":
			return e.FingerprintValue(), true
		case "cache":
			return cacheResults[res], true
		}
		return nil, false
	}
}

// placeholderNames are the names after placeholderPrefix that
// placeholders resolves.
var placeholderNames = [...]string{"merchant", "organisation", "provider", "fingerprint", "cache"}

// setPlaceholders sets the placeholders of placeholders as static values
// (the rare request served by a second token_broker handler).
func setPlaceholders(repl *caddy.Replacer, b *bindings.Binding, e *broker.Entry, res broker.Result) {
	get := placeholders(b, e, res)
	for _, name := range placeholderNames {
		v, _ := get(placeholderPrefix + name)
		repl.Set(placeholderPrefix+name, v)
	}
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

// Provision attaches the handler to the app's token cache and to the
// binding table of its registry and scopes. Bindings are made on each
// merchant's first request (bindings.go), so that a registry of any size
// costs nothing here.
func (h *Handler) Provision(ctx caddy.Context) error {
	h.logger = ctx.Logger()
	appIface, err := ctx.App("token_broker")
	if err != nil {
		return err
	}
	app := appIface.(*App)
	h.broker = app.broker
	h.tracker = app.tracker
	h.callers = app.callers
	h.site = &app.site
	h.refusals = app.refusals
	h.Merchant = cmp.Or(h.Merchant, DefaultMerchant)
	if h.merchant, err = admission.ParseSelector(h.Merchant, expandShorthands); err != nil {
		return fmt.Errorf("token_broker: merchant: %w", err)
	}
	h.Errors = cmp.Or(h.Errors, "json")
	reg := app.registry
	if h.Config != "" {
		// A handler's own registry keeps its refresh tokens in Caddy's
		// storage, whether the app's registry uses Redis or not.
		storeKey := "storage, budgets " + app.fleetKey + app.budgetKey() + " sealed " + app.storageKeys.Fingerprint()
		if reg, h.registryKey, err = loadPooled(ctx, h.Config, storageStore(ctx.Storage(), app.storageKeys), storeKey, app.budgetsFor(), app.kept.Zap()); err != nil {
			return err
		}
		app.useRegistry(reg)
	}
	if reg == nil {
		return errors.New("token_broker: no merchant registry: set `config <file.toml>` in the token_broker global option (or in this handler)")
	}
	if err := reg.CheckRouteScopes(h.Scopes); err != nil {
		return err
	}
	h.registry = reg
	if h.Config != "" {
		listing, key, err := loadListing(reg, app.kept.Zap())
		if err != nil {
			return err
		}
		h.listingKey = key
		h.bindings = bindings.ForRegistry(reg, h.Scopes, admission.Allow(listing), time.Now)
		app.watched.Add(reg, listing)
	} else {
		h.bindings = app.tables.Table(reg, h.Scopes, admission.Allow(app.listing))
	}
	h.instrument(app.metrics)
	return nil
}

// Cleanup releases the handler's own registry and organisation listing,
// if any, and the metrics series of its wildcard merchants
// (bindings.Table.Discard): the config is being discarded.
func (h *Handler) Cleanup() error {
	if h.bindings != nil {
		h.bindings.Discard()
	}
	if h.registryKey != "" {
		registries.Release(h.registryKey, caddy.Exiting(), h.logger)
	}
	if h.listingKey != "" {
		_, err := listings.Delete(h.listingKey)
		return err
	}
	return nil
}

// Validate checks the handler's configuration.
func (h *Handler) Validate() error {
	if h.Errors != "json" && h.Errors != "caddy" {
		return fmt.Errorf("token_broker: errors %q must be json or caddy", h.Errors)
	}
	if err := outbound.CheckTokenHeader(h.Header); err != nil {
		return fmt.Errorf("token_broker: %w", err)
	}
	if err := (outbound.Retry{Mode: h.RetryOn401, BodyLimit: h.RetryBodyLimit}).Check(); err != nil {
		return fmt.Errorf("token_broker: %w", err)
	}
	return nil
}

// ServeHTTP sets the merchant's token on the request and calls next. What
// the request carries when it goes on is decided by the outbound-header
// contract (outbound.Contract).
func (h *Handler) ServeHTTP(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler) error {
	repl := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	if h.site != nil { // nil only in a handler made by hand (tests)
		if code, err := h.site.Check(r); code != 0 {
			return h.fail(w, repl, admission.Refusal{Code: code, Cause: err})
		}
	}
	out := h.outbound()
	if code := out.Check(r); code != 0 {
		return h.fail(w, repl, admission.Refusal{Code: code})
	}
	caller, cerr := h.callers.Authenticate(r)
	if cerr != nil {
		cerr.SetChallenge(w.Header())
		return h.fail(w, repl, admission.Refusal{Code: cerr.Code, Cause: cerr.Err})
	}
	merchant, code := h.merchant.Merchant(r.Header, repl)
	if code != 0 {
		return h.fail(w, repl, admission.Refusal{Code: code})
	}
	if !h.callers.Allows(caller, merchant) {
		return h.fail(w, repl, admission.Refusal{Code: errcode.CallerForbidden, Merchant: merchant})
	}
	b, rf := h.binding(merchant)
	if rf != nil {
		return h.fail(w, repl, *rf)
	}
	e, res, err := telemetry.Token(r.Context(), h.broker, b) // the token span of a traced request
	if err != nil {
		return h.fail(w, repl, admission.Refusal{Code: errcode.Classify(err), Merchant: merchant, ProviderType: b.Provider.Type, Cause: err})
	}
	h.bindings.Served(b) // a wildcard merchant's slot is its own now
	out.Prepare(r, e.Header())

	if _, again := repl.Get(placeholderPrefix + "merchant"); again {
		// A token_broker handler before this one served the request: static
		// values, which the replacer reads before any provider, so that the
		// placeholders name the token this handler set.
		setPlaceholders(repl, b, e, res)
	} else {
		repl.Map(placeholders(b, e, res))
	}
	return h.forward(w, r, next, out, b, e)
}

// fail answers a refused request: it sets {http.token_broker.error}, logs
// the cause (never sent to the caller) and answers with the JSON body
// (admission.Refusal), or returns a caddyhttp.Error with `errors caddy`.
func (h *Handler) fail(w http.ResponseWriter, repl *caddy.Replacer, rf admission.Refusal) error {
	repl.Set("http.token_broker.error", rf.Code.String())
	rf.Prepare(w.Header(), h.logger, h.refusals)
	if h.Errors == "caddy" {
		return caddyhttp.Error(rf.Code.Status(), rf.Public()) // {http.error.message} may be shown to the caller
	}
	return rf.Write(w)
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*Handler)(nil)
	_ caddy.Validator             = (*Handler)(nil)
	_ caddy.CleanerUpper          = (*Handler)(nil)
	_ caddyhttp.MiddlewareHandler = (*Handler)(nil)
)
