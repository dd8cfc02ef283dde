package module

import (
	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
)

// binding returns the binding of a valid merchant id, made on first use;
// a non-nil refusal says why the merchant is not served.
func (h *Handler) binding(id string) (*bindings.Binding, *admission.Refusal) {
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
func (th *tableHooks) Made(b *bindings.Binding, track bool) bool { return th.metrics.Made(b, track) }

// Released implements bindings.Hooks.
func (th *tableHooks) Released(b *bindings.Binding) { th.metrics.Released(b) }

// Drop implements bindings.Hooks.
func (th *tableHooks) Drop(b *broker.Binding) { th.broker.Drop(b) }

// Evicted implements bindings.Hooks: the operator's view forgets the
// evicted wildcard merchant.
func (th *tableHooks) Evicted(b *bindings.Binding) {
	if th.tracker != nil {
		th.tracker.Forget(b.Merchant)
	}
}

// Interface guard.
var _ bindings.Hooks = (*tableHooks)(nil)
