package kvstore

import (
	"bytes"
	"context"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// TestRefreshSealed: with keys, a refresh token is sealed in the file
// storage (the file does not show it) and opens; one stored in clear is
// read and sealed by its next save; old keys open what they sealed, and
// the next save seals with the current key; an unknown key, a value moved
// under another merchant's key or a sealed value without keys is an error
// that says what to do.
func TestRefreshSealed(t *testing.T) {
	keyA, keyB := testKey('a'), testKey('b')
	const rt = testRT
	tests := []struct {
		name               string
		saveKeys, loadKeys [][]byte // nil: no keys (in clear)
		moveTo             string   // the stored value is copied under this key, then loaded from it
		wantErr            string
		wantIs             error
	}{
		{name: "sealed, opens", saveKeys: [][]byte{keyA}, loadKeys: [][]byte{keyA}},
		{name: "in clear without keys", saveKeys: nil, loadKeys: nil},
		{name: "in clear, read with keys then sealed", saveKeys: nil, loadKeys: [][]byte{keyA}},
		{name: "rotated: the old key opens", saveKeys: [][]byte{keyA}, loadKeys: [][]byte{keyB, keyA}},
		{name: "unknown key", saveKeys: [][]byte{keyA}, loadKeys: [][]byte{keyB},
			wantErr: "list the key that sealed it in storage_encryption_keys_old", wantIs: seal.ErrUnknownKey},
		{name: "moved under another merchant", saveKeys: [][]byte{keyA}, loadKeys: [][]byte{keyA}, moveTo: "bank/0123456789ab/globex",
			wantErr: "refresh_tokens/bank%2F0123456789ab%2Fglobex in the storage", wantIs: seal.ErrOpen},
		{name: "sealed, no keys", saveKeys: [][]byte{keyA}, loadKeys: nil, wantErr: "is sealed: set storage_encryption_key"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			key := "bank/0123456789ab/acme"
			fs := savedRefresh(t, key, tt.saveKeys)
			var locks keylock.Map
			raw := func(key string) []byte { return storedFile(t, fs, key) }
			if sealed := !bytes.Contains(raw(key), []byte(rt)); sealed != (tt.saveKeys != nil) || seal.IsSealed(raw(key)) != sealed {
				t.Fatalf("saved with keys %v: the file holds %q", tt.saveKeys != nil, raw(key))
			}
			if tt.moveTo != "" {
				if err := fs.Store(ctx, refreshKey(tt.moveTo), raw(key)); err != nil {
					t.Fatal(err)
				}
				key = tt.moveTo
			}
			loader := Refresh{S: fs, Locks: &locks, Keys: testKeyring(t, tt.loadKeys)}
			got, err := loader.Load(ctx, key)
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || tt.wantIs != nil && !errors.Is(err, tt.wantIs) {
					t.Fatalf("Load error = %v; want %q (%v)", err, tt.wantErr, tt.wantIs)
				}
				if strings.Contains(err.Error(), rt) {
					t.Fatal("the error shows the refresh token")
				}
				return
			}
			if err != nil || got.Reveal() != rt {
				t.Fatalf("Load = %q, %v; want the refresh token", got.Reveal(), err)
			}
			// The next save (a rotation) seals with the current key, which
			// alone opens it.
			if err := loader.Save(ctx, key, got); err != nil {
				t.Fatal(err)
			}
			if tt.loadKeys == nil {
				return
			}
			if bytes.Contains(raw(key), []byte(rt)) || !seal.IsSealed(raw(key)) {
				t.Fatalf("saved again with keys: the file holds %q", raw(key))
			}
			current := Refresh{S: fs, Locks: &locks, Keys: testKeyring(t, tt.loadKeys[:1])}
			if got, err := current.Load(ctx, key); err != nil || got.Reveal() != rt {
				t.Fatalf("Load with the current key only = %q, %v", got.Reveal(), err)
			}
		})
	}
}

// testRT is the refresh token the tests store.
const testRT = "rt-secret-marker"

// testKey returns a sealing key made of b.
func testKey(b byte) []byte { return bytes.Repeat([]byte{b}, seal.KeySize) }

