package integration

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// TestRevokeOnShutdown: with revoke_on_shutdown, reloads keep the cached
// tokens valid at the provider, also a reload that changes the cache
// settings (refresh_window, leeway, fetch_timeout: a new broker), and
// stopping Caddy revokes them all, the replaced broker's included.
func TestRevokeOnShutdown(t *testing.T) {
	sb, _ := startSandbox(t)
	rec := &tokenRecorder{next: sb}
	api := httptest.NewServer(rec)
	t.Cleanup(api.Close)
	t.Setenv("SANDBOX_URL", api.URL)
	cf := strings.Replace(sandboxCaddyfile(t), "\t\tconfig {$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}\n",
		"\t\tconfig {$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}\n\t\trevoke_on_shutdown\n", 1)
	base := startCaddy(t, cf)
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	getEcho(t, base+"/tpp/accounts", "X-Merchant-Id", "globex")
	rec.mu.Lock()
	tokens := append([]string(nil), rec.tokens...)
	rec.mu.Unlock()
	if len(tokens) != 2 {
		t.Fatalf("%d tokens issued, want 2", len(tokens))
	}

	loadCaddy(t, strings.Replace(cf, "bind 127.0.0.1", "bind 127.0.0.1\n\theader X-Reloaded yes", 1))
	for _, tok := range tokens {
		if _, _, valid := sb.Issued(tok); !valid {
			t.Fatal("a reload revoked a cached token")
		}
	}
	if e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme"); !e.Authorization.Valid || sb.TokenRequests() != 2 {
		t.Fatalf("after the reload: %+v, %d token requests", e.Authorization, sb.TokenRequests())
	}

	// A reload that changes the cache settings replaces the broker.
	loadCaddy(t, strings.Replace(cf, "\t\trevoke_on_shutdown\n", "\t\trevoke_on_shutdown\n\t\tleeway 2s\n", 1))
	for _, tok := range tokens {
		if _, _, valid := sb.Issued(tok); !valid {
			t.Fatal("a reload that changed leeway revoked a cached token")
		}
	}
	if e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme"); !e.Authorization.Valid {
		t.Fatalf("after the second reload: %+v", e.Authorization)
	}
	rec.mu.Lock()
	tokens = append([]string(nil), rec.tokens...)
	rec.mu.Unlock()
	if len(tokens) != 3 {
		t.Fatalf("%d tokens issued, want 3 (the new broker fetches its own)", len(tokens))
	}

	if err := caddy.Stop(); err != nil {
		t.Fatal(err)
	}
	for _, tok := range tokens {
		if org, _, valid := sb.Issued(tok); org == "" || valid {
			t.Fatalf("token of %s still valid after shutdown", org)
		}
	}
}
