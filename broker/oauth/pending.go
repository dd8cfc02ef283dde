package oauth

import (
	"context"
	"crypto/aes"
	"crypto/cipher"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"sync"
	"time"
)

// ErrUnknownPending is returned by PendingStore.Take when nothing is stored
// under the key: it never was, it was already taken, or it was dropped.
var ErrUnknownPending = errors.New("unknown or already used")

// PendingStore keeps the consents in progress (consent links and
// authorization states) between the request that creates them and the one
// that uses them. Values are sealed by Pendings: a store sees neither the
// link, the state nor the PKCE verifier. Implementations: the Caddy module
// keeps them in Caddy's storage (shared by the instances sharing it, and
// surviving a reload); tests use MemoryPendingStore. Implementations must
// be safe for concurrent use.
type PendingStore interface {
	// Put stores val under key. expires is a hint for clean-up: Pendings
	// checks the expiry itself.
	Put(ctx context.Context, key string, val []byte, expires time.Time) error
	// Take returns the value under key and deletes it, atomically: of
	// concurrent Takes of one key at most one gets the value. It returns an
	// error wrapping ErrUnknownPending when there is none.
	Take(ctx context.Context, key string) ([]byte, error)
}

// MemoryPendingStore is a PendingStore in memory: single-use, but lost
// with the process and not shared between instances. The zero value is
// ready to use.
type MemoryPendingStore struct {
	mu sync.Mutex
	m  map[string][]byte
}

// Put implements PendingStore.
func (s *MemoryPendingStore) Put(_ context.Context, key string, val []byte, _ time.Time) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = map[string][]byte{}
	}
	s.m[key] = val
	return nil
}

// Take implements PendingStore.
func (s *MemoryPendingStore) Take(_ context.Context, key string) ([]byte, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	v, ok := s.m[key]
	if !ok {
		return nil, ErrUnknownPending
	}
	delete(s.m, key)
	return v, nil
}

// Len returns how many values are stored.
func (s *MemoryPendingStore) Len() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// Pending is one consent in progress: a consent link not yet opened, or an
// authorization request waiting for its callback. It holds the PKCE
// verifier and the nonce, so it is only ever stored sealed.
type Pending struct {
	// Provider is the provider's name.
	Provider string `json:"p"`
	// Merchant is the merchant who consents.
	Merchant string `json:"m"`
	// ReturnURL is where the browser is sent after the callback, checked
	// against the provider's allow-list. Optional.
	ReturnURL string `json:"r,omitempty"`
	// RedirectURI is the registered callback URL of this consent.
	RedirectURI string `json:"u"`
	// Verifier is the PKCE code verifier (authorization states only).
	Verifier string `json:"v,omitempty"`
	// Nonce is the OpenID nonce, when openid is asked for.
	Nonce string `json:"n,omitempty"`
	// Expires is when the link or the state stops being accepted.
	Expires time.Time `json:"e"`
}

// Pendings seals consents in progress into a PendingStore. A record is
// stored under a key derived from its secret (the link id or the state) by
// SHA-256, and encrypted (AES-256-GCM) with another key derived from the
// same secret: whoever reads the store learns nothing usable, and only the
// holder of the link or state can open its record, once.
type Pendings struct {
	// Store keeps the sealed records.
	Store PendingStore
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Kinds of pending records.
const (
	kindLink  = "link"
	kindState = "state"
)

func (p *Pendings) now() time.Time {
	if p.Now == nil {
		return time.Now()
	}
	return p.Now()
}

// randomString returns n random bytes, base64url-encoded.
func randomString(n int) string {
	b := make([]byte, n)
	_, _ = rand.Read(b) // crypto/rand.Read never fails (Go 1.24)
	return base64.RawURLEncoding.EncodeToString(b)
}

func derive(purpose, kind, secret string) []byte {
	h := sha256.Sum256([]byte("token_broker consent " + purpose + "\x00" + kind + "\x00" + secret))
	return h[:]
}

// storeKey is the store key of a secret: kind + "/" + hex of a SHA-256.
func storeKey(kind, secret string) string {
	return kind + "/" + hex.EncodeToString(derive("key", kind, secret))
}

func aead(kind, secret string) cipher.AEAD {
	block, _ := aes.NewCipher(derive("seal", kind, secret)) // a 32-byte key never fails
	g, _ := cipher.NewGCM(block)
	return g
}

// put seals rec under secret.
func (p *Pendings) put(ctx context.Context, kind, secret string, rec Pending) error {
	plain, err := json.Marshal(rec)
	if err != nil {
		return err
	}
	g := aead(kind, secret)
	nonce := make([]byte, g.NonceSize())
	_, _ = rand.Read(nonce)
	sealed := g.Seal(nonce, nonce, plain, []byte(kind))
	if err := p.Store.Put(ctx, storeKey(kind, secret), sealed, rec.Expires); err != nil {
		return fmt.Errorf("storing the consent %s: %w", kind, err)
	}
	return nil
}

// take opens and consumes the record of secret: ErrUnknownPending when
// there is none (or it does not open), *ConsentError "expired" when it has
// expired.
func (p *Pendings) take(ctx context.Context, kind, secret string) (Pending, error) {
	if secret == "" || len(secret) > 512 {
		return Pending{}, ErrUnknownPending
	}
	sealed, err := p.Store.Take(ctx, storeKey(kind, secret))
	if err != nil {
		return Pending{}, err
	}
	g := aead(kind, secret)
	if len(sealed) < g.NonceSize() {
		return Pending{}, ErrUnknownPending
	}
	plain, err := g.Open(nil, sealed[:g.NonceSize()], sealed[g.NonceSize():], []byte(kind))
	if err != nil {
		return Pending{}, ErrUnknownPending
	}
	var rec Pending
	if err := json.Unmarshal(plain, &rec); err != nil {
		return Pending{}, ErrUnknownPending
	}
	if !p.now().Before(rec.Expires) {
		return rec, errExpired
	}
	return rec, nil
}

var errExpired = errors.New("expired")
