// Package brokertest helps tests build what the broker's API builds from a
// registry, and hold bindings as requests in flight do. Tests only.
package brokertest

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"testing"

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

// InFlight drives tests of token requests that end after their binding
// was evicted: a request takes a merchant's binding (Hold), and its token
// request, which must fail, comes later (Failed). Make it with its
// fields set.
type InFlight struct {
	// Broker makes the token requests.
	Broker *broker.Broker
	// Bind takes a merchant's binding as a request does.
	Bind func(id string) (*broker.Binding, error)
	// Flood is the prefix of the ids of a flood (Step).
	Flood string

	held map[string]*broker.Binding
}

// Hold takes the binding of merchant id, as a request does, and returns
// it; Held returns it until id is held again.
func (f *InFlight) Hold(tb testing.TB, id string) *broker.Binding {
	tb.Helper()
	b, err := f.Bind(id)
	if err != nil {
		tb.Fatalf("hold %s: %v", id, err)
	}
	if f.held == nil {
		f.held = map[string]*broker.Binding{}
	}
	f.held[id] = b
	return b
}

// Held returns the binding Hold took last for merchant id.
func (f *InFlight) Held(id string) *broker.Binding { return f.held[id] }

// Failed makes b's token request, and returns an error when it got a
// token.
func (f *InFlight) Failed(b *broker.Binding) error {
	if _, _, err := f.Broker.Get(context.Background(), b); err == nil {
		return fmt.Errorf("%s: a token, want a failure", b.Merchant)
	}
	return nil
}

// Step runs a step: "hold ID" (Hold), "fetch ID" (the token request of
// the binding held for ID), "flood N" (N ids, Flood then 0, 1 …, held,
// each evicting an older one, then fetched). It reports false for
// another step.
func (f *InFlight) Step(tb testing.TB, step string) bool {
	tb.Helper()
	fetch := func(id string) {
		tb.Helper()
		if err := f.Failed(f.held[id]); err != nil {
			tb.Fatal(err)
		}
	}
	verb, arg, _ := strings.Cut(step, " ")
	switch verb {
	case "hold":
		f.Hold(tb, arg)
	case "fetch":
		fetch(arg)
	case "flood":
		n, err := strconv.Atoi(arg)
		if err != nil {
			tb.Fatalf("step %q: %v", step, err)
		}
		for i := range n {
			f.Hold(tb, f.Flood+strconv.Itoa(i))
		}
		for i := range n {
			fetch(f.Flood + strconv.Itoa(i))
		}
	default:
		return false
	}
	return true
}
