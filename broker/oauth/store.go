package oauth

import (
	"context"
	"errors"
	"sync"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// ErrNoRefreshToken is returned by Store.Load when no refresh token is
// stored under the key.
var ErrNoRefreshToken = errors.New("no refresh token is stored")

// Store keeps refresh tokens durably. Implementations: the Caddy module
// provides one on Caddy's storage; tests use MemoryStore. Keys are made by
// StoreKey. Implementations must be safe for concurrent use.
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

// StoreKey is the key under which a merchant's refresh token is stored:
// the provider's name (as in the registry file, not its versioned ID, so
// that a configuration change keeps the tokens), "/", the merchant id.
func StoreKey(provider, merchant string) string { return provider + "/" + merchant }

// MemoryStore is a Store in memory, for tests and demos: its tokens do not
// survive the process. The zero value is ready to use.
type MemoryStore struct {
	mu     sync.Mutex
	tokens map[string]broker.Secret
	locks  map[string]chan struct{}
	saves  int
}

// NewMemoryStore returns an empty MemoryStore.
func NewMemoryStore() *MemoryStore { return &MemoryStore{} }

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
	m.saves++
	return nil
}

// Saves returns how many times Save was called.
func (m *MemoryStore) Saves() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.saves
}

// Lock implements Store with one lock per key.
func (m *MemoryStore) Lock(ctx context.Context, key string) (func(), error) {
	m.mu.Lock()
	if m.locks == nil {
		m.locks = map[string]chan struct{}{}
	}
	ch, ok := m.locks[key]
	if !ok {
		ch = make(chan struct{}, 1)
		m.locks[key] = ch
	}
	m.mu.Unlock()
	select {
	case ch <- struct{}{}:
	case <-ctx.Done():
		return nil, ctx.Err()
	}
	var once sync.Once
	return func() { once.Do(func() { <-ch }) }, nil
}

var _ Store = (*MemoryStore)(nil)
