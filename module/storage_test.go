package module

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// TestStorageEncryptionKeyProvision: the storage encryption keys are
// resolved from placeholders and checked when the app is provisioned; an
// error names the setting and never shows a key.
func TestStorageEncryptionKeyProvision(t *testing.T) {
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	short := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("s", 16)))
	t.Setenv("TB_TEST_STORAGE_KEY", key)
	tests := []struct {
		name    string
		app     App
		wantErr string
	}{
		{name: "none"},
		{name: "key and old key from placeholders", app: App{StorageEncryptionKey: "{env.TB_TEST_STORAGE_KEY}", StorageEncryptionKeysOld: []string{key}}},
		{name: "short key", app: App{StorageEncryptionKey: short},
			wantErr: "token_broker: storage_encryption_key: seal: the key decodes to 16 bytes; want 32"},
		{name: "short old key", app: App{StorageEncryptionKey: key, StorageEncryptionKeysOld: []string{key, short}},
			wantErr: "token_broker: storage_encryption_keys_old[1]: seal: the key decodes to 16 bytes; want 32"},
		{name: "placeholder not set", app: App{StorageEncryptionKey: "{env.TB_TEST_NOT_SET}"}, wantErr: "token_broker: storage_encryption_key: "},
		{name: "old keys without a key", app: App{StorageEncryptionKeysOld: []string{key}}, wantErr: "token_broker: storage_encryption_key is required"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			app := tt.app
			err := app.Provision(ctx)
			if err == nil {
				t.Cleanup(func() { _ = app.Cleanup() })
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("Provision error = %v; want %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), key) || strings.Contains(err.Error(), short) {
					t.Fatal("the error shows a key")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			sealed := tt.app.StorageEncryptionKey != ""
			// Without a storage: only the keys of the store are looked at.
			store, ok := app.refreshStore(nil).(kvstore.Refresh)
			if !ok {
				t.Fatalf("the app keeps refresh tokens in %T; want kvstore.Refresh", app.refreshStore(nil))
			}
			if (store.Keys != nil) != sealed {
				t.Fatalf("the refresh store seals: %v; want %v", store.Keys != nil, sealed)
			}
			if !sealed {
				return
			}
			// The store seals with the configured key: a keyring of that key
			// alone opens what it seals.
			current, err := seal.New([]byte(strings.Repeat("k", 32)))
			if err != nil {
				t.Fatal(err)
			}
			b, err := store.Keys.Seal([]byte("rt"), []byte("ad"))
			if err != nil {
				t.Fatal(err)
			}
			if _, err := current.Open(b, []byte("ad")); err != nil {
				t.Fatalf("the refresh store does not seal with storage_encryption_key: %v", err)
			}
		})
	}
}
