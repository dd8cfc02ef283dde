package integration

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
)

// revokeAll revokes every sandbox token of an organisation, as an operator
// would at Nuapay: the broker's cached token becomes invalid upstream.
func revokeAll(t *testing.T, sandboxURL, org string) {
	t.Helper()
	req, _ := http.NewRequest("POST", sandboxURL+"/organisations/"+org+"/tokens/revoke", nil)
	req.SetBasicAuth(apiKey, "")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != 200 {
		t.Fatalf("revoke: %v %v", err, resp)
	}
	resp.Body.Close()
}

func post(t *testing.T, url string, body []byte) (int, echo) {
	t.Helper()
	req, _ := http.NewRequest("POST", url, bytes.NewReader(body))
	req.Header.Set("X-Merchant-Id", "acme")
	req.Header.Set("X-Sandbox-Require-Token", "1") // the echo answers 401 invalid_token to a bad token
	req.Header.Set("Idempotency-Key", "k-1")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Error(err)
		return 0, echo{}
	}
	defer resp.Body.Close()
	raw, _ := io.ReadAll(resp.Body)
	var e echo
	_ = json.Unmarshal(raw, &e)
	e.BodyBytes = len(body)
	if resp.StatusCode == 200 {
		var got struct {
			BodyBytes int `json:"body_bytes"`
		}
		_ = json.Unmarshal(raw, &got)
		e.BodyBytes = got.BodyBytes
	}
	return resp.StatusCode, e
}

func TestUpstream401PurgesOnceAndRetries(t *testing.T) {
	sb, sandboxURL := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	revokeAll(t, sandboxURL, "org-acme")

	const n = 100
	body := []byte(`{"amount":"10.00","currency":"EUR"}`)
	var wg sync.WaitGroup
	for range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			status, e := post(t, base+"/tpp/payments", body)
			if status != 200 || !e.Authorization.Valid || e.BodyBytes != len(body) {
				t.Errorf("status %d, authorization %+v, body %d bytes: want 200 with a valid token and the whole body", status, e.Authorization, e.BodyBytes)
			}
			if got := anyStrings(e.Headers["Idempotency-Key"]); len(got) != 1 || got[0] != "k-1" {
				t.Errorf("Idempotency-Key at the upstream = %v, want k-1 unchanged", got)
			}
		}()
	}
	wg.Wait()
	if got := sb.TokenRequests(); got != 2 {
		t.Fatalf("token requests = %d, want 2 (the first and exactly one re-fetch)", got)
	}

	// A body over retry_body_limit (64 KiB) is streamed, so it cannot be
	// sent again: the caller gets the 401, and the token is still purged.
	revokeAll(t, sandboxURL, "org-acme")
	big := []byte(strings.Repeat("x", 70<<10))
	if status, _ := post(t, base+"/tpp/payments", big); status != http.StatusUnauthorized {
		t.Fatalf("non-replayable request: status %d, want 401", status)
	}
	if status, e := post(t, base+"/tpp/payments", body); status != 200 || !e.Authorization.Valid {
		t.Fatalf("next request: status %d, want 200 with a fresh token", status)
	}
	if got := sb.TokenRequests(); got != 3 {
		t.Fatalf("token requests = %d, want 3", got)
	}
}

// TestUpstream401RetryAfterPathRewrite: handlers after token_broker may
// rewrite the request in place (handle_path strips its prefix,
// request_header adds a header value); the retry starts from the request
// as token_broker passed it on, so it reaches the upstream with the right
// path and the header value once.
func TestUpstream401RetryAfterPathRewrite(t *testing.T) {
	sb, sandboxURL := startSandbox(t)
	cf := strings.Replace(sandboxCaddyfile(t), "\thandle {\n\t\ttoken_broker\n\t\treverse_proxy {$SANDBOX_URL:http://127.0.0.1:9080}\n\t}",
		"\thandle {\n\t\ttoken_broker\n\t\thandle_path /api/* {\n\t\t\trequest_header +X-Forwarded-Prefix /api\n\t\t\treverse_proxy {$SANDBOX_URL:http://127.0.0.1:9080}\n\t\t}\n\t}", 1)
	if !strings.Contains(cf, "handle_path /api/*") {
		t.Fatal("the root Caddyfile changed: update this test")
	}
	base := startCaddy(t, cf)
	getEcho(t, base+"/api/tpp/payments", "X-Merchant-Id", "acme")
	revokeAll(t, sandboxURL, "org-acme")
	status, e := post(t, base+"/api/tpp/payments", []byte(`{"amount":"1.00"}`))
	if status != 200 || !e.Authorization.Valid || e.Path != "/tpp/payments" {
		t.Fatalf("retry: status %d, path %q, authorization %+v; want 200 at /tpp/payments with a valid token", status, e.Path, e.Authorization)
	}
	if got := anyStrings(e.Headers["X-Forwarded-Prefix"]); len(got) != 1 || got[0] != "/api" {
		t.Fatalf("retry: X-Forwarded-Prefix %q at the upstream, want [/api]", got)
	}
	if sb.TokenRequests() != 2 {
		t.Fatalf("token requests = %d, want 2", sb.TokenRequests())
	}
}

// TestCallerProvoked401sMintNoTokens: a resource server answers 401
// `Bearer error="invalid_token"` on one path whatever the token (a wrong
// audience or tenant, and the caller picks the path). The first rejection
// purges and retries once; the fresh token rejected too puts the key's
// purges on hold, so ten requests cause at most two token requests, and
// the caller gets the upstream's 401 each time.
func TestCallerProvoked401sMintNoTokens(t *testing.T) {
	sb, _ := startSandbox(t)
	var mu sync.Mutex
	tokens := map[string]bool{}
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		tokens[r.Header.Get("Authorization")] = true
		mu.Unlock()
		w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token", error_description="wrong audience"`)
		w.WriteHeader(http.StatusUnauthorized)
	}))
	t.Cleanup(upstream.Close)
	cf := strings.Replace(sandboxCaddyfile(t), "\thandle {\n\t\ttoken_broker\n",
		"\thandle /other-tenant/* {\n\t\ttoken_broker\n\t\treverse_proxy "+upstream.URL+"\n\t}\n\n\thandle {\n\t\ttoken_broker\n", 1)
	if !strings.Contains(cf, "handle /other-tenant/*") {
		t.Fatal("the root Caddyfile changed: update this test")
	}
	base := startCaddy(t, cf)
	for i := range 10 {
		status, _ := get(t, base+"/other-tenant/payments", "X-Merchant-Id", "acme")
		if status != http.StatusUnauthorized {
			t.Fatalf("request %d: status %d, want the upstream's 401", i, status)
		}
	}
	if got := sb.TokenRequests(); got < 1 || got > 2 {
		t.Fatalf("token requests after 10 provoked 401s = %d, want 1 or 2", got)
	}
	// The key's token is still served to the other paths.
	if e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme"); !e.Authorization.Valid {
		t.Fatalf("authorization at the sandbox: %+v, want the held, valid token", e.Authorization)
	}
	if got := sb.TokenRequests(); got > 2 {
		t.Fatalf("token requests = %d, want at most 2", got)
	}
	mu.Lock()
	defer mu.Unlock()
	if len(tokens) > 2 {
		t.Fatalf("the upstream saw %d tokens, want at most 2", len(tokens))
	}
}
