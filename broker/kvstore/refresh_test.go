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

	"github.com/tokenbroker/caddy-token-broker/broker"
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
	keyA, keyB := bytes.Repeat([]byte{'a'}, seal.KeySize), bytes.Repeat([]byte{'b'}, seal.KeySize)
	const rt = "rt-secret-marker"
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
	keyring := func(t *testing.T, keys [][]byte) *seal.Keyring {
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
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx := context.Background()
			dir := t.TempDir()
			fs := &certmagic.FileStorage{Path: dir}
			var locks keylock.Map
			key := "bank/0123456789ab/acme"
			saver := Refresh{S: fs, Locks: &locks, Keys: keyring(t, tt.saveKeys)}
			if err := saver.Save(ctx, key, broker.Secret(rt)); err != nil {
				t.Fatal(err)
			}
			raw := func(key string) []byte {
				t.Helper()
				b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(refreshKey(key))))
				if err != nil {
					t.Fatal(err)
				}
				return b
			}
			if sealed := !bytes.Contains(raw(key), []byte(rt)); sealed != (tt.saveKeys != nil) || seal.IsSealed(raw(key)) != sealed {
				t.Fatalf("saved with keys %v: the file holds %q", tt.saveKeys != nil, raw(key))
			}
			if tt.moveTo != "" {
				if err := fs.Store(ctx, refreshKey(tt.moveTo), raw(key)); err != nil {
					t.Fatal(err)
				}
				key = tt.moveTo
			}
			loader := Refresh{S: fs, Locks: &locks, Keys: keyring(t, tt.loadKeys)}
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
			current := Refresh{S: fs, Locks: &locks, Keys: keyring(t, tt.loadKeys[:1])}
			if got, err := current.Load(ctx, key); err != nil || got.Reveal() != rt {
				t.Fatalf("Load with the current key only = %q, %v", got.Reveal(), err)
			}
		})
	}
}
