// Package kvstore keeps merchants' refresh tokens and consents in progress
// in a key-value storage with locks (the methods of Caddy's
// certmagic.Storage that it uses): the file system by default, shared by
// the instances that share the storage. Refresh stores the refresh tokens
// (sealed when it has keys), Pending the consents in progress, and a
// Sweeper deletes the expired ones.
package kvstore

import (
	"context"
	"errors"
	"fmt"
	"io/fs"
	"net/url"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// Storage is the part of certmagic.Storage the stores use. Load
// and List fail with an error wrapping fs.ErrNotExist for a missing key;
// Lock blocks until name is locked across the instances sharing the
// storage. It is safe for concurrent use.
type Storage interface {
	// Lock locks name across the instances sharing the storage.
	Lock(ctx context.Context, name string) error
	// Unlock releases the lock on name.
	Unlock(ctx context.Context, name string) error
	// Store writes value under key.
	Store(ctx context.Context, key string, value []byte) error
	// Load reads the value under key.
	Load(ctx context.Context, key string) ([]byte, error)
	// Delete removes key.
	Delete(ctx context.Context, key string) error
	// List returns the keys under path (and below it, if recursive).
	List(ctx context.Context, path string, recursive bool) ([]string, error)
}

// Refresh keeps merchants' refresh tokens in S, so that a rotated
// refresh token survives a restart and is shared by every instance using
// the same storage. Keys are oauth.StoreKey(provider config, merchant).
// With Keys, each refresh token is sealed, its storage key as associated
// data, so a value copied under another key does not open.
type Refresh struct {
	// S is the storage.
	S Storage
	// Locks serialise refreshes of one key inside this process (across
	// the registries of a reload too) before the storage lock (which, on
	// the file system, polls) serialises them across processes. Required.
	Locks *keylock.Map
	// Keys, when set, seal the refresh tokens that Save stores and open
	// those that Load reads; a value stored in clear (before Keys were
	// set) or sealed with an old key is still read, and sealed with the
	// current key by LoadLocked or the next Save. Nil: stored in clear.
	Keys *seal.Keyring
}

// RefreshTokenPrefix is where refresh tokens live in the storage.
const RefreshTokenPrefix = "token_broker/refresh_tokens/"

func refreshKey(key string) string { return RefreshTokenPrefix + url.PathEscape(key) }

// Load returns the stored refresh token of key, opened with Keys when it
// is sealed. It never rewrites the stored value.
func (st Refresh) Load(ctx context.Context, key string) (broker.Secret, error) {
	rt, _, err := st.load(ctx, key)
	return rt, err
}

// LoadLocked is Load, called with Lock held for key: with Keys, a value
// stored in clear or sealed with an old key is then stored again, sealed
// with the current key (oauth.Resave): when that fails, the refresh token
// is still returned, and the next LoadLocked tries again.
func (st Refresh) LoadLocked(ctx context.Context, key string) (broker.Secret, error) {
	rt, b, err := st.load(ctx, key)
	if err != nil || st.Keys == nil || st.Keys.IsCurrent(b) {
		return rt, err
	}
	oauth.Resave(ctx, st, key, rt)
	return rt, nil
}

// load returns the stored refresh token of key, opened with Keys when it
// is sealed, and the stored value.
func (st Refresh) load(ctx context.Context, key string) (broker.Secret, []byte, error) {
	name := refreshKey(key)
	b, err := st.S.Load(ctx, name)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(b) == 0) {
		return "", nil, oauth.ErrNoRefreshToken
	}
	if err != nil {
		return "", nil, err
	}
	if !seal.IsSealed(b) { // in clear: stored without Keys
		return broker.Secret(b), b, nil
	}
	if st.Keys == nil {
		return "", nil, fmt.Errorf("the refresh token at %s in the storage is sealed: set storage_encryption_key to the key that sealed it", name)
	}
	rt, err := st.Keys.Open(b, []byte(name))
	if err != nil {
		hint := ""
		if errors.Is(err, seal.ErrUnknownKey) {
			hint = ": list the key that sealed it in storage_encryption_keys_old"
		}
		return "", nil, fmt.Errorf("the refresh token at %s in the storage: %w%s", name, err, hint)
	}
	return broker.Secret(rt), b, nil
}

// Save stores the refresh token of key, replacing the previous one,
// sealed when Keys are set.
func (st Refresh) Save(ctx context.Context, key string, rt broker.Secret) error {
	name, b := refreshKey(key), []byte(rt.Reveal())
	if st.Keys != nil {
		var err error
		if b, err = st.Keys.Seal(b, []byte(name)); err != nil {
			return err
		}
	}
	return st.S.Store(ctx, name, b)
}

// Lock serialises refreshes of key in this process and, through the
// storage's lock, across instances.
func (st Refresh) Lock(ctx context.Context, key string) (func(), error) {
	unlockLocal, err := st.Locks.Lock(ctx, key)
	if err != nil {
		return nil, err
	}
	name := refreshKey(key) + ".lock"
	if err := st.S.Lock(ctx, name); err != nil {
		unlockLocal()
		return nil, err
	}
	return func() {
		_ = st.S.Unlock(context.WithoutCancel(ctx), name)
		unlockLocal()
	}, nil
}

var (
	_ oauth.Store        = Refresh{}
	_ oauth.LockedLoader = Refresh{}
)
