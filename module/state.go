package module

import (
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