// savedRefresh stores testRT under key, sealed with keys (nil: in clear),
// in a new file storage, and returns the storage.
func savedRefresh(t *testing.T, key string, keys [][]byte) *certmagic.FileStorage {
	t.Helper()
	fs := &certmagic.FileStorage{Path: t.TempDir()}
	if err := (Refresh{S: fs, Locks: &keylock.Map{}, Keys: testKeyring(t, keys)}).Save(context.Background(), key, testRT); err != nil {
		t.Fatal(err)
	}
	return fs
}

// storedFile returns the content of the file that holds key's refresh
// token in the file storage fs.
func storedFile(t *testing.T, fs *certmagic.FileStorage, key string) []byte {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(fs.Path, filepath.FromSlash(refreshKey(key))))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// testKeyring returns the keyring of keys (the current one first), nil
// for none.
func testKeyring(t *testing.T, keys [][]byte) *seal.Keyring {
	t.Helper()
	if keys == nil {
		return nil
	}
	kr, err := seal.New(keys[0], keys[1:]...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

// failingStore is a file storage whose Store fails.
type failingStore struct{ *certmagic.FileStorage }

func (failingStore) Store(context.Context, string, []byte) error {
	return errors.New("storage read-only")
}

// TestRefreshLoadLockedReseals: with keys, LoadLocked stores a refresh
// token kept in clear or sealed with an old key again, sealed with the
// current key, which alone then opens it; one sealed with the current
// key, or kept without keys, is left as it is; a failed rewrite still
// returns the refresh token. Load never rewrites.
func TestRefreshLoadLockedReseals(t *testing.T) {
	keyA, keyB := testKey('a'), testKey('b')
	tests := []struct {
		name          string
		saveKeys      [][]byte // the keys of the first save; nil: in clear
		loadKeys      [][]byte // the keys loading it; nil: none
		failStore     bool     // the storage refuses the rewrite
		wantRewritten bool
	}{
		{name: "in clear, keys set", saveKeys: nil, loadKeys: [][]byte{keyA}, wantRewritten: true},
		{name: "sealed with an old key", saveKeys: [][]byte{keyA}, loadKeys: [][]byte{keyB, keyA}, wantRewritten: true},
		{name: "sealed with the current key", saveKeys: [][]byte{keyA}, loadKeys: [][]byte{keyA, keyB}},
		{name: "in clear, no keys", saveKeys: nil, loadKeys: nil},
		{name: "rewrite fails", saveKeys: nil, loadKeys: [][]byte{keyA}, failStore: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			const key = "bank/0123456789ab/acme"
			fs := savedRefresh(t, key, tt.saveKeys)
			var locks keylock.Map
			raw := func() []byte { return storedFile(t, fs, key) }
			stored := raw()
			loader := Refresh{S: fs, Locks: &locks, Keys: testKeyring(t, tt.loadKeys)}
			if tt.failStore {
				loader.S = failingStore{fs}
			}
			if got, err := loader.Load(ctx, key); err != nil || got.Reveal() != testRT {
				t.Fatalf("Load = %q, %v; want the refresh token", got.Reveal(), err)
			}
			if !bytes.Equal(raw(), stored) {
				t.Fatal("Load rewrote the stored value")
			}
			unlock, err := loader.Lock(ctx, key)
			if err != nil {
				t.Fatal(err)
			}
			got, err := loader.LoadLocked(ctx, key)
			unlock()
			if err != nil || got.Reveal() != testRT {
				t.Fatalf("LoadLocked = %q, %v; want the refresh token", got.Reveal(), err)
			}
			if rewritten := !bytes.Equal(raw(), stored); rewritten != tt.wantRewritten {
				t.Fatalf("LoadLocked rewrote the stored value: %v; want %v", rewritten, tt.wantRewritten)
			}
			if !tt.wantRewritten {
				return
			}
			if bytes.Contains(raw(), []byte(testRT)) || !seal.IsSealed(raw()) {
				t.Fatalf("after LoadLocked the file holds %q; want it sealed", raw())
			}
			current := Refresh{S: fs, Locks: &locks, Keys: testKeyring(t, tt.loadKeys[:1])}
			if got, err := current.Load(ctx, key); err != nil || got.Reveal() != testRT {
				t.Fatalf("Load with the current key only = %q, %v", got.Reveal(), err)
			}
		})
	}
}
