package module

import (
	"context"
	"fmt"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
)

// localLocks serialise refreshes of one key inside this process (across
// the registries of a reload too) before the storage lock serialises them
// across processes (kvstore.Refresh). It holds only the keys being
// refreshed.
var localLocks keylock.Map

// storageStore keeps merchants' refresh tokens in Caddy's storage
// (kvstore.Refresh).
func storageStore(s certmagic.Storage) kvstore.Refresh {
	return kvstore.Refresh{S: s, Locks: &localLocks}
}

// storagePending keeps consents in progress in Caddy's storage
// (kvstore.Pending); startPendingSweeper deletes the expired ones.
func storagePending(s certmagic.Storage) kvstore.Pending {
	return kvstore.Pending{S: s}
}

// pendingSweepers run one sweep of token_broker/consents/ per storage,
// kept across reloads.
var pendingSweepers = caddy.NewUsagePool()

// pendingSweeper deletes the expired consents of a storage every
// oauth.PendingSweepInterval, until destructed.
type pendingSweeper struct {
	cancel context.CancelFunc
	done   chan struct{}
}

// Destruct stops the sweeper.
func (p *pendingSweeper) Destruct() error {
	p.cancel()
	<-p.done
	return nil
}

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
	st, id := storagePending(ctx.Storage()), storageID(ctx.Storage())
	key := "consent sweeper " + id
	_, _, err := pendingSweepers.LoadOrNew(key, func() (caddy.Destructor, error) {
		sctx, cancel := context.WithCancel(context.Background())
		p := &pendingSweeper{cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(p.done)
			t := time.NewTicker(oauth.PendingSweepInterval)
			defer t.Stop()
			for {
				if deleted, left, err := st.Sweep(sctx, time.Now()); err != nil && sctx.Err() == nil {
					logger.Warn("sweeping the expired consents", zap.String("storage", id), zap.Error(err))
				} else if deleted > 0 {
					logger.Debug("expired consents deleted", zap.Int("deleted", deleted), zap.Int("pending", left))
				}
				select {
				case <-sctx.Done():
					return
				case <-t.C:
				}
			}
		}()
		return p, nil
	})
	return key, err
}

// hasConsent reports whether a provider of reg has a consent flow.
func hasConsent(reg *config.Registry) bool {
	for _, p := range reg.Providers {
		if p.Consent != nil {
			return true
		}
	}
	return false
}
