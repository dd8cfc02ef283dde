package dpop

import (
	"net/url"
	"sync"
)

// maxOrigins bounds the origins whose nonce a Key remembers: a provider's
// authorization server and its resource servers are a handful.
const maxOrigins = 64

// nonces holds the last DPoP-Nonce of each server origin.
type nonces struct {
	mu sync.RWMutex
	m  map[string]string
}

// Nonce returns the last DPoP-Nonce remembered for the origin of u
// (scheme://host[:port], lower-case, without the scheme's default port),
// "" when none (or k is nil). It does not allocate.
func (k *Key) Nonce(u *url.URL) string {
	var b [128]byte
	return k.nonce(appendOrigin(b[:0], u))
}

// nonce returns the last DPoP-Nonce remembered for origin (appendOrigin),
// "" when none (or k is nil). The origin stays bytes: looking it up
// allocates nothing.
func (k *Key) nonce(origin []byte) string {
	if k == nil {
		return ""
	}
	k.nonces.mu.RLock()
	defer k.nonces.mu.RUnlock()
	return k.nonces.m[string(origin)]
}

// SetNonce remembers the DPoP-Nonce a server at the origin of u (as for
// Nonce) sent, for the proofs that follow. A value that is not a nonce
// (RFC 9449 §8.1) is ignored. At most 64 origins are kept: a new one
// beyond that replaces an arbitrary one. It allocates only when it stores
// a new nonce.
func (k *Key) SetNonce(u *url.URL, nonce string) {
	var b [128]byte
	origin := appendOrigin(b[:0], u)
	if !checkNonce(nonce) || k.nonce(origin) == nonce {
		return
	}
	o := string(origin)
	k.nonces.mu.Lock()
	defer k.nonces.mu.Unlock()
	if k.nonces.m == nil {
		k.nonces.m = map[string]string{}
	}
	if _, ok := k.nonces.m[o]; !ok && len(k.nonces.m) >= maxOrigins {
		for old := range k.nonces.m {
			delete(k.nonces.m, old)
			break
		}
	}
	k.nonces.m[o] = nonce
}
