package dpop

import (
	"sync"
	"sync/atomic"
)

// maxOrigins bounds the origins whose nonce a Key remembers: a provider's
// authorization server and its resource servers are a handful.
const maxOrigins = 64

// nonces holds the last DPoP-Nonce of each server origin: a map replaced
// on change, so that reading (every proof) takes no lock.
type nonces struct {
	mu  sync.Mutex // orders the replacements
	cur atomic.Pointer[map[string]string]
}

// nonceMap is the current map of nonces by origin, nil when none (or k
// is nil).
func (k *Key) nonceMap() map[string]string {
	if k == nil {
		return nil
	}
	if m := k.nonces.cur.Load(); m != nil {
		return *m
	}
	return nil
}

// Nonce returns the last DPoP-Nonce remembered for the server origin
// (Origin), "" when none (or k is nil).
func (k *Key) Nonce(origin string) string { return k.nonceMap()[origin] }

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
	old := k.nonceMap()
	next := make(map[string]string, len(old)+1)
	for o, n := range old {
		next[o] = n
	}
	if _, ok := next[origin]; !ok && len(next) >= maxOrigins {
		for o := range next {
			delete(next, o)
			break
		}
	}
	next[origin] = nonce
	k.nonces.cur.Store(&next)
}
