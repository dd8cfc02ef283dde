package broker

import (
	"context"
)

// forced is a fetch that calls the token API whatever is cached
// (Broker.Check). calls is written by the fetch and read by the lookup
// that started it once the fetch's result is received.
type forced struct{ calls int }

// Checked is the outcome of a Check.
type Checked struct {
	// Entry is the cached entry of the token the check's fetch obtained;
	// nil when it failed.
	Entry *Entry
	// Calls is how many times the check called the token API: 0 when the
	// failure policy refused the fetch (a key or source backoff, an open
	// breaker: RetryAfterOf of the error says for how long) or when the
	// check joined a fetch in flight.
	Calls int
	// Joined reports that a fetch of the key was in flight and the check
	// took its outcome instead of starting one.
	Joined bool
}

// Check fetches a new token for the binding from its Source, whatever is
// cached: an operator's test of a merchant's credentials. It is a fetch
// like any other: one per key at a time (a fetch in flight for the key is
// joined instead), through the one failure policy (a backoff or an open
// breaker refuses it without calling the token API), reported to the
// binding's observer, and its token cached and, with a shared tier,
// stored there (a token stored there is not adopted). A failed check
// leaves the cached token, if any, in the cache. Check waits for the
// fetch or for ctx to end, like a lookup: a fetch it joined keeps its
// place in the budget's queue while the check waits, and one that its
// budget refused by a rule of the request that started it (a refresh-ahead
// never waits, a request whose deadline was closer) is not the check's
// answer: the check fetches on its own.
func (br *Broker) Check(ctx context.Context, b *Binding) (Checked, error) {
	force := &forced{}
	defer br.waitFor(b.key)()
	got, err := br.await(ctx, b, force, "the check's token")
	if err != nil {
		return Checked{}, err
	}
	return Checked{Entry: got.entry, Calls: force.calls, Joined: got.joined}, got.err
}
