package module

import (
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// localLocks serialise refreshes of one key inside this process (across
// the registries of a reload too) before the storage lock serialises them
// across processes (kvstore.Refresh). It holds only the keys being
// refreshed.
var localLocks keylock.Map

// storageStore keeps merchants' refresh tokens in Caddy's storage
// (kvstore.Refresh), sealed with keys when not nil.
func storageStore(s certmagic.Storage, keys *seal.Keyring) kvstore.Refresh {
	return kvstore.Refresh{S: s, Locks: &localLocks, Keys: keys}
}

// pendingSweepers run one sweep (*kvstore.Sweeper) of
// token_broker/consents/ per storage, kept across reloads.
var pendingSweepers = caddy.NewUsagePool()

// storageID names a storage in pool keys: its description when it has
// one (a file system storage names its folder), else its type.
func storageID(s certmagic.Storage) string {
	if str, ok := s.(fmt.Stringer); ok {
		return fmt.Sprintf("%T %s", s, str.String())
	}
	return fmt.Sprintf("%T", s)
}

// startPendingSweeper makes sure that the expired consents in the
// storage of ctx are swept, and returns the key to release on Cleanup.
func startPendingSweeper(ctx caddy.Context, logger *zap.Logger) (string, error) {
	st, id := kvstore.Pending{S: ctx.Storage()}, storageID(ctx.Storage())
	key := "consent sweeper " + id
	_, _, err := pendingSweepers.LoadOrNew(key, func() (caddy.Destructor, error) {
		return kvstore.StartSweeper(st, oauth.PendingSweepInterval, logger, id), nil
	})
	return key, err
}
