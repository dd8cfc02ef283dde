// Package brokertest helps tests build what the broker's API builds from a
// registry. Tests only.
package brokertest

import "github.com/tokenbroker/caddy-token-broker/broker"

// NewBinding returns the binding of req.Merchant under a profile of its
// own (source, scopes, audience and lifetime of req), its cache key
// computed, as a registry builds one under a shared profile.
func NewBinding(sourceID string, src broker.Source, req broker.Request) *broker.Binding {
	return broker.NewBindingFor(broker.NewProfile(sourceID, src, req.Scopes, req.Audience, req.Lifetime), req.Merchant, req.Organisation)
}
