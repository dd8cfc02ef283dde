package oauth

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"sync"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
)

// SaveTimeout bounds the work that goes on when the request that began it
// ends, because losing it would lose the merchant's consent: a refresh
// once sent (its answer, the save of a rotated refresh token), a consent
// callback once its state is spent (the code exchange, the ID token, the
// save, the put-backs after a failure), and a LockedLoader's rewrite.
const SaveTimeout = 30 * time.Second

// detached returns ctx without its cancellation, bounded by SaveTimeout
// from now.
func detached(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), SaveTimeout)
}

// ErrNoRefreshToken is returned by Store.Load when no refresh token is
// stored under the key.
var ErrNoRefreshToken = errors.New("no refresh token is stored")

// Store keeps refresh tokens durably (kvstore.Refresh, fleet.Store,
// MemoryStore) under the keys StoreKey makes. Implementations must be safe
// for concurrent use.
type Store interface {
	// Load returns the refresh token stored under key, or an error
	// wrapping ErrNoRefreshToken when there is none.
	Load(ctx context.Context, key string) (broker.Secret, error)
	// Save stores rt under key, durably, replacing the previous one.
	Save(ctx context.Context, key string, rt broker.Secret) error
	// Lock serialises the refreshes of one key across goroutines (and
	// across instances when the storage is shared). It waits until the
	// lock is held or ctx is done; unlock releases it.
	Lock(ctx context.Context, key string) (unlock func(), err error)
}

// LockedLoader is implemented by a Store that can rewrite a refresh token
// as it loads it (to seal it with its current key). The holder of the
// key's lock calls LoadLocked instead of Load: only under the lock can a
// rewrite not overwrite a newer refresh token. Load never rewrites.
type LockedLoader interface {
	// LoadLocked is Load, called with Lock held for key.
	LoadLocked(ctx context.Context, key string) (broker.Secret, error)
}

// Resave saves rt under key in s again, best effort: bounded by
// SaveTimeout, even when ctx is cancelled. A LockedLoader calls it to
// store again, sealed with the current key, a refresh token it loaded.
func Resave(ctx context.Context, s Store, key string, rt broker.Secret) {
	ctx, cancel := detached(ctx)
	defer cancel()
	_ = s.Save(ctx, key, rt)
}

// StoreKey is the key of a merchant's refresh token of the provider cfg
// describes: "<name>/<endpoint id>/<merchant>", the endpoint id being 12
// hex characters of a SHA-256 over cfg.StoreNamespace, the issuer (else
// the token URL) and the client id. So a refresh token is only ever sent
// to the endpoint and client it was issued to, and a change of anything
// else (secret, timeouts, scopes) keeps the tokens.
func StoreKey(cfg Config, merchant string) string {
	h := sha256.New()
	for _, v := range []string{cfg.StoreNamespace, cmp.Or(cfg.Issuer, cfg.TokenURL), cfg.ClientID} {
		fmt.Fprintf(h, "%d:%s", len(v), v)
	}
	return cmp.Or(cfg.Name, ProviderName) + "/" + hex.EncodeToString(h.Sum(nil))[:12] + "/" + merchant
}

// MemoryStore is a Store in memory, for tests and demos. The zero value is
// ready to use.
type MemoryStore struct {
	mu     sync.Mutex
	tokens map[string]broker.Secret
	locks  keylock.Map
}

// Load implements Store.
func (m *MemoryStore) Load(_ context.Context, key string) (broker.Secret, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	rt, ok := m.tokens[key]
	if !ok {
		return "", ErrNoRefreshToken
	}
	return rt, nil
}

// Save implements Store.
func (m *MemoryStore) Save(_ context.Context, key string, rt broker.Secret) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.tokens == nil {
		m.tokens = map[string]broker.Secret{}
	}
	m.tokens[key] = rt
	return nil
}

// Lock implements Store with one lock per key.
func (m *MemoryStore) Lock(ctx context.Context, key string) (func(), error) {
	return m.locks.Lock(ctx, key)
}

var _ Store = (*MemoryStore)(nil)
