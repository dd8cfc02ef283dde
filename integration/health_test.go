package integration

import (
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// healthCaddyfile serves the broker on TOKEN_BROKER_PORT and its health
// probes on HEALTH_PORT, as a pod would (kubelet reaches the pod IP, not
// the sidecar's loopback site).
const healthCaddyfile = `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
	}
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker
	reverse_proxy {$SANDBOX_URL}
}

http://:{$HEALTH_PORT} {
	bind 127.0.0.1
	token_broker_health
}
`

// healthRegistry is a registry of one Nuapay provider at BASE_URL with the
// API key KEY, an explicit merchant and, when listed, a wildcard entry
// restricted to the organisations the provider lists.
func healthRegistry(t *testing.T, baseURL, key string, listed bool) {
	t.Helper()
	reg := fmt.Sprintf(`[providers.np]
type = "nuapay"
base_url = %q
api_key = "{env.HEALTH_API_KEY}"
timeout = "2s"

[merchants.acme]
provider = "np"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`, baseURL)
	if listed {
		reg += `
[merchants."*"]
provider = "np"
organisation = "{merchant}"
scopes = ["openbanking_pisp"]
only_listed_organisations = true
`
	}
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(reg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("HEALTH_API_KEY", key)
	t.Setenv("TOKEN_BROKER_CONFIG", path)
}

// TestHealth: readiness and liveness through the admin API, the
// token_broker_health handler and the `caddy token-broker health` command
// of the built binary, against a real Caddy: ready with a loaded registry;
// unready while the organisations list the wildcard entry is restricted to
// cannot be read (but live); ready, with the provider reported failing,
// when the provider's token API is down.
func TestHealth(t *testing.T) {
	caddyBin, _ := buildBinaries(t)
	tests := []struct {
		name          string
		listed        bool
		wrongKey      bool // the sandbox refuses the API key: the listing fails
		tokenAPIDown  bool // the provider's base URL answers nothing
		wantReady     bool
		wantReason    string
		wantProvider  string // the provider's status after one request for acme
		wantLastError string
	}{
		{name: "ready", wantReady: true, wantReason: "ready: 1 merchant registry loaded, no provider failing", wantProvider: "ok"},
		{name: "listing read", listed: true, wantReady: true, wantProvider: "ok"},
		{name: "listing fails", listed: true, wrongKey: true, wantReason: `not ready: the organisations of provider "np"`,
			wantProvider: "failing", wantLastError: "token_refused"},
		{name: "token API down", tokenAPIDown: true, wantReady: true, wantReason: "failing providers (reported, not a readiness failure): np (token_unavailable)",
			wantProvider: "failing", wantLastError: "token_unavailable"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, sandboxURL := startSandbox(t)
			baseURL, key := sandboxURL, apiKey
			if tt.wrongKey {
				key = "it-wrong-key-health"
			}
			if tt.tokenAPIDown {
				baseURL = fmt.Sprintf("http://127.0.0.1:%d", freePort(t))
			}
			healthRegistry(t, baseURL, key, tt.listed)
			healthPort := freePort(t)
			t.Setenv("HEALTH_PORT", fmt.Sprint(healthPort))
			base := startCaddy(t, healthCaddyfile)
			admin := "127.0.0.1:" + os.Getenv("TOKEN_BROKER_ADMIN_PORT")
			probes := fmt.Sprintf("http://127.0.0.1:%d", healthPort)
			waitListening(t, fmt.Sprintf("127.0.0.1:%d", healthPort))

			// One request for acme: its token fetch fails where the
			// provider is down or refuses the key.
			status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
			if wantOK := !tt.wrongKey && !tt.tokenAPIDown; (status == http.StatusOK) != wantOK {
				t.Fatalf("request for acme: %d %s", status, body)
			}

			wantStatus := http.StatusServiceUnavailable
			if tt.wantReady {
				wantStatus = http.StatusOK
				// The organisations list is read in the background
				// from the start: unready until then.
				waitHealth(t, probes+"/ready", http.StatusOK)
			}
			for _, url := range []string{"http://" + admin + "/token_broker/health", probes + "/ready"} {
				h := getHealth(t, url, wantStatus)
				if h.Ready != tt.wantReady || !h.Live || !strings.Contains(h.Reason, tt.wantReason) {
					t.Errorf("%s: ready %v live %v reason %q, want ready %v, live, reason with %q", url, h.Ready, h.Live, h.Reason, tt.wantReady, tt.wantReason)
				}
				if len(h.Providers) != 1 || h.Providers[0].Status != tt.wantProvider || h.Providers[0].LastError != tt.wantLastError {
					t.Errorf("%s: providers %+v, want np %s %s", url, h.Providers, tt.wantProvider, tt.wantLastError)
				}
				if strings.Contains(fmt.Sprint(h), apiKey) || strings.Contains(fmt.Sprint(h), "it-wrong-key-health") {
					t.Errorf("%s: the answer holds the API key: %+v", url, h)
				}
			}
			for _, url := range []string{"http://" + admin + "/token_broker/health/live", probes + "/live"} {
				if h := getHealth(t, url, http.StatusOK); !h.Live {
					t.Errorf("%s: not live: %+v", url, h)
				}
			}
			if status, body := get(t, probes+"/tpp/payments", "X-Merchant-Id", "acme"); status != http.StatusNotFound || !strings.Contains(string(body), `"not_found"`) {
				t.Errorf("health site, other path: %d %s, want 404 not_found", status, body)
			}

			// The command, as an exec probe runs it.
			out, code := runCommand(t, caddyBin, "token-broker", "health", "--address", admin)
			if wantCode := map[bool]int{true: 0, false: 1}[tt.wantReady]; code != wantCode || strings.Count(out, "\n") != 1 || !strings.Contains(out, tt.wantReason) {
				t.Errorf("token-broker health: exit %d, output %q; want exit %d, one line with %q", code, out, wantCode, tt.wantReason)
			}
			// Without --address: $CADDY_ADMIN, as caddy reload finds it.
			if out, code := runCommand(t, caddyBin, "CADDY_ADMIN="+admin, "token-broker", "health", "--live"); code != 0 || !strings.HasPrefix(out, "live:") {
				t.Errorf("token-broker health --live: exit %d, output %q; want exit 0, live", code, out)
			}
			if tt.name == "ready" {
				// The refresh-token command finds the admin API the same
				// way (the broker answers: acme is a Nuapay merchant).
				out, _ := runCommand(t, caddyBin, "CADDY_ADMIN="+admin, "token-broker-refresh-token", "--merchant", "acme")
				if !strings.Contains(out, "does not use the refresh_token grant") {
					t.Errorf("token-broker-refresh-token without --address: %q, want the broker's answer", out)
				}
			}
		})
	}
}

// TestHealthCommandWithoutCaddy: no Caddy at the admin address: exit 1
// and a line saying so.
func TestHealthCommandWithoutCaddy(t *testing.T) {
	t.Parallel()
	caddyBin, _ := buildBinaries(t)
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	out, code := runCommand(t, caddyBin, "token-broker", "health", "--address", addr)
	if code != 1 || !strings.HasPrefix(out, "not ready: cannot reach the admin API at "+addr+" ") || strings.Count(out, "\n") != 1 {
		t.Errorf("exit %d, output %q; want exit 1, one line", code, out)
	}
}

// waitHealth polls a health endpoint until it answers status.
func waitHealth(t *testing.T, url string, status int) {
	t.Helper()
	deadline := time.Now().Add(15 * time.Second)
	for wait := 10 * time.Millisecond; ; wait = min(2*wait, time.Second) {
		got, body := get(t, url)
		if got == status {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("GET %s: still %d %s, want %d", url, got, body, status)
		}
		time.Sleep(wait)
	}
}

// getHealth GETs a health endpoint, checks its status and decodes it.
func getHealth(t *testing.T, url string, wantStatus int) health {
	t.Helper()
	status, body := get(t, url)
	if status != wantStatus {
		t.Fatalf("GET %s: %d %s, want %d", url, status, body, wantStatus)
	}
	var h health
	if err := json.Unmarshal(body, &h); err != nil {
		t.Fatalf("GET %s: %s: %v", url, body, err)
	}
	return h
}

// health is the module's Health, decoded as a client would.
type health struct {
	Ready  bool   `json:"ready"`
	Live   bool   `json:"live"`
	Reason string `json:"reason"`
	Checks []struct {
		Name   string `json:"name"`
		OK     bool   `json:"ok"`
		Detail string `json:"detail"`
	} `json:"checks"`
	Providers []struct {
		Name        string `json:"name"`
		Status      string `json:"status"`
		Breaker     string `json:"breaker"`
		FailingKeys int    `json:"failing_keys"`
		LastError   string `json:"last_error"`
	} `json:"providers"`
}

// runCommand runs the binary with args and returns its combined output
// and exit status. Leading NAME=value arguments are set in its
// environment; its standard input holds a line.
func runCommand(t *testing.T, bin string, args ...string) (string, int) {
	t.Helper()
	env := append(os.Environ(), "HOME="+t.TempDir(), "XDG_DATA_HOME="+t.TempDir(), "XDG_CONFIG_HOME="+t.TempDir())
	for len(args) > 0 && strings.Contains(args[0], "=") {
		env, args = append(env, args[0]), args[1:]
	}
	cmd := exec.Command(bin, args...)
	cmd.Env = env
	cmd.Stdin = strings.NewReader("it-refresh-token\n")
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if errors.As(err, &ee) {
		return string(out), ee.ExitCode()
	}
	if err != nil {
		t.Fatalf("%s %v: %v", bin, args, err)
	}
	return string(out), 0
}
