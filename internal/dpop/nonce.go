package dpop

import (
	"net/url"
	"sync"
)

// Server is the kind of server a nonce comes from. An authorization
// server's nonces and a resource server's are different, and each is
// accepted only by the server that issued it (RFC 9449 §9), even when
// both answer at one origin (an API gateway's host): a Key keeps them
// apart.
type Server uint8

const (
	// AuthorizationServer is a token or PAR endpoint (Transport).
	AuthorizationServer Server = iota + 1
	// ResourceServer is an API that a DPoP-bound token is presented to.
	ResourceServer
)

// maxServers bounds the servers (kind and origin) whose nonce a Key
// remembers: a provider's authorization server and its resource servers
// are a handful.
const maxServers = 64

// nonces holds the last DPoP-Nonce of each server, by its kind and
// origin (nonceKey).
type nonces struct {
	mu sync.RWMutex
	m  map[string]string
}

// Nonce returns the last DPoP-Nonce remembered for the server of kind s
// at the origin of u (scheme://host[:port], lower-case, without the
// scheme's default port), "" when none (or k is nil). It does not
// allocate.
func (k *Key) Nonce(s Server, u *url.URL) string {
	var b [128]byte
	return k.nonce(nonceKey(b[:0], s, u))
}

// nonce returns the last DPoP-Nonce remembered under key (nonceKey), ""
// when none (or k is nil). The key stays bytes: looking it up allocates
// nothing.
func (k *Key) nonce(key []byte) string {
	if k == nil {
		return ""
	}
	k.nonces.mu.RLock()
	defer k.nonces.mu.RUnlock()
	return k.nonces.m[string(key)]
}

// SetNonce remembers the DPoP-Nonce a server of kind s at the origin of u
// (as for Nonce) sent, for the proofs that follow to that server. A value
// that is not a nonce (RFC 9449 §8.1) is ignored. At most 64 servers are
// kept: a new one beyond that replaces an arbitrary one. It allocates only
// when it stores a new nonce.
func (k *Key) SetNonce(s Server, u *url.URL, nonce string) {
	var b [128]byte
	key := nonceKey(b[:0], s, u)
	if !checkNonce(nonce) || k.nonce(key) == nonce {
		return
	}
	o := string(key)
	k.nonces.mu.Lock()
	defer k.nonces.mu.Unlock()
	if k.nonces.m == nil {
		k.nonces.m = map[string]string{}
	}
	if _, ok := k.nonces.m[o]; !ok && len(k.nonces.m) >= maxServers {
		for old := range k.nonces.m {
			delete(k.nonces.m, old)
			break
		}
	}
	k.nonces.m[o] = nonce
}

// nonceKey appends to b the key of a server's nonce: its kind, then its
// origin (appendOrigin).
func nonceKey(b []byte, s Server, u *url.URL) []byte {
	return appendOrigin(append(b, byte(s)), u)
}
