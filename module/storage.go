package module

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"net/url"
	"path"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
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

// storagePending keeps consents in progress in Caddy's storage, under
// token_broker/consents/ (link/<hash> and state/<hash>, see
// oauth.Pendings; result/<hash>, see consentpage.Results): each value is its expiry (8 bytes, Unix seconds, big
// endian) then the sealed record. Take holds the storage lock of the key,
// so a link or state is used once across the instances sharing the
// storage; sweepPending deletes the expired values.
type storagePending struct {
	s certmagic.Storage
}

// pendingPrefix is where consents in progress live in Caddy's storage.
const pendingPrefix = "token_broker/consents/"

// pendingHeader is the size of a stored consent's expiry.
const pendingHeader = 8

// Put implements oauth.PendingStore.
func (st storagePending) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, pendingHeader+len(val)), uint64(expires.Unix()))
	return st.s.Store(ctx, pendingPrefix+key, append(b, val...))
}

// load reads the sealed record under name.
func (st storagePending) load(ctx context.Context, name string) ([]byte, error) {
	b, err := st.s.Load(ctx, name)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(b) < pendingHeader {
		return nil, oauth.ErrUnknownPending
	}
	if err != nil {
		return nil, err
	}
	return b[pendingHeader:], nil
}

// Get implements oauth.PendingStore.
func (st storagePending) Get(ctx context.Context, key string) ([]byte, error) {
	return st.load(ctx, pendingPrefix+key)
}

// Take implements oauth.PendingStore.
func (st storagePending) Take(ctx context.Context, key string) ([]byte, error) {
	name := pendingPrefix + key
	if err := st.s.Lock(ctx, name+".lock"); err != nil {
		return nil, err
	}
	defer func() { _ = st.s.Unlock(context.WithoutCancel(ctx), name+".lock") }()
	b, err := st.load(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := st.s.Delete(ctx, name); err != nil {
		return nil, fmt.Errorf("consuming the consent record: %w", err)
	}
	return b, nil
}

// sweep deletes the consents whose expiry is before now (and values too
// short to hold one); it returns how many it deleted and how many are
// left.
func (st storagePending) sweep(ctx context.Context, now time.Time) (deleted, left int, err error) {
	var errs []error
	for _, kind := range []string{"link", "state", "result"} {
		keys, err := st.s.List(ctx, pendingPrefix+kind, false)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err != nil {
			errs = append(errs, err)
			continue
		}
		for _, k := range keys {
			if !isPendingKey(k) { // a lock or a temporary file of the storage
				continue
			}
			b, err := st.s.Load(ctx, k)
			if errors.Is(err, fs.ErrNotExist) {
				continue
			}
			if err != nil {
				errs = append(errs, err)
				continue
			}
			if len(b) >= pendingHeader && now.Unix() < int64(binary.BigEndian.Uint64(b)) {
				left++
				continue
			}
			if err := st.s.Delete(ctx, k); err != nil && !errors.Is(err, fs.ErrNotExist) {
				errs = append(errs, err)
				continue
			}
			deleted++
		}
	}
	return deleted, left, errors.Join(errs...)
}

// isPendingKey reports whether a storage key names a consent: its last
// element is a SHA-256 in hex.
func isPendingKey(k string) bool {
	b, err := hex.DecodeString(path.Base(k))
	return err == nil && len(b) == sha256.Size
}

var _ oauth.PendingStore = storagePending{}

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
	st := storagePending{s: ctx.Storage()}
	key := "consent sweeper " + storageID(st.s)
	_, _, err := pendingSweepers.LoadOrNew(key, func() (caddy.Destructor, error) {
		sctx, cancel := context.WithCancel(context.Background())
		p := &pendingSweeper{cancel: cancel, done: make(chan struct{})}
		go func() {
			defer close(p.done)
			t := time.NewTicker(oauth.PendingSweepInterval)
			defer t.Stop()
			for {
				if deleted, left, err := st.sweep(sctx, time.Now()); err != nil && sctx.Err() == nil {
					logger.Warn("sweeping the expired consents", zap.String("storage", storageID(st.s)), zap.Error(err))
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
