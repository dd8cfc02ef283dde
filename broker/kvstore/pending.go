package kvstore

import (
	"context"
	"crypto/sha256"
	"encoding/binary"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"path"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// Pending keeps consents in progress in S, under token_broker/consents/
// (link/<hash> and state/<hash>, see oauth.Pendings; result/<hash>, see
// consentpage.Results): each value is its expiry (8 bytes, Unix seconds,
// big endian) then the sealed record. Take holds the storage lock of the
// key, so a link or state is used once across the instances sharing the
// storage; Sweep deletes the expired values.
type Pending struct {
	// S is the storage.
	S Storage
}

// PendingPrefix is where consents in progress live in the storage.
const PendingPrefix = "token_broker/consents/"

// pendingHeader is the size of a stored consent's expiry.
const pendingHeader = 8

// Put implements oauth.PendingStore.
func (st Pending) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	b := binary.BigEndian.AppendUint64(make([]byte, 0, pendingHeader+len(val)), uint64(expires.Unix()))
	return st.S.Store(ctx, PendingPrefix+key, append(b, val...))
}

// load reads the sealed record under name.
func (st Pending) load(ctx context.Context, name string) ([]byte, error) {
	b, err := st.S.Load(ctx, name)
	if errors.Is(err, fs.ErrNotExist) || err == nil && len(b) < pendingHeader {
		return nil, oauth.ErrUnknownPending
	}
	if err != nil {
		return nil, err
	}
	return b[pendingHeader:], nil
}

// Get implements oauth.PendingStore.
func (st Pending) Get(ctx context.Context, key string) ([]byte, error) {
	return st.load(ctx, PendingPrefix+key)
}

// Take implements oauth.PendingStore.
func (st Pending) Take(ctx context.Context, key string) ([]byte, error) {
	name := PendingPrefix + key
	if err := st.S.Lock(ctx, name+".lock"); err != nil {
		return nil, err
	}
	defer func() { _ = st.S.Unlock(context.WithoutCancel(ctx), name+".lock") }()
	b, err := st.load(ctx, name)
	if err != nil {
		return nil, err
	}
	if err := st.S.Delete(ctx, name); err != nil {
		return nil, fmt.Errorf("consuming the consent record: %w", err)
	}
	return b, nil
}

// Sweep deletes the consents whose expiry is before now (and values too
// short to hold one); it returns how many it deleted and how many are
// left.
func (st Pending) Sweep(ctx context.Context, now time.Time) (deleted, left int, err error) {
	var errs []error
	for _, kind := range []string{"link", "state", "result"} {
		keys, err := st.S.List(ctx, PendingPrefix+kind, false)
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
			b, err := st.S.Load(ctx, k)
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
			if err := st.S.Delete(ctx, k); err != nil && !errors.Is(err, fs.ErrNotExist) {
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

var _ oauth.PendingStore = Pending{}
