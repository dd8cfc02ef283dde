// Package brokertest helps tests build what the broker's API builds from a
// registry. Tests only.
package brokertest

import (
	"context"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// NewBinding returns the binding of req.Merchant under a profile of its
// own (source, scopes, audience and lifetime of req), its cache key
// computed, as a registry builds one under a shared profile.
func NewBinding(sourceID string, src broker.Source, req broker.Request) *broker.Binding {
	return broker.NewBindingFor(broker.NewProfile(sourceID, src, req.Scopes, req.Audience, req.Lifetime), req.Merchant, req.Organisation)
}

// Token returns br's token for b, as a lookup gets it: the token of the
// entry br.Get returns, or Get's error.
func Token(ctx context.Context, br *broker.Broker, b *broker.Binding) (broker.Token, error) {
	e, _, err := br.Get(ctx, b)
	if err != nil {
		return broker.Token{}, err
	}
	return e.Token(), nil
}
