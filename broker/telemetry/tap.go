package telemetry

import (
	"context"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TapObserver is the observer of a binding that no handler made (an
// operator's check of a merchant not served yet): it tells Tap of the
// binding's token API calls, under the provider name Provider.
type TapObserver struct {
	// Tap is told of the fetches.
	Tap Tap
	// Provider is the binding's provider name.
	Provider string
}

// Lookup implements broker.Observer: lookups are not told.
func (TapObserver) Lookup(*broker.Binding, broker.Result) {}

// Fetched implements broker.Observer: it tells Tap.
func (o TapObserver) Fetched(_ context.Context, b *broker.Binding, _ broker.Token, _ time.Duration, _ bool, err error) {
	o.Tap.Fetched(o.Provider, b, err)
}

// Interface guard.
var _ broker.Observer = TapObserver{}
