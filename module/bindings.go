package module

import (
	"context"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
)

// binding returns the binding of a valid merchant id, made on first use;
// a non-nil refusal says why the merchant is not served.
func (h *Handler) binding(id string) (*bindings.Binding, *admission.Refusal) {
	b, err := h.bindings.Get(id, (*hooks)(h))
	if err != nil {
		rf := admission.Unbound(id, err)
		return nil, &rf
	}
	return b, nil
}

// hooks are a handler's bindings.Hooks (the observer of a new binding
// and the release of its metrics series, telemetry.Recorder; the
// broker's Drop; the operator's view's Forget of an evicted merchant) and
// its outbound.Tokens (the broker's tokens, the metrics and logs of a
// rejected one).
type hooks Handler

// Made implements bindings.Hooks.
func (hk *hooks) Made(b *bindings.Binding, track bool) bool { return hk.metrics.Made(b, track) }

// Released implements bindings.Hooks.
func (hk *hooks) Released(b *bindings.Binding) { hk.metrics.Released(b) }

// Drop implements bindings.Hooks.
func (hk *hooks) Drop(b *broker.Binding) { hk.broker.Drop(b) }

// Evicted implements bindings.Hooks: the operator's view forgets the
// evicted wildcard merchant.
func (hk *hooks) Evicted(b *bindings.Binding) {
	if hk.tracker != nil {
		hk.tracker.Forget(b.Merchant)
	}
}

// Get implements outbound.Tokens.
func (hk *hooks) Get(ctx context.Context, b *broker.Binding) (outbound.Entry, error) {
	e, _, err := hk.broker.Get(ctx, b)
	if err != nil {
		return nil, err // a nil Entry, not a nil *broker.Entry
	}
	return e, nil
}

// Purge implements outbound.Tokens: the broker's answer (broker.Reject)
// is counted and logged.
func (hk *hooks) Purge(b *broker.Binding, rejected broker.Token) {
	hk.metrics.Rejected(b, rejected, hk.broker.Reject(b, rejected.Value))
}

// Kept implements outbound.Tokens.
func (hk *hooks) Kept(b *broker.Binding, rejected broker.Token) { hk.metrics.Kept(b, rejected) }

// Accepted implements outbound.Tokens.
func (hk *hooks) Accepted(b *broker.Binding, tok broker.Secret) { hk.broker.Accepted(b, tok) }

// Interface guards.
var (
	_ bindings.Hooks  = (*hooks)(nil)
	_ outbound.Tokens = (*hooks)(nil)
)
