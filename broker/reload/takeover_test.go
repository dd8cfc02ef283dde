package reload

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// failingStore is an oauth.MemoryStore whose saves fail while down is set.
type failingStore struct {
	oauth.MemoryStore
	down atomic.Bool
}

func (s *failingStore) Save(ctx context.Context, key string, rt broker.Secret) error {
	if s.down.Load() {
		return errors.New("storage unavailable")
	}
	return s.MemoryStore.Save(ctx, key, rt)
}

// TestReloadKeepsUnsavedRotatedRefreshToken: a bank rotates a merchant's
// refresh token while the store cannot save (the source keeps the new
// one in memory, SaveError), then a reload rebuilds the provider's source.
// The new source takes over the unsaved token when it keeps the same
// refresh tokens (same provider, registry, endpoint and client), saves
// it and refreshes with it; a source of another client does not take it.
func TestReloadKeepsUnsavedRotatedRefreshToken(t *testing.T) {
	tests := []struct {
		name     string
		clientID string // of the reloaded provider
		taken    bool
	}{
		{name: "a merchant added", clientID: "tpp", taken: true},
		{name: "another client", clientID: "tpp-2"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			// The bank rotates rt-N to rt-N+1; a refresh token used once is spent.
			var mu sync.Mutex
			spent := map[string]bool{}
			bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.Header().Set("Content-Type", "application/json")
				r.ParseForm()
				rt := r.PostForm.Get("refresh_token")
				mu.Lock()
				used := spent[rt]
				spent[rt] = true
				mu.Unlock()
				n, err := strconv.Atoi(strings.TrimPrefix(rt, "rt-"))
				if used || err != nil {
					w.WriteHeader(http.StatusBadRequest)
					w.Write([]byte(`{"error":"invalid_grant"}`))
					return
				}
				fmt.Fprintf(w, `{"access_token":"at-%d","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-%d"}`, n, n+1)
			}))
			t.Cleanup(bank.Close)
			store := &failingStore{}
			pb := &Broker{Broker: broker.New(broker.Options{}), Logger: zap.NewNop()}
			t.Cleanup(pb.Close)
			// load loads the registry at path as a config's Provision
			// does, and returns its source.
			path := filepath.Join(t.TempDir(), "merchants.toml")
			load := func(clientID, merchants string) *oauth.RefreshToken {
				t.Helper()
				toml := "[providers.bank]\ntype = \"oauth2\"\ngrant = \"refresh_token\"\ntoken_url = \"" + bank.URL + "/token\"\nclient_id = \"" + clientID + "\"\nclient_secret = \"{env.BANK_SECRET}\"\n\n" + merchants
				if err := os.WriteFile(path, []byte(toml), 0o600); err != nil {
					t.Fatal(err)
				}
				reg, err := config.LoadWith(path, config.Options{RefreshStore: store,
					LookupEnv: func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }})
				if err != nil {
					t.Fatal(err)
				}
				pb.SecretsSeen(reg, zap.NewNop())
				src, _ := reg.Providers["bank"].RefreshToken()
				return src
			}
			acme := "[merchants.acme]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n"
			req := broker.Request{Merchant: "acme", Scopes: []string{"accounts"}}

			old := load("tpp", acme)
			if err := old.SetRefreshToken(context.Background(), "acme", "rt-1"); err != nil {
				t.Fatal(err)
			}
			store.down.Store(true)
			var se *oauth.SaveError
			if _, err := old.Token(context.Background(), req); !errors.As(err, &se) {
				t.Fatalf("refresh with the store down: %v; want a SaveError", err)
			}
			store.down.Store(false)

			next := load(tt.clientID, acme+"\n[merchants.globex]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n")
			tok, err := next.Token(context.Background(), req)
			if !tt.taken {
				if err == nil {
					t.Fatalf("a source of another client refreshed with the old client's refresh token: %s", tok.Value.Reveal())
				}
				return
			}
			if err != nil || tok.Value != "at-2" {
				t.Fatalf("after the reload: %q, %v; want at-2, refreshed with the unsaved rt-2", tok.Value.Reveal(), err)
			}
			if rt, err := store.Load(context.Background(), next.StoreKey("acme")); err != nil || rt != "rt-3" {
				t.Fatalf("the store has %q (%v); want rt-3", rt.Reveal(), err)
			}
		})
	}
}
