package module

import (
	"context"
	"errors"
	"io/fs"
	"net/url"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
)

// storageStore keeps merchants' refresh tokens in Caddy's storage (the file
// system by default, under the data directory), so that a rotated refresh
// token survives a restart and is shared by every instance using the same
// storage. Keys are oauth.StoreKey(provider config, merchant).
type storageStore struct {
	s certmagic.Storage
}

// refreshTokenPrefix is where refresh tokens live in Caddy's storage.
const refreshTokenPrefix = "token_broker/refresh_tokens/"

// localLocks serialise refreshes of one key inside this process (across
// the registries of a reload too) before the storage lock (which, on the
// file system, polls) serialises them across processes. It holds only the
// keys being refreshed.
var localLocks keylock.Map

func storageKey(key string) string { return refreshTokenPrefix + url.PathEscape(key) }

// Load returns the stored refresh token of key.
func (st storageStore) Load(ctx context.Context, key string) (broker.Secret, error) {
	b, err := st.s.Load(ctx, storageKey(key))
	if errors.Is(err, fs.ErrNotExist) || (err == nil && len(b) == 0) {
		return "", oauth.ErrNoRefreshToken
	}
	if err != nil {
		return "", err
	}
	return broker.Secret(b), nil
}

// Save stores the refresh token of key, replacing the previous one.
func (st storageStore) Save(ctx context.Context, key string, rt broker.Secret) error {
	return st.s.Store(ctx, storageKey(key), []byte(rt.Reveal()))
}

// Lock serialises refreshes of key in this process and, through the
// storage's lock, across instances.
func (st storageStore) Lock(ctx context.Context, key string) (func(), error) {
	unlockLocal, err := localLocks.Lock(ctx, key)
	if err != nil {
		return nil, err
	}
	name := storageKey(key) + ".lock"
	if err := st.s.Lock(ctx, name); err != nil {
		unlockLocal()
		return nil, err
	}
	return func() {
		_ = st.s.Unlock(context.WithoutCancel(ctx), name)
		unlockLocal()
	}, nil
}

var _ oauth.Store = storageStore{}
