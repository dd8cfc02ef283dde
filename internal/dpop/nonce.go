package dpop

import (
	"fmt"
	"net/url"
	"sync"
)

// Server is the kind of server a nonce comes from: a Key keeps an
// authorization server's nonces apart from a resource server's at the same
// origin, as each accepts only its own (RFC 9449 §9).
type Server uint8

const (
	// AuthorizationServer is a token or PAR endpoint (Transport).
	AuthorizationServer Server = iota + 1
	// ResourceServer is an API that a DPoP-bound token is presented to.
	ResourceServer
)

// String names the kind of server: "authorization server", "resource
// server".
func (s Server) String() string {
	switch s {
	case AuthorizationServer:
		return "authorization server"
	case ResourceServer:
		return "resource server"
	}
	return fmt.Sprintf("server kind %d", uint8(s))
}

// maxServers bounds the servers (kind and origin) whose nonce a Key
// remembers: a provider's authorization server and its resource servers
// are a handful.
const maxServers = 64

// nonces holds the last DPoP-Nonce of each server, by its kind and
// origin (nonceKey), and the size of the last one it refused since.
type nonces struct {
	mu sync.RWMutex
	m  map[string]nonceEntry
}

// nonceEntry is what a Key knows of one server's nonces.
type nonceEntry struct {
	// value is the last nonce accepted, "" when none.
	value string
	// refused is the size in bytes of the last nonce refused since value
	// was accepted, 0 when none; badChars that it was refused for its
	// characters rather than its size.
	refused  int
	badChars bool
}

// NonceError is a DPoP-Nonce a server sent that a Key does not remember:
// over MaxNonce bytes, or with characters a nonce may not hold (RFC 9449
// §8.1). It never holds the nonce.
type NonceError struct {
	// Server is the kind of server that sent the nonce.
	Server Server
	// Origin is the server's origin, scheme://host[:port].
	Origin string
	// Size is the nonce's length in bytes.
	Size int
	// BadChars reports a nonce refused for its characters, not its size.
	BadChars bool
}

// Error says which server sent what kind of nonce, and what to do.
func (e *NonceError) Error() string {
	if e.BadChars {
		return fmt.Sprintf("the DPoP %s %s sent a DPoP-Nonce of %d bytes with characters a nonce may not hold (RFC 9449 §8.1: printable ASCII without space, quote or backslash): "+
			"the proofs cannot carry it; ask the provider to fix its nonces", e.Server, e.Origin, e.Size)
	}
	return fmt.Sprintf("the DPoP %s %s sent a DPoP-Nonce of %d bytes, over the limit of %d bytes a proof carries: "+
		"the proofs cannot carry it, and a server that demands it refuses them; ask the provider to send shorter nonces", e.Server, e.Origin, e.Size, MaxNonce)
}

// Nonce returns the last DPoP-Nonce remembered for the server of kind s
// at the origin of u (scheme://host[:port], lower-case, without the
// scheme's default port), "" when none (or k is nil). It does not
// allocate.
func (k *Key) Nonce(s Server, u *url.URL) string {
	var b [128]byte
	return k.entry(nonceKey(b[:0], s, u)).value
}

// entry returns what k (nil: nothing) knows of the server whose nonce key
// (nonceKey) is key. The key stays bytes: looking it up allocates nothing.
func (k *Key) entry(key []byte) nonceEntry {
	if k == nil {
		return nonceEntry{}
	}
	k.nonces.mu.RLock()
	defer k.nonces.mu.RUnlock()
	return k.nonces.m[string(key)]
}

// SetNonce remembers the DPoP-Nonce a server of kind s at the origin of u
// (as for Nonce) sent, for the next proofs to that server; "" is ignored.
// A value over MaxNonce bytes, or with characters RFC 9449 §8.1 does not
// allow, is not remembered: SetNonce returns its *NonceError, which
// RefusedNonce returns too until the server sends a usable nonce. At most
// maxServers servers are kept: a new one beyond that replaces an arbitrary
// one. It allocates only when it stores a new nonce or a refusal.
func (k *Key) SetNonce(s Server, u *url.URL, nonce string) error {
	if nonce == "" {
		return nil
	}
	var b [128]byte
	key := nonceKey(b[:0], s, u)
	e := nonceEntry{value: nonce}
	if !checkNonce(nonce) {
		e = nonceEntry{refused: len(nonce), badChars: len(nonce) <= MaxNonce}
	} else if e := k.entry(key); e.value == nonce && e.refused == 0 {
		return nil // kept already; a nonce re-sent after a refusal is stored again, which clears the refusal
	}
	o := string(key)
	k.nonces.mu.Lock()
	defer k.nonces.mu.Unlock()
	if k.nonces.m == nil {
		k.nonces.m = map[string]nonceEntry{}
	}
	old, ok := k.nonces.m[o]
	if !ok && len(k.nonces.m) >= maxServers {
		for other := range k.nonces.m {
			delete(k.nonces.m, other)
			break
		}
	}
	if e.refused == 0 {
		k.nonces.m[o] = e
		return nil
	}
	old.refused, old.badChars = e.refused, e.badChars
	k.nonces.m[o] = old
	return nonceError(s, o, old)
}

// RefusedNonce returns the *NonceError of the last nonce the server of
// kind s at the origin of u sent that was not remembered (SetNonce), nil
// when it has sent a usable nonce since, or none was refused.
func (k *Key) RefusedNonce(s Server, u *url.URL) error {
	if k == nil {
		return nil
	}
	var b [128]byte
	key := nonceKey(b[:0], s, u)
	e := k.entry(key)
	if e.refused == 0 {
		return nil
	}
	return nonceError(s, string(key), e)
}

// nonceError is the *NonceError of the refusal e records for the server
// of kind s whose nonce key (nonceKey) is key.
func nonceError(s Server, key string, e nonceEntry) error {
	return &NonceError{Server: s, Origin: key[1:], Size: e.refused, BadChars: e.badChars}
}

// nonceKey appends to b the key of a server's nonce: its kind, then its
// origin (appendOrigin).
func nonceKey(b []byte, s Server, u *url.URL) []byte {
	return appendOrigin(append(b, byte(s)), u)
}
