package broker

import (
	"context"
)

// forced is a fetch that calls the token API whatever is cached
// (Broker.Check); calls is read once the fetch's result is received.
type forced struct{ calls int }

// Checked is the outcome of a Check.
type Checked struct {
	// Entry is the cached entry of the token the check's fetch obtained;
	// nil when it failed.
	Entry *Entry
	// Calls is how many times the check called the token API: 0 when the
	// failure policy refused it or when it joined a fetch in flight.
	Calls int
	// Joined reports that the check took the outcome of a fetch in flight.
	Joined bool
}

// Check fetches a new token for the binding from its Source, whatever is
// cached: an operator's test of a merchant's credentials. It is a fetch
// like any other (one per key at a time, through the failure policy,
// observed, cached and stored in the shared tier) that adopts no stored
// token; a fetch in flight is joined, as a lookup joins it. A failed check
// leaves the cached token in the cache.
func (br *Broker) Check(ctx context.Context, b *Binding) (Checked, error) {
	force := &forced{}
	defer br.waitFor(b.key)()
	got, err := br.await(ctx, b, force, "the check's token")
	if err != nil {
		return Checked{}, err
	}
	return Checked{Entry: got.entry, Calls: force.calls, Joined: got.joined}, got.err
}
