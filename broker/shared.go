package broker

import (
	"context"
)

// SharedCache is the optional second cache tier that a fleet of brokers
// shares (package broker/fleet), consulted only when memory has no usable
// token for a key or a token is due for refresh. Implementations store
// tokens sealed, never in clear, and behave as an empty tier when they
// fail, so that no lookup fails because of them.
type SharedCache interface {
	// Fetch returns a token for key that satisfies usable, minted at most
	// once for the fleet: the stored token (adopted) when usable accepts
	// it, else one mint called under the key's fleet lock and stored. An
	// error from mint is returned unchanged; when the tier is unavailable,
	// Fetch calls mint directly.
	Fetch(ctx context.Context, key string, usable func(Token) bool, mint func(context.Context) (Token, error)) (tok Token, adopted bool, err error)
	// Purge deletes the token stored under key if its fingerprint is
	// fingerprint ("" for any), and announces the purge to every node.
	Purge(ctx context.Context, key, fingerprint string) error
	// OnPurge registers fn, called with the key and fingerprint ("" for
	// any) of every purge another node makes, until unregister is called
	// (more than once is harmless).
	OnPurge(fn func(key, fingerprint string)) (unregister func())
}
