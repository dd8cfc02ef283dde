package adminapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Instance is the running token_broker app as the admin API asks it.
type Instance struct {
	// Registry is the app's merchant registry; nil when it has none.
	Registry *config.Registry
	// Listing is the organisation listing of the registry's wildcard
	// entry; nil when the wildcard is not restricted.
	Listing *listing.Listing
	// Broker holds the cached tokens.
	Broker *broker.Broker
	// Tracker is the operator's view; nil when the app is not
	// provisioned.
	Tracker *opstate.Tracker
	// Logger logs the checks, the refresh tokens loaded and the consent
	// links made.
	Logger *zap.Logger
	// Tables are the binding tables of the app's routes; nil: none.
	Tables *bindings.Tables
	// Observer observes the check of a merchant that no route has bound;
	// nil: such a check is not observed.
	Observer broker.Observer
	// Index is the registry's merchants sorted, for the operator's view.
	Index *opstate.Index
	// Watched are the registries that handlers loaded themselves; nil:
	// none.
	Watched *probe.Watched
}

// Sources are what the operator's view of the app is built from: its
// registry (an empty one when it has none), its broker, the active
// wildcard merchants of its binding tables, its tracker and index, and
// the handlers' own registries, whose fetches the tracker is told of too.
func (in *Instance) Sources() opstate.Sources {
	s := opstate.Sources{Registry: in.Registry, Broker: in.Broker, Tracker: in.Tracker, Index: in.Index}
	if s.Registry == nil {
		s.Registry = &config.Registry{}
	}
	if in.Tables != nil {
		in.Tables.Each(func(t *bindings.Table) { s.Tables = append(s.Tables, t) })
	}
	for _, r := range in.Watched.Registries() {
		s.Others = append(s.Others, r.Registry)
	}
	return s
}

// source returns the source of the provider whose ID is id as configured
// now, in the app's registry or a handler's own; nil when none has it.
func (in *Instance) source(id string) broker.Source {
	for _, reg := range in.Sources().Registries() {
		if src := reg.Source(id); src != nil {
			return src
		}
	}
	return nil
}

// Health is the health answer of the app in (nil: none runs): its
// registry first, then the handlers' own.
func (in *Instance) Health() probe.Health {
	if in == nil {
		return probe.NotRunning()
	}
	var regs []probe.Registry
	if in.Registry != nil {
		regs = append(regs, probe.Of(in.Registry, in.Listing))
	}
	return probe.Running(append(regs, in.Watched.Registries()...), in.Broker)
}

// route is an admin route: its path pattern (http.ServeMux; one ending
// in "/" matches the paths under it), the one method it takes ("" when
// serve checks the method) and what answers it.
type route struct {
	pattern string
	method  string
	serve   func(w http.ResponseWriter, r *http.Request, in *Instance) error
}

// routes are the admin routes. Nothing they answer holds a token or a
// secret.
//
//	GET  /token_broker/tokens                      cached tokens, a page of merchants sorted by id, each
//	                                               with all its tokens (?merchant=&after=&limit=)
//	GET  /token_broker/state                       every provider's and merchant's state (opstate.Report;
//	                                               ?provider=&state=&after=&limit=)
//	POST /token_broker/merchants/{id}/purge        drop a merchant's cached tokens
//	POST /token_broker/merchants/{id}/revoke       revoke them at the provider, then drop them
//	POST /token_broker/merchants/{id}/check        one token request for the merchant: what the
//	                                               provider answered (Check)
//	PUT  /token_broker/merchants/{id}/refresh_token {"refresh_token": "..."}: load a merchant's
//	                                               refresh token (SetRefreshToken)
//	GET  /token_broker/providers/{name}/organisations  the partner's organisations (Nuapay)
//	POST /token_broker/providers/{name}/organisations  read again the list restricting the wildcard merchant entry
//	GET  /token_broker/health                      readiness: 200 ready, 503 not (package probe)
//	GET  /token_broker/health/live                 liveness: 200 when the app runs
//	POST /token_broker/consent/links               {"merchant": "acme", "return_url": "…", "callback_host": "…"}:
//	                                               a consent link, usable until a consent completes
//	                                               with it (consentweb.CreateLink)
//	GET  /token_broker/consent/merchants           a page of the merchants of refresh_token providers,
//	                                               sorted by id, and their consent state
//	                                               (?provider=&after=&limit=; 400 when provider is not
//	                                               a refresh_token provider)
//
// The lists page alike (opstate.ParsePage): after is the next of the
// previous page, limit the number of merchants (default 100, 1 to 1000),
// and next, absent on the last page, the after of the next.
func routes() []route {
	return []route{
		{"/token_broker/tokens", http.MethodGet, tokens},
		{"/token_broker/state", http.MethodGet, state},
		{"/token_broker/merchants/", "", merchant},
		{"/token_broker/providers/", "", provider},
		{"/token_broker/health", "", health},
		{"/token_broker/health/", "", health},
		{"/token_broker/consent/links", http.MethodPost, links},
		{"/token_broker/consent/merchants", http.MethodGet, consentMerchants},
	}
}

