package config_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// TestRegistriesKeepTheirPartnersTokens: two registries with the same
// text, each reading its partner's API key from the file next to it: a
// provider of one name and one set of settings, and merchant acme at one
// organisation. In two folders, whether they share a broker (the app's
// registry and a handler's own in one process) or two sidecars share
// Redis and its encryption key, each registry's acme is served the token
// its own API key minted, never the other partner's. At one path (two
// partners' sidecars, each reading /etc/caddy/merchants.toml) the provider
// IDs are the same: the sidecars of two partners sharing a Redis keep
// their tokens apart only by their own encryption keys. A registry loaded
// again from its path after its key rotated keeps the provider ID, and so
// the cached tokens.
func TestRegistriesKeepTheirPartnersTokens(t *testing.T) {
	gk := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		key, _, _ := r.BasicAuth()
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"data":{"id":"t-%s","accessToken":"minted-with-%s","tokenType":"BEARER","status":"ACTIVE"}}`, key, key)
	}))
	t.Cleanup(gk.Close)
	text := acmeRegistry(gk.URL, "{file.partner.key}")
	// load writes the registry and key to dir and loads it.
	load := func(dir, key string) *config.Registry {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, "partner.key"), []byte(key+"\n"), 0o600); err != nil {
			t.Fatal(err)
		}
		path := filepath.Join(dir, "merchants.toml")
		if err := os.WriteFile(path, text, 0o600); err != nil {
			t.Fatal(err)
		}
		reg, err := config.LoadWith(path, config.Options{})
		if err != nil {
			t.Fatal(err)
		}
		return reg
	}
	node := func(t *testing.T, shared broker.SharedCache) *broker.Broker {
		br := broker.New(broker.Options{Shared: shared})
		t.Cleanup(br.Close)
		return br
	}
	// sidecars are two brokers sharing a Redis, sealing with the
	// encryption keys of fill bytes keyA and keyB.
	sidecars := func(t *testing.T, keyA, keyB byte) (a, b *broker.Broker) {
		srv := redistest.Start(t)
		tier := func(fill byte) broker.SharedCache {
			keys, err := seal.New(bytes.Repeat([]byte{fill}, seal.KeySize))
			if err != nil {
				t.Fatal(err)
			}
			c, err := fleet.New(fleet.Options{Client: srv.Client(), Keys: keys, Timeout: 5 * time.Second})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })
			return c
		}
		return node(t, tier(keyA)), node(t, tier(keyB))
	}
	for _, tc := range []struct {
		name string
		// onePath loads both registries from one path.
		onePath bool
		brokers func(t *testing.T) (a, b *broker.Broker)
	}{
		{"one broker, two paths", false, func(t *testing.T) (a, b *broker.Broker) {
			br := node(t, nil)
			return br, br
		}},
		{"two sidecars sharing Redis and its encryption key, two paths", false, func(t *testing.T) (a, b *broker.Broker) {
			return sidecars(t, 7, 7)
		}},
		{"two partners' sidecars sharing Redis, each with its encryption key, one path", true, func(t *testing.T) (a, b *broker.Broker) {
			return sidecars(t, 7, 8)
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dirA, dirB := t.TempDir(), t.TempDir()
			if tc.onePath {
				dirB = dirA
			}
			regA, regB := load(dirA, "partner-a"), load(dirB, "partner-b")
			if sameID := regA.Providers["nuapay"].ID == regB.Providers["nuapay"].ID; sameID != tc.onePath {
				t.Fatalf("one provider ID: %t, want %t", sameID, tc.onePath)
			}
			brA, brB := tc.brokers(t)
			for _, step := range []struct {
				br  *broker.Broker
				reg *config.Registry
				key string
			}{{brA, regA, "partner-a"}, {brB, regB, "partner-b"}, {brA, regA, "partner-a"}} {
				b, err := step.reg.Binding("acme", nil)
				if err != nil {
					t.Fatal(err)
				}
				tok, err := brokertest.Token(context.Background(), step.br, b)
				if err != nil {
					t.Fatal(err)
				}
				if got, want := tok.Value.Reveal(), "minted-with-"+step.key; got != want {
					t.Errorf("acme of the registry keyed %s was served %q, want %q", step.key, got, want)
				}
			}
			if rotated := load(dirA, "partner-a-2"); rotated.Providers["nuapay"].ID != regA.Providers["nuapay"].ID {
				t.Errorf("the API key's rotation changed the provider ID: %s -> %s", regA.Providers["nuapay"].ID, rotated.Providers["nuapay"].ID)
			}
		})
	}
}

// TestProviderIDOfOnePathSpeltTwoWays: a registry's path spelt two ways
// ("merchants.toml", "./merchants.toml", "conf/../merchants.toml") gives
// its providers one ID, so their tokens carry over a reload that writes
// the path another way; a registry at another path has another ID.
func TestProviderIDOfOnePathSpeltTwoWays(t *testing.T) {
	dir := t.TempDir()
	text := acmeRegistry("https://gatekeeper.example", "{env.NUAPAY_API_KEY}")
	for _, name := range []string{"merchants.toml", "other.toml"} {
		if err := os.WriteFile(filepath.Join(dir, name), text, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(dir, "conf"), 0o700); err != nil {
		t.Fatal(err)
	}
	t.Chdir(dir)
	id := func(path string) string {
		t.Helper()
		reg, err := config.LoadWith(path, config.Options{LookupEnv: func(string) (string, bool) { return "k", true }})
		if err != nil {
			t.Fatal(err)
		}
		return reg.Providers["nuapay"].ID
	}
	want := id("merchants.toml")
	for _, path := range []string{"./merchants.toml", "conf/../merchants.toml", "merchants.toml"} {
		if got := id(path); got != want {
			t.Errorf("ID from %q: %s, want %s (from merchants.toml)", path, got, want)
		}
	}
	if id("other.toml") == want {
		t.Error("a registry at another path has the same provider ID")
	}
}

// acmeRegistry is the text of a registry of merchant acme of organisation
// org-acme at a Nuapay provider at baseURL whose api_key is apiKey (a
// reference).
func acmeRegistry(baseURL, apiKey string) []byte {
	return []byte(`[providers.nuapay]
type = "nuapay"
base_url = "` + baseURL + `"
api_key = "` + apiKey + `"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`)
}
