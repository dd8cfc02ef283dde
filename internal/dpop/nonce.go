package dpop

import "sync"

// maxOrigins bounds the origins whose nonce a Key remembers: a provider's
// authorization server and its resource servers are a handful.
const maxOrigins = 64

// nonces holds the last DPoP-Nonce of each server origin.
type nonces struct {
	mu sync.RWMutex
	m  map[string]string
}

// Nonce returns the last DPoP-Nonce remembered for the server origin
// (Origin), "" when none (or k is nil).
func (k *Key) Nonce(origin string) string {
	if k == nil {
		return ""
	}
	k.nonces.mu.RLock()
	defer k.nonces.mu.RUnlock()
	return k.nonces.m[origin]
}

// SetNonce remembers the DPoP-Nonce a server at origin (Origin) sent, for
// the proofs that follow. A value that is not a nonce (RFC 9449 §8.1) is
// ignored. At most 64 origins are kept: a new one beyond that replaces an
// arbitrary one.
func (k *Key) SetNonce(origin, nonce string) {
	if !checkNonce(nonce) || k.Nonce(origin) == nonce {
		return
	}
	k.nonces.mu.Lock()
	defer k.nonces.mu.Unlock()
	if k.nonces.m == nil {
		k.nonces.m = map[string]string{}
	}
	if _, ok := k.nonces.m[origin]; !ok && len(k.nonces.m) >= maxOrigins {
		for o := range k.nonces.m {
			delete(k.nonces.m, o)
			break
		}
	}
	k.nonces.m[origin] = nonce
}
