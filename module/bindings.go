package module

import (
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// binding is what the handler knows about one merchant on its route
// (package bindings keeps and bounds them).
type binding = bindings.Binding

// bindingTable is the table of a registry's bindings for a route's
// scopes. Every token_broker handler of a config with the same registry
// and route scopes shares one (App.tables).
type bindingTable = bindings.Table

// tables are the binding tables of a config, by registry and route
// scopes (App.tables).
type tables = bindings.Tables

// newBindingTable returns the empty table of reg for a route's scopes
// (nil: the merchants' own), restricted to l's organisations when l is not
// nil, on the clock now.
func newBindingTable(reg *config.Registry, scopes []string, l *listing.Listing, now func() time.Time) *bindingTable {
	return bindings.ForRegistry(reg, scopes, admission.Allow(l), now)
}

// binding returns the binding of a valid merchant id, made on first use;
// a non-nil refusal says why the merchant is not served.
func (h *Handler) binding(id string) (*binding, *admission.Refusal) {
	b, err := h.bindings.Get(id, (*tableHooks)(h))
	if err != nil {
		rf := admission.Unbound(id, err)
		return nil, &rf
	}
	return b, nil
}

// tableHooks are a handler's bindings.Hooks: the observer of a new
// binding and the release of its metrics series (telemetry.Recorder), the
// broker's Drop, and the operator's view's Forget of an evicted merchant.
type tableHooks Handler

// Made implements bindings.Hooks.
func (th *tableHooks) Made(b *binding, track bool) bool { return th.metrics.Made(b, track) }

// Released implements bindings.Hooks.
func (th *tableHooks) Released(b *binding) { th.metrics.Released(b) }

// Drop implements bindings.Hooks.
func (th *tableHooks) Drop(b *broker.Binding) { th.broker.Drop(b) }

// Evicted implements bindings.Evicter: the operator's view forgets the
// evicted wildcard merchant.
func (th *tableHooks) Evicted(b *binding) {
	if th.tracker != nil {
		th.tracker.Forget(b.Merchant)
	}
}

// Interface guards.
var (
	_ bindings.Hooks   = (*tableHooks)(nil)
	_ bindings.Evicter = (*tableHooks)(nil)
)
