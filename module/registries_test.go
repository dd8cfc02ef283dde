package module

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// TestHandlersOwnRegistryInCaddy runs Caddy configs whose app has a
// registry whose partner API key the provider refuses, and whose route
// has a registry of its own, with acme and acme-eu at one organisation:
// the admin API revokes the token fetched for acme-eu when asked to
// revoke acme's (it looks in the route's registry), and once a reload
// drops both registries, the refusal remembered for the app's is
// forgotten (the old config's providers are released).
func TestHandlersOwnRegistryInCaddy(t *testing.T) {
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"good-key"}, Organisations: []sandbox.Organisation{{ID: "org-acme", Name: "Acme"}}})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	t.Setenv("TB_TEST_GOOD_KEY", "good-key")
	t.Setenv("TB_TEST_BAD_KEY", "refused-key")
	dir := t.TempDir()
	write := func(name, key string, merchants ...string) string {
		t.Helper()
		text := fmt.Sprintf("[providers.nuapay]\ntype = \"nuapay\"\nbase_url = %q\napi_key = \"{env.%s}\"\n", srv.URL, key)
		for _, m := range merchants {
			text += fmt.Sprintf("\n[merchants.%s]\nprovider = \"nuapay\"\norganisation = \"org-acme\"\nscopes = [\"openbanking_pisp\"]\n", m)
		}
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	appReg, ownReg := write("app.toml", "TB_TEST_BAD_KEY", "acme"), write("own.toml", "TB_TEST_GOOD_KEY", "acme", "acme-eu")
	load := func(appConfig, route string) {
		t.Helper()
		cfg := fmt.Sprintf(`{"admin": {"disabled": true, "config": {"persist": false}},
			"logging": {"logs": {"default": {"level": "ERROR"}}},
			"apps": {"token_broker": {"config": %q},
				"http": {"servers": {"s": {"listen": ["127.0.0.1:0"], "automatic_https": {"disable": true}, "routes": [%s]}}}}}`, appConfig, route)
		if err := caddy.Load([]byte(cfg), true); err != nil {
			t.Fatal(err)
		}
	}
	prev := current.Load()
	t.Cleanup(func() { current.Store(prev) })
	t.Cleanup(func() { _ = caddy.Stop() })
	load(appReg, fmt.Sprintf(`{"handle": [{"handler": "token_broker", "config": %q}]}`, ownReg))
	app := current.Load()

	get := func(reg *config.Registry, merchant string) error {
		t.Helper()
		b, err := reg.Binding(merchant, nil)
		if err != nil {
			t.Fatal(err)
		}
		_, _, err = app.broker.Get(context.Background(), b)
		return err
	}
	if err := get(app.registry, "acme"); err == nil {
		t.Fatal("a token with the refused key")
	}
	refused := app.registry.Providers["nuapay"].ID
	if app.broker.SourceHealth(refused).BackoffUntil.IsZero() {
		t.Fatal("the refused key is not remembered")
	}
	regs := app.watched.Registries()
	if len(regs) != 1 {
		t.Fatalf("%d registries of routes, want 1", len(regs))
	}
	if err := get(regs[0].Registry, "acme-eu"); err != nil {
		t.Fatal(err)
	}
	tok := app.broker.Entries()[0].Token().Value.Reveal()
	rec := httptest.NewRecorder()
	if err := serveAdmin(rec, httptest.NewRequest(http.MethodPost, "/token_broker/merchants/acme/revoke", nil)); err != nil {
		t.Fatal(err)
	}
	var answer struct{ Results []json.RawMessage }
	if err := json.Unmarshal(rec.Body.Bytes(), &answer); err != nil || len(answer.Results) != 1 || !strings.Contains(rec.Body.String(), `"revoked":true`) {
		t.Errorf("revocation of acme: %s (%v), want the token of the route's registry revoked", rec.Body, err)
	}
	if _, _, valid := sb.Issued(tok); valid {
		t.Error("the token acme is served is still valid")
	}

	load(write("app2.toml", "TB_TEST_GOOD_KEY", "acme"), "")
	if current.Load().pooled != app.pooled {
		t.Fatal("the reload did not keep the broker")
	}
	if h := app.broker.SourceHealth(refused); !h.BackoffUntil.IsZero() {
		t.Errorf("after a reload without the registry, its refused key is still held until %s", h.BackoffUntil)
	}
}
