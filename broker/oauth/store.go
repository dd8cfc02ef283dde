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

// SaveTimeout bounds a refresh request once it is sent (its answer and
// the saving of a refresh token the provider has just issued, a rotated
// one), and a consent callback's work once its state is spent (the code
// exchange, the ID token's verification, the save), which go on when the
// request that caused them is cancelled or its deadline passes: the old
// token, or the state and the code, no longer work, so losing the new one
// would lose the merchant's consent. A LockedLoader's rewrite of the value
// it loaded is bounded by it too, and so is each put-back of a consent
// callback that failed (its consent link, its state kept for a reload),
// from the failure on.
const SaveTimeout = 30 * time.Second

// detached returns ctx without its cancellation, bounded by SaveTimeout
// from now: work that must finish once begun (see SaveTimeout) goes on
// whatever the request that began it does.
func detached(ctx context.Context) (context.Context, context.CancelFunc) {
	return context.WithTimeout(context.WithoutCancel(ctx), SaveTimeout)
}

// ErrNoRefreshToken is returned by Store.Load when no refresh token is
// stored under the key.
var ErrNoRefreshToken = errors.New("no refresh token is stored")

// Store keeps refresh tokens durably. Implementations: kvstore.Refresh on
// Caddy's storage, fleet.Store in Redis; tests use MemoryStore. Keys are
// made by StoreKey. Implementations must be safe for concurrent use.
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
// as it loads it, for example to seal it with its current key. Whoever
// holds the key's lock (Store.Lock) calls LoadLocked instead of Load:
// only under the lock can a rewrite not overwrite a newer refresh token
// that another refresh saved meanwhile. Load never rewrites.
type LockedLoader interface {
	// LoadLocked is Load, called with Lock held for key.
	LoadLocked(ctx context.Context, key string) (broker.Secret, error)
}

// StoreKey is the key under which a merchant's refresh token of the
// provider cfg describes is stored: "<name>/<endpoint id>/<merchant>".
// The endpoint id is the first 12 hex characters of a SHA-256 over what
// a refresh token is bound to, none of it secret: cfg.StoreNamespace (the
// registry), the issuer (or, without one, the token URL) and the client
// id. So a refresh token is only ever sent to the endpoint and client it
// was issued to (an issuer or token_url change starts without one), and
// two registries with a provider of the same name keep apart; a change of
// anything else (secret, timeouts, scopes) keeps the tokens.
func StoreKey(cfg Config, merchant string) string {
	h := sha256.New()
	for _, v := range []string{cfg.StoreNamespace, cmp.Or(cfg.Issuer, cfg.TokenURL), cfg.ClientID} {
		fmt.Fprintf(h, "%d:%s", len(v), v)
	}
	return cmp.Or(cfg.Name, ProviderName) + "/" + hex.EncodeToString(h.Sum(nil))[:12] + "/" + merchant
}

// MemoryStore is a Store in memory, for tests and demos: its tokens do not
// survive the process. The zero value is ready to use.
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