// Patterns are the path patterns (http.ServeMux) of the admin routes,
// each answered by Serve.
func Patterns() []string {
	var out []string
	for _, rt := range routes() {
		out = append(out, rt.pattern)
	}
	return out
}

// Serve answers an admin request for the running app in (nil: none
// runs). A refusal is an *Error (a 405 sets the Allow header); another
// error is a failure to write the answer.
func Serve(w http.ResponseWriter, r *http.Request, in *Instance) error {
	for _, rt := range routes() {
		if r.URL.Path == rt.pattern || strings.HasSuffix(rt.pattern, "/") && strings.HasPrefix(r.URL.Path, rt.pattern) {
			var err error
			if rt.method != "" && r.Method != rt.method {
				err = methodNotAllowed(rt.method)
			} else {
				err = rt.serve(w, r, in)
			}
			if ae, ok := errors.AsType[*Error](err); ok && ae.Allow != "" {
				w.Header().Set("Allow", ae.Allow)
			}
			return err
		}
	}
	return &Error{Status: http.StatusNotFound, Err: fmt.Errorf("no token broker admin route at %s", r.URL.Path)}
}

// running is the refusal of a request when no app runs.
func running(in *Instance) error {
	if in == nil {
		return &Error{Status: http.StatusNotFound, Err: errors.New("the token_broker app is not running")}
	}
	return nil
}

