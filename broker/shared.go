package broker

import (
	"context"
)

// SharedCache is the optional second cache tier (L2) that a fleet of brokers
// shares, such as Redis (package broker/fleet). The broker consults it only
// when its own memory (L1) has no usable token for a key, or when a token is
// past its planned refresh: a hit in memory never reaches it.
//
// Implementations must be safe for concurrent use, must store tokens sealed
// (never in clear), and must never make a lookup fail because the shared
// tier itself is down, slow or returns garbage: they then behave as if the
// tier were empty and mint locally.
type SharedCache interface {
	// Fetch returns a token for key that satisfies usable, minted at most
	// once for the whole fleet. It reads the stored token and returns it
	// (adopted = true) when usable accepts it. Otherwise it takes the key's
	// fleet lock, or waits within ctx for the node holding it to publish
	// its result; under the lock it reads again, and only then calls mint,
	// stores the minted token until its expiry and announces it to the
	// other nodes. An error from mint is returned unchanged (so the broker
	// can classify it); when the tier is unavailable, Fetch calls mint
	// directly.
	Fetch(ctx context.Context, key string, usable func(Token) bool, mint func(context.Context) (Token, error)) (tok Token, adopted bool, err error)
	// Purge deletes the token stored under key if its fingerprint is
	// fingerprint (compare-and-delete; "" deletes whatever is stored), and
	// announces the purge to every node, whose OnPurge callback then drops
	// the key from memory.
	Purge(ctx context.Context, key, fingerprint string) error
	// OnPurge registers fn, called with the key and the fingerprint of the
	// token purged ("" for any) whenever another node purges a key, until
	// unregister is called (a call already under way may still finish);
	// calling unregister more than once is harmless.
	OnPurge(fn func(key, fingerprint string)) (unregister func())
}
