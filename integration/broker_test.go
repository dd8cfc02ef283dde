package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"
)

// sandboxCaddyfile is the root Caddyfile with the registry path made
// absolute, so the tests do not depend on their working directory.
func sandboxCaddyfile(t *testing.T) string {
	sandboxRegistryEnv(t)
	return readFile(t, filepath.Join(repoRoot(t), "Caddyfile"))
}

// sandboxRegistryEnv sets the environment of the embedded registry
// (examples/sandbox/merchants.toml) beyond what startSandbox sets: its
// path, and the sandbox bank's client secret and consent site (on a free
// loopback port, which the root Caddyfile listens on).
func sandboxRegistryEnv(t *testing.T) {
	t.Setenv("TOKEN_BROKER_CONFIG", filepath.Join(repoRoot(t), "examples/sandbox/merchants.toml"))
	t.Setenv("SANDBOX_BANK_SECRET", "sandbox-bank-secret")
	t.Setenv("SANDBOX_CONSENT_SITE", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
}

func TestRootCaddyfileInjectsMerchantToken(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))

	tests := []struct {
		merchant, path string
		wantOrg        string
		wantScopes     []string
	}{
		{"acme", "/tpp/payments", "org-acme", []string{"openbanking_pisp"}},
		{"acme", "/tpp/accounts/123", "org-acme", []string{"openbanking_aisp"}},
		{"globex", "/tpp/payments", "org-globex", []string{"openbanking_aisp", "openbanking_pisp"}},
		{"initech", "/mandates", "org-initech", []string{"admin"}},
	}
	for _, tt := range tests {
		e := getEcho(t, base+tt.path, "X-Merchant-Id", tt.merchant, "Authorization", "Bearer caller-token")
		a := e.Authorization
		if !a.Valid || !a.IssuedBySandbox || a.Organisation != tt.wantOrg || !slices.Equal(a.Scopes, tt.wantScopes) {
			t.Errorf("%s %s: authorization %+v, want a valid token for %s %v", tt.merchant, tt.path, a, tt.wantOrg, tt.wantScopes)
		}
		for h := range e.Headers {
			if strings.EqualFold(h, "X-Merchant-Id") {
				t.Errorf("%s %s: merchant header reached the upstream", tt.merchant, tt.path)
			}
		}
	}
	// One token per (merchant, scope set): the repeat above adds none.
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	if got := sb.TokenRequests(); got != 4 {
		t.Fatalf("token requests = %d, want 4", got)
	}
}

func TestConcurrentFirstRequestsOneTokenRequest(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	const n = 200
	var wg sync.WaitGroup
	errs := make(chan string, n)
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			req, _ := http.NewRequest("GET", base+"/tpp/payments", nil)
			req.Header.Set("X-Merchant-Id", "acme")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				errs <- err.Error()
				return
			}
			defer resp.Body.Close()
			var e echo
			if err := json.NewDecoder(resp.Body).Decode(&e); err != nil || !e.Authorization.Valid {
				errs <- resp.Status
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	if got := sb.TokenRequests(); got != 1 {
		t.Fatalf("200 concurrent first requests made %d token requests, want 1", got)
	}
}

func TestRefusedRequestsNeverReachUpstream(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	tests := []struct {
		name       string
		headers    []string
		wantStatus int
		wantError  string
	}{
		{"no merchant", nil, 400, "missing_merchant"},
		{"unknown merchant", []string{"X-Merchant-Id", "umbrella"}, 403, "unknown_merchant"},
		{"path traversal", []string{"X-Merchant-Id", "../acme"}, 400, "invalid_merchant"},
		{"percent", []string{"X-Merchant-Id", "acme%2F"}, 400, "invalid_merchant"},
		{"caller token only", []string{"Authorization", "Bearer stolen"}, 400, "missing_merchant"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, body := get(t, base+"/tpp/payments", tt.headers...)
			var eb struct{ Error, Message string }
			if status != tt.wantStatus || json.Unmarshal(body, &eb) != nil || eb.Error != tt.wantError {
				t.Fatalf("got %d %s, want %d %s", status, body, tt.wantStatus, tt.wantError)
			}
		})
	}
	if got := sb.TokenRequests(); got != 0 {
		t.Fatalf("refused requests made %d token requests", got)
	}
}

func TestTokenAPIFailureIs502(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	sb.Fail(http.StatusUnauthorized, "", 1)
	status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	if status != http.StatusBadGateway || !strings.Contains(string(body), `"token_refused"`) || !strings.Contains(string(body), `"merchant":"acme"`) {
		t.Fatalf("got %d %s", status, body)
	}
	if strings.Contains(string(body), apiKey) {
		t.Fatal("error body leaks the API key")
	}
}

func TestReloadKeepsTokenCacheUntilProviderChanges(t *testing.T) {
	sb, _ := startSandbox(t)
	cf := sandboxCaddyfile(t)
	base := startCaddy(t, cf)
	first := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization.Fingerprint

	// A reload that changes the routes but not the provider keeps the cache.
	loadCaddy(t, strings.Replace(cf, "bind 127.0.0.1", "bind 127.0.0.1\n\theader X-Reloaded yes", 1))
	again := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization.Fingerprint
	if again != first || sb.TokenRequests() != 1 {
		t.Fatalf("after reload: fingerprint %s (was %s), token requests %d; want the cached token", again, first, sb.TokenRequests())
	}

	// A reload with a changed provider (a new registry file) fetches anew.
	changed := strings.Replace(readFile(t, os.Getenv("TOKEN_BROKER_CONFIG")), `timeout = "5s"`, `timeout = "6s"`, 1)
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(changed), 0o600); err != nil {
		t.Fatal(err)
	}
	loadCaddy(t, strings.ReplaceAll(cf, "{$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}", path))
	third := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization.Fingerprint
	if third == first || sb.TokenRequests() != 2 {
		t.Fatalf("after provider change: fingerprint %s (was %s), token requests %d; want a new token", third, first, sb.TokenRequests())
	}
}
