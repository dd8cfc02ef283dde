package regcache

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// TestReleaseWaitsForRefreshes: a refresh of a registry's source is under
// way (sent, its caller gone, the bank not yet answering) when a config
// releases the registry. Release waits for it when no config uses that
// registry any longer: its last use, or a registry a load replaced after
// an input changed. It does not hold up a reload that keeps the registry.
func TestReleaseWaitsForRefreshes(t *testing.T) {
	tests := []struct {
		name string
		// use loads the registry for the configs, and returns the key and
		// registry of the use released.
		use  func(t *testing.T, load func() (string, *config.Registry), env map[string]string) (string, *config.Registry)
		wait bool
	}{
		{name: "last use", wait: true, use: func(t *testing.T, load func() (string, *config.Registry), _ map[string]string) (string, *config.Registry) {
			return load()
		}},
		{name: "kept by the next config", wait: false, use: func(t *testing.T, load func() (string, *config.Registry), _ map[string]string) (string, *config.Registry) {
			key, reg := load()
			if _, next := load(); next != reg {
				t.Fatal("an unchanged registry was not reused")
			}
			return key, reg
		}},
		{name: "replaced after an input changed", wait: true, use: func(t *testing.T, load func() (string, *config.Registry), env map[string]string) (string, *config.Registry) {
			key, reg := load()
			env["BANK_SECRET"] = "rotated"
			if nextKey, next := load(); nextKey != key || next == reg {
				t.Fatal("the registry was not resolved again under the same key")
			}
			return key, reg
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			sent, answer := make(chan struct{}), make(chan struct{})
			bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				close(sent)
				<-answer
				w.Header().Set("Content-Type", "application/json")
				w.Write([]byte(`{"access_token":"at-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-2"}`))
			}))
			t.Cleanup(bank.Close)
			dir := t.TempDir()
			toml := "[providers.bank]\ntype = \"oauth2\"\ngrant = \"refresh_token\"\ntoken_url = \"" + bank.URL + "/token\"\nclient_id = \"tpp\"\nclient_secret = \"{env.BANK_SECRET}\"\n\n" +
				"[merchants.acme]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n"
			if err := os.WriteFile(filepath.Join(dir, "merchants.toml"), []byte(toml), 0o600); err != nil {
				t.Fatal(err)
			}
			env := map[string]string{"BANK_SECRET": "secret"}
			store := &oauth.MemoryStore{}
			opts := config.Options{RefreshStore: store, LookupEnv: func(k string) (string, bool) { v, ok := env[k]; return v, ok }}
			c := New()
			load := func() (string, *config.Registry) {
				t.Helper()
				reg, key, _, err := c.Load(dir, opts, "store")
				if err != nil {
					t.Fatal(err)
				}
				return key, reg
			}
			key, reg := tt.use(t, load, env)
			src, _ := reg.Providers["bank"].RefreshToken()
			if err := src.SetRefreshToken(context.Background(), "acme", "rt-1"); err != nil {
				t.Fatal(err)
			}
			ctx, giveUp := context.WithCancel(context.Background())
			refreshed := make(chan error, 1)
			go func() {
				_, err := src.Token(ctx, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
				refreshed <- err
			}()
			<-sent
			giveUp()
			<-refreshed

			released := make(chan struct{})
			go func() { c.Release(key, reg); close(released) }()
			if !tt.wait {
				select {
				case <-released: // with the refresh unanswered
				case <-time.After(10 * time.Second):
					t.Error("Release waited for a refresh of a registry the next config uses")
				}
				close(answer)
				return
			}
			select {
			case <-released:
				close(answer)
				t.Fatal("Release returned with a refresh of the released registry unanswered")
			case <-time.After(300 * time.Millisecond):
			}
			close(answer)
			<-released
			if rt, err := store.Load(context.Background(), src.StoreKey("acme")); err != nil || rt != "rt-2" {
				t.Fatalf("after Release the store has %q (%v); want the rotated rt-2", rt.Reveal(), err)
			}
		})
	}
}