// methodNotAllowed refuses a request whose method is not one of allow
// ("GET" or "GET, HEAD").
func methodNotAllowed(allow string) error {
	return &Error{Status: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use " + allow), Allow: allow}
}

// tokens serves GET /token_broker/tokens: a page of the cached tokens
// (Tokens; ?merchant=&after=&limit=); 400 for a malformed query.
func tokens(w http.ResponseWriter, r *http.Request, in *Instance) error {
	if err := running(in); err != nil {
		return err
	}
	v, err := params(r, "merchant", "after", "limit")
	if err != nil {
		return err
	}
	merchant := v.Get("merchant")
	if merchant != "" && !config.ValidMerchantID(merchant) {
		return &Error{Status: http.StatusBadRequest,
			Err: fmt.Errorf("merchant %.130q is not a merchant id (%s)", merchant, errcode.MerchantIDGrammar)}
	}
	page, err := opstate.ParsePage(v)
	if err != nil {
		return &Error{Status: http.StatusBadRequest, Err: err}
	}
	var match func(*broker.Binding) bool
	if merchant != "" {
		match = MerchantTokens(merchant, in.Sources().Registries()...)
	}
	tokens, next := Tokens(in.Broker, match, page)
	return writeJSON(w, tokensPage{Tokens: tokens, Next: next})
}

// tokensPage is the answer of GET /token_broker/tokens.
type tokensPage struct {
	// Tokens are the cached tokens of the page's merchants.
	Tokens []TokenInfo `json:"tokens"`
	// Next is the after of the next page; absent on the last page.
	Next string `json:"next,omitempty"`
}

// state serves GET /token_broker/state: the opstate.Report of the query
// (?provider=&state=&after=&limit=); 400 for a malformed query.
func state(w http.ResponseWriter, r *http.Request, in *Instance) error {
	v, err := values(r)
	if err != nil {
		return err
	}
	q, err := opstate.ParseQuery(v)
	if err != nil {
		return &Error{Status: http.StatusBadRequest, Err: err}
	}
	if err := running(in); err != nil {
		return err
	}
	if in.Tracker == nil {
		return &Error{Status: http.StatusServiceUnavailable, Err: errors.New("the token_broker app is not provisioned")}
	}
	return writeJSON(w, opstate.Build(in.Sources(), q, time.Now()))
}

// merchant serves POST /token_broker/merchants/{id}/purge, /revoke and
// /check, and PUT /token_broker/merchants/{id}/refresh_token.
func merchant(w http.ResponseWriter, r *http.Request, in *Instance) error {
	rest := strings.TrimPrefix(r.URL.Path, "/token_broker/merchants/")
	id, action, ok := strings.Cut(rest, "/")
	if !ok {
		return &Error{Status: http.StatusNotFound, Err: errors.New("use /token_broker/merchants/{merchant}/purge, /revoke, /check or /refresh_token")}
	}
	if !config.ValidMerchantID(id) {
		return &Error{Status: http.StatusNotFound,
			Err: fmt.Errorf("%.130q is not a merchant id (%s)", id, errcode.MerchantIDGrammar)}
	}
	if err := running(in); err != nil {
		return err
	}
	if action == "refresh_token" {
		if r.Method != http.MethodPut {
			return methodNotAllowed(http.MethodPut)
		}
		return setRefreshToken(w, r, in, id)
	}
	if r.Method != http.MethodPost {
		return methodNotAllowed(http.MethodPost)
	}
	if action == "check" {
		return checkMerchant(w, r, in, id)
	}
	match := MerchantTokens(id, in.Sources().Registries()...)
	switch action {
	case "purge":
		entries := in.Broker.PurgeMatching(match)
		return writeJSON(w, map[string]any{"merchant": id, "purged": len(entries)})
	case "revoke":
		// Not cancelled with the request: a token dropped from the cache
		// once its provider answered and not revoked would stay valid,
		// forgotten. Each call is bounded by its provider's timeout. Two
		// revokes of one merchant at once may both send its tokens.
		results := Revoke(context.WithoutCancel(r.Context()), in.Broker, matching(in.Broker, match), in.source)
		return writeJSON(w, map[string]any{"merchant": id, "results": results})
	}
	return &Error{Status: http.StatusNotFound, Err: fmt.Errorf("unknown action %q: use purge, revoke, check or refresh_token", action)}
}

// checkMerchant serves POST /token_broker/merchants/{id}/check (Check),
// on the merchant's binding of the app's routes when it has one (its
// requests' observer sees the fetch), else on one of its own scopes,
// observed by in.Observer: counted, logged and told to the operator's
// view like a route's fetch.
func checkMerchant(w http.ResponseWriter, r *http.Request, in *Instance, merchant string) error {
	var b *broker.Binding
	if in.Registry != nil && in.Tables != nil {
		if bound := in.Tables.Bindings(in.Registry, merchant); len(bound) > 0 {
			b = &bound[0].Binding
		}
	}
	res, err := Check(r.Context(), in.Registry, in.Broker, b, in.Observer, admission.Allow(in.Listing), merchant, time.Now())
	if err != nil {
		return err
	}
	in.Logger.Info("merchant checked", zap.String("merchant", merchant), zap.String("provider", res.Provider),
		zap.String("outcome", res.Outcome), zap.Bool("called", res.Called), zap.String("fingerprint", res.Fingerprint))
	return writeJSON(w, res)
}

// setRefreshToken serves PUT /token_broker/merchants/{id}/refresh_token
// (SetRefreshToken); the tracker is told of a consent granted, not of a
// routine rotation.
func setRefreshToken(w http.ResponseWriter, r *http.Request, in *Instance, merchant string) error {
	provider, fingerprint, granted, err := SetRefreshToken(r, in.Registry, in.Broker, merchant)
	if err != nil {
		return err
	}
	in.Logger.Info("refresh token loaded", zap.String("merchant", merchant), zap.String("provider", provider),
		zap.String("fingerprint", fingerprint))
	if granted && in.Tracker != nil {
		in.Tracker.ConsentGranted(provider, merchant)
	}
	return writeJSON(w, map[string]any{"merchant": merchant, "provider": provider, "stored": true, "fingerprint": fingerprint})
}

// provider serves GET /token_broker/providers/{name}/organisations
// (Organisations) and POST, which reads again the list that restricts
// the wildcard merchant entry (RefreshListing).
func provider(w http.ResponseWriter, r *http.Request, in *Instance) error {
	name, action, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/token_broker/providers/"), "/")
	if action != "organisations" {
		return &Error{Status: http.StatusNotFound, Err: errors.New("use /token_broker/providers/{name}/organisations")}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		return &Error{Status: http.StatusMethodNotAllowed, Allow: "GET, POST",
			Err: errors.New("method not allowed: use GET, or POST to refresh the wildcard's list")}
	}
	if err := running(in); err != nil {
		return err
	}
	if r.Method == http.MethodPost {
		n, err := RefreshListing(r.Context(), in.Listing, name)
		if err != nil {
			return err
		}
		return writeJSON(w, map[string]any{"provider": name, "organisations": n, "refreshed": true})
	}
	orgs, err := Organisations(r.Context(), in.Registry, name)
	if err != nil {
		return err
	}
	return writeJSON(w, map[string]any{"provider": name, "organisations": orgs})
}

// health serves GET /token_broker/health (readiness: 200 when ready, 503
// otherwise) and GET /token_broker/health/live (liveness), with the
// probe.Health as the body.
func health(w http.ResponseWriter, r *http.Request, in *Instance) error {
	live := false
	switch r.URL.Path {
	case "/token_broker/health", "/token_broker/health/ready":
	case "/token_broker/health/live":
		live = true
	default:
		return &Error{Status: http.StatusNotFound, Err: fmt.Errorf("use /token_broker/health (readiness) or /token_broker/health/live")}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return methodNotAllowed("GET, HEAD")
	}
	probe.Write(w, r, in.Health(), live)
	return nil
}

// links serves POST /token_broker/consent/links (consentweb.CreateLink).
func links(w http.ResponseWriter, r *http.Request, in *Instance) error {
	if err := running(in); err != nil {
		return err
	}
	req, err := consentweb.DecodeLinkRequest(r.Body)
	if err != nil {
		return &Error{Status: http.StatusBadRequest, Err: err}
	}
	if in.Registry == nil {
		return &Error{Status: http.StatusNotFound, Err: fmt.Errorf("merchant %q is not in the registry: the app has none", req.Merchant)}
	}
	link, status, err := consentweb.CreateLink(r.Context(), in.Registry, req)
	consentweb.LogStep(in.Logger, consentweb.ProviderOf(in.Registry, req.Merchant), consentweb.StepLink, req.Merchant, err)
	if err != nil {
		consentweb.SetRetryAfter(w, err)
		return &Error{Status: status, Err: err}
	}
	return writeJSON(w, link)
}

// consentMerchants serves GET /token_broker/consent/merchants: a page of
// the consent states (consentweb.States; ?provider=&after=&limit=); 400
// for a malformed query or a provider that is not a refresh_token
// provider of the registry (consentweb.CheckProvider).
func consentMerchants(w http.ResponseWriter, r *http.Request, in *Instance) error {
	if err := running(in); err != nil {
		return err
	}
	v, err := params(r, "provider", "after", "limit")
	if err != nil {
		return err
	}
	if err := consentweb.CheckProvider(in.Registry, v.Get("provider")); err != nil {
		return &Error{Status: http.StatusBadRequest, Err: err}
	}
	page, err := opstate.ParsePage(v)
	if err != nil {
		return &Error{Status: http.StatusBadRequest, Err: err}
	}
	if in.Registry == nil {
		return writeJSON(w, consentPage{Merchants: []consentweb.State{}})
	}
	states, next := consentweb.States(r.Context(), in.Registry, v.Get("provider"), page)
	return writeJSON(w, consentPage{Merchants: states, Next: next})
}

// consentPage is the answer of GET /token_broker/consent/merchants.
type consentPage struct {
	// Merchants are the consent states of the page's merchants.
	Merchants []consentweb.State `json:"merchants"`
	// Next is the after of the next page; absent on the last page.
	Next string `json:"next,omitempty"`
}

// values returns the parameters of r's query string; a malformed one
// is refused with 400.
func values(r *http.Request) (url.Values, error) {
	v, err := url.ParseQuery(r.URL.RawQuery)
	if err != nil {
		return nil, &Error{Status: http.StatusBadRequest,
			Err: fmt.Errorf("the query string is malformed (%v): percent-encode its values", err)}
	}
	return v, nil
}

// params returns the parameters of r's query string, which may only be
// names, each given once; a query that is malformed or has another
// parameter is refused with 400.
func params(r *http.Request, names ...string) (url.Values, error) {
	v, err := values(r)
	if err != nil {
		return nil, err
	}
	if err := opstate.CheckParams(v, names...); err != nil {
		return nil, &Error{Status: http.StatusBadRequest, Err: err}
	}
	return v, nil
}

// writeJSON answers with v as JSON, not to be cached.
func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(v)
}
