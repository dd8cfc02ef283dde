package integration

import (
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"
)

func adminURL() string { return "http://127.0.0.1:" + os.Getenv("TOKEN_BROKER_ADMIN_PORT") }

func adminCall(t *testing.T, method, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, adminURL()+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// TestAdminAPI lists, purges and revokes through Caddy's real admin
// endpoint, and checks no answer holds a token.
func TestAdminAPI(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	first := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization
	getEcho(t, base+"/tpp/accounts", "X-Merchant-Id", "acme")
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "globex")

	status, body := adminCall(t, "GET", "/token_broker/tokens")
	var list struct{ Tokens []map[string]any }
	if status != 200 || json.Unmarshal([]byte(body), &list) != nil || len(list.Tokens) != 3 {
		t.Fatalf("list: %d %s", status, body)
	}
	if !strings.Contains(body, `"fingerprint":"`+first.Fingerprint+`"`) || !strings.Contains(body, `"merchant":"globex"`) {
		t.Fatalf("list lacks acme's fingerprint or globex: %s", body)
	}
	assertNoSandboxToken(t, sb, body)
	if status, body := adminCall(t, "GET", "/token_broker/tokens?merchant=globex"); status != 200 || strings.Count(body, `"merchant"`) != 1 {
		t.Fatalf("filtered list: %d %s", status, body)
	}

	// Purge globex: its next request fetches anew.
	if status, body := adminCall(t, "POST", "/token_broker/merchants/globex/purge"); status != 200 || !strings.Contains(body, `"purged":1`) {
		t.Fatalf("purge: %d %s", status, body)
	}
	before := sb.TokenRequests()
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "globex")
	if sb.TokenRequests() != before+1 {
		t.Fatal("purged merchant was served from the cache")
	}

	// Revoke acme's two tokens at the provider.
	status, body = adminCall(t, "POST", "/token_broker/merchants/acme/revoke")
	if status != 200 || strings.Count(body, `"revoked":true`) != 2 {
		t.Fatalf("revoke: %d %s", status, body)
	}
	assertNoSandboxToken(t, sb, body)
	e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization
	if !e.Valid || e.Fingerprint == first.Fingerprint {
		t.Fatalf("after revoke: %+v, want a new valid token", e)
	}

	// The partner's organisations, to onboard a merchant.
	if status, body := adminCall(t, "GET", "/token_broker/providers/nuapay-sandbox/organisations"); status != 200 ||
		!strings.Contains(body, `"id":"org-globex"`) || strings.Count(body, `"id":`) != 3 {
		t.Fatalf("organisations: %d %s", status, body)
	}

	for _, tc := range []struct {
		method, path string
		want         int
	}{
		{"POST", "/token_broker/tokens", 405},
		{"GET", "/token_broker/merchants/acme/purge", 405},
		{"POST", "/token_broker/merchants/acme/explode", 404},
		{"POST", "/token_broker/merchants/ac%0Ame/purge", 404},
		{"GET", "/token_broker/providers/nobody/organisations", 404},
		{"POST", "/token_broker/providers/nuapay-sandbox/organisations", 405},
	} {
		if status, body := adminCall(t, tc.method, tc.path); status != tc.want {
			t.Errorf("%s %s: %d %s, want %d", tc.method, tc.path, status, body, tc.want)
		}
	}
}

// assertNoSandboxToken fails if body (admin output, events) contains anything the sandbox
// recognises as one of its tokens.
func assertNoSandboxToken(t *testing.T, sb interface {
	Issued(string) (string, []string, bool)
}, body string) {
	t.Helper()
	for _, f := range strings.FieldsFunc(body, func(r rune) bool { return strings.ContainsRune("\" ,:{}[]", r) }) {
		if org, _, _ := sb.Issued(f); org != "" {
			t.Fatalf("the output holds a token: %s", body)
		}
	}
}
