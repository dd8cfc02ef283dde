package module

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/config"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// current is the running token_broker app, for the admin API.
var current atomic.Pointer[App]

// adminAPI serves the token broker's admin routes under Caddy's admin
// endpoint. Nothing it answers holds a token or a secret: tokens are shown
// by fingerprint, refresh tokens are only said to exist.
//
//	GET  /token_broker/tokens                      cached tokens
//	GET  /token_broker/state                       every provider's and merchant's state (opstate.Report;
//	                                               ?provider=&state=&after=&limit=, state.go)
//	POST /token_broker/merchants/{id}/purge        drop a merchant's cached tokens
//	POST /token_broker/merchants/{id}/revoke       revoke them at the provider, then drop them
//	POST /token_broker/merchants/{id}/check        one token request for the merchant: what the
//	                                               provider answered (adminapi.Check)
//	GET  /token_broker/providers/{name}/organisations  the partner's organisations (Nuapay)
//	POST /token_broker/providers/{name}/organisations  read again the list restricting the wildcard merchant entry
//	PUT  /token_broker/merchants/{id}/refresh_token {"refresh_token": "..."}: load a merchant's
//	                                               refresh token (authorization-code merchants)
//	GET  /token_broker/health                      readiness: 200 ready, 503 not (health.go)
//	GET  /token_broker/health/live                 liveness: 200 when the app runs
//	POST /token_broker/consent/links               {"merchant": "acme", "return_url": "…", "callback_host": "…"}:
//	                                               a one-time consent link (see Consent)
//	GET  /token_broker/consent/merchants           the merchants of refresh_token providers and their
//	                                               consent state (?provider=NAME to filter)
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.token_broker",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/token_broker/tokens", Handler: caddy.AdminHandlerFunc(a.tokens)},
		{Pattern: "/token_broker/state", Handler: caddy.AdminHandlerFunc(a.state)},
		{Pattern: "/token_broker/merchants/", Handler: caddy.AdminHandlerFunc(a.merchant)},
		{Pattern: "/token_broker/providers/", Handler: caddy.AdminHandlerFunc(a.provider)},
		{Pattern: "/token_broker/health", Handler: caddy.AdminHandlerFunc(a.health)},
		{Pattern: "/token_broker/health/", Handler: caddy.AdminHandlerFunc(a.health)},
		{Pattern: "/token_broker/consent/links", Handler: caddy.AdminHandlerFunc(a.links)},
		{Pattern: "/token_broker/consent/merchants", Handler: caddy.AdminHandlerFunc(a.merchants)},
	}
}

func running() (*App, error) {
	app := current.Load()
	if app == nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("the token_broker app is not running")}
	}
	return app, nil
}

func (adminAPI) tokens(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	return writeJSON(w, map[string]any{"tokens": adminapi.Tokens(app.broker, r.URL.Query().Get("merchant"))})
}

func (adminAPI) merchant(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, "/token_broker/merchants/")
	id, action, ok := strings.Cut(rest, "/")
	if !ok || !config.ValidMerchantID(id) {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("use /token_broker/merchants/{merchant}/purge, /revoke or /check")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	if action == "refresh_token" {
		if r.Method != http.MethodPut {
			return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use PUT")}
		}
		return setRefreshToken(w, r, app, id)
	}
	if r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use POST")}
	}
	if action == "check" {
		return checkMerchant(w, r, app, id)
	}
	match := adminapi.MerchantTokens(app.registry, id)
	switch action {
	case "purge":
		entries := app.broker.PurgeMatching(match)
		return writeJSON(w, map[string]any{"merchant": id, "purged": len(entries)})
	case "revoke":
		entries := app.broker.PurgeMatching(match)
		results := adminapi.Revoke(r.Context(), entries)
		return writeJSON(w, map[string]any{"merchant": id, "results": results})
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown action %q: use purge, revoke or check", action)}
}

// checkMerchant serves POST /token_broker/merchants/{id}/check
// (adminapi.Check), on the merchant's binding of the app's routes when it
// has one (its requests' observer sees the fetch), else on one of its own
// scopes, observed by the app's recorder: counted, logged and told to
// the operator's view like a route's fetch.
func checkMerchant(w http.ResponseWriter, r *http.Request, app *App, merchant string) error {
	var b *broker.Binding
	if app.registry != nil {
		if bound := app.tables.Bindings(app.registry, merchant); len(bound) > 0 {
			b = &bound[0].Binding
		} else if app.recorder != nil {
			if bd, err := app.registry.Binding(merchant, nil); err == nil {
				bd.Observer = app.recorder.Observer()
				b = bd
			}
		}
	}
	res, err := adminapi.Check(r.Context(), app.registry, app.broker, b, admission.Allow(app.listing), merchant, time.Now())
	if err != nil {
		return apiError(err)
	}
	app.logger.Info("merchant checked", zap.String("merchant", merchant), zap.String("provider", res.Provider),
		zap.String("outcome", res.Outcome), zap.Bool("called", res.Called), zap.String("fingerprint", res.Fingerprint))
	return writeJSON(w, res)
}

// provider serves GET /token_broker/providers/{name}/organisations
// (adminapi.Organisations) and POST, which reads again the list that
// restricts the wildcard merchant entry (adminapi.RefreshListing).
func (adminAPI) provider(w http.ResponseWriter, r *http.Request) error {
	name, action, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/token_broker/providers/"), "/")
	if action != "organisations" {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("use /token_broker/providers/{name}/organisations")}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET, or POST to refresh the wildcard's list")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	if r.Method == http.MethodPost {
		n, err := adminapi.RefreshListing(r.Context(), app.listing, name)
		if err != nil {
			return apiError(err)
		}
		return writeJSON(w, map[string]any{"provider": name, "organisations": n, "refreshed": true})
	}
	orgs, err := adminapi.Organisations(r.Context(), app.registry, name)
	if err != nil {
		return apiError(err)
	}
	return writeJSON(w, map[string]any{"provider": name, "organisations": orgs})
}

// apiError is the admin API's answer to err: an adminapi.Error's status,
// else 500.
func apiError(err error) error {
	var ae *adminapi.Error
	if errors.As(err, &ae) {
		return caddy.APIError{HTTPStatus: ae.Status, Err: ae.Err}
	}
	return err
}

// setRefreshToken serves PUT /token_broker/merchants/{id}/refresh_token
// (adminapi.SetRefreshToken); the tracker is told of a consent granted,
// not of a routine rotation.
func setRefreshToken(w http.ResponseWriter, r *http.Request, app *App, merchant string) error {
	provider, fingerprint, granted, err := adminapi.SetRefreshToken(r, app.registry, app.broker, merchant)
	if err != nil {
		return apiError(err)
	}
	app.logger.Info("refresh token loaded", zap.String("merchant", merchant), zap.String("provider", provider),
		zap.String("fingerprint", fingerprint))
	if granted && app.tracker != nil {
		app.tracker.ConsentGranted(provider, merchant)
	}
	return writeJSON(w, map[string]any{"merchant": merchant, "provider": provider, "stored": true, "fingerprint": fingerprint})
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(v)
}

// Interface guard.
var _ caddy.AdminRouter = adminAPI{}
