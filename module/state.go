package module

import (
	"errors"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// stateSources are what the operator's view of the app is built from:
// its registry (an empty one when it has none), its broker, the active
// wildcard merchants of its binding tables, its tracker, its registry's
// index (kept with the app, so that it goes with the registry), and the
// handlers' own registries, whose fetches the tracker is told of too.
func (a *App) stateSources() opstate.Sources {
	s := opstate.Sources{Registry: a.registry, Broker: a.broker, Tracker: a.tracker, Index: a.stateIndex}
	if s.Registry == nil {
		s.Registry = &config.Registry{}
	}
	if a.tables != nil {
		a.tables.Each(func(t *bindings.Table) { s.Tables = append(s.Tables, t) })
	}
	if a.watched != nil {
		for _, r := range a.watched.Registries() {
			s.Others = append(s.Others, r.Registry)
		}
	}
	return s
}

// state serves GET /token_broker/state: the opstate.Report of the query
// (?provider=&state=&after=&limit=); 400 for a malformed query.
func (adminAPI) state(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET")}
	}
	q, err := opstate.ParseQuery(r.URL.Query())
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: err}
	}
	app, err := running()
	if err != nil {
		return err
	}
	if app.tracker == nil {
		return caddy.APIError{HTTPStatus: http.StatusServiceUnavailable, Err: errors.New("the token_broker app is not provisioned")}
	}
	return writeJSON(w, opstate.Build(app.stateSources(), q, time.Now()))
}
