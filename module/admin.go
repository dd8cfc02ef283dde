package module

import (
	"errors"
	"net/http"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// current is the running token_broker app, for the admin API.
var current atomic.Pointer[App]

// adminAPI serves the token broker's admin routes (adminapi.Serve) under
// Caddy's admin endpoint, for the running app.
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.token_broker",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (adminAPI) Routes() []caddy.AdminRoute {
	var routes []caddy.AdminRoute
	for _, pattern := range adminapi.Patterns() {
		routes = append(routes, caddy.AdminRoute{Pattern: pattern, Handler: caddy.AdminHandlerFunc(serveAdmin)})
	}
	return routes
}

// serveAdmin answers an admin request for the running app; a refusal is
// a caddy.APIError with its status.
func serveAdmin(w http.ResponseWriter, r *http.Request) error {
	err := adminapi.Serve(w, r, current.Load().admin())
	var ae *adminapi.Error
	if errors.As(err, &ae) {
		return caddy.APIError{HTTPStatus: ae.Status, Err: ae.Err}
	}
	return err
}

// admin is the app as the admin API asks it; nil when a is nil (no app
// runs).
func (a *App) admin() *adminapi.Instance {
	if a == nil {
		return nil
	}
	in := &adminapi.Instance{Registry: a.registry, Listing: a.listing, Broker: a.broker, Tracker: a.tracker,
		Logger: a.logger, Tables: a.tables, Index: a.stateIndex, Watched: a.watched}
	if a.recorder != nil {
		in.Observer = a.recorder.Observer()
	}
	return in
}

// stateSources are what the operator's view of the app is built from
// (adminapi.Instance.Sources).
func (a *App) stateSources() opstate.Sources {
	return a.admin().Sources()
}

// Interface guard.
var _ caddy.AdminRouter = adminAPI{}
