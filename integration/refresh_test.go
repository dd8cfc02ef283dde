package integration

import (
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
)

// rotatingBank is a token endpoint that rotates refresh tokens: each use of
// the current refresh token returns a new access token and a new refresh
// token, and the old refresh token stops working (invalid_grant).
type rotatingBank struct {
	mu      sync.Mutex
	current string
	n       int
	used    []string
}

func (b *rotatingBank) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	b.mu.Lock()
	defer b.mu.Unlock()
	id, secret, _ := r.BasicAuth()
	r.ParseForm()
	rt := r.PostForm.Get("refresh_token")
	b.used = append(b.used, rt)
	w.Header().Set("Content-Type", "application/json")
	switch {
	case id != "bank-client" || secret != "bank-secret-xyz":
		w.WriteHeader(401)
		fmt.Fprint(w, `{"error":"invalid_client"}`)
	case r.PostForm.Get("grant_type") != "refresh_token" || rt != b.current:
		w.WriteHeader(400)
		fmt.Fprint(w, `{"error":"invalid_grant","error_description":"refresh token is not valid"}`)
	default:
		b.n++
		b.current = fmt.Sprintf("rt-%d", b.n)
		fmt.Fprintf(w, `{"access_token":"at-%d","token_type":"Bearer","expires_in":3600,"refresh_token":%q}`, b.n, b.current)
	}
}

// TestRefreshTokenSurvivesKill: the rotated refresh token is stored before
// it is used, so a sidecar killed (SIGKILL) after a refresh refreshes again
// after its restart with the token it persisted. The first sidecar keeps
// refresh tokens in clear and warns so; the restarted one has a
// storage_encryption_key: it reads the token stored in clear and seals the
// next one, and does not warn.
func TestRefreshTokenSurvivesKill(t *testing.T) {
	t.Parallel()
	caddyBin, _ := buildBinaries(t)
	bank := &rotatingBank{current: "rt-initial"}
	tokenSrv := httptest.NewServer(bank)
	defer tokenSrv.Close()
	var seen []string
	var mu sync.Mutex
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen = append(seen, r.Header.Get("Authorization"))
		mu.Unlock()
	}))
	defer upstream.Close()

	dir := t.TempDir()
	toml := `[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "` + tokenSrv.URL + `/token"
client_id = "bank-client"
client_secret = "{env.BANK_SECRET}"
auth_method = "client_secret_basic"

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`
	os.WriteFile(filepath.Join(dir, "merchants.toml"), []byte(toml), 0o600)
	port, admin := freePort(t), freePort(t)
	caddyfile := func(storageKey string) string {
		return fmt.Sprintf(`{
	admin 127.0.0.1:%d
	storage file_system %s
	token_broker {
		config %s
		%s
	}
}
http://:%d {
	bind 127.0.0.1
	token_broker
	reverse_proxy %s
}
`, admin, filepath.Join(dir, "storage"), filepath.Join(dir, "merchants.toml"), storageKey, port, upstream.URL)
	}
	storageKey := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("s", 32)))
	env := append(os.Environ(), "BANK_SECRET=bank-secret-xyz", "HOME="+dir, "TB_STORAGE_KEY="+storageKey)

	// start runs Caddy with the Caddyfile cf, its log in the file it returns.
	start := func(cf string) (*exec.Cmd, string) {
		name := filepath.Join(t.TempDir(), "Caddyfile")
		os.WriteFile(name, []byte(cf), 0o600)
		log, err := os.Create(name + ".log")
		if err != nil {
			t.Fatal(err)
		}
		defer log.Close()
		cmd := exec.Command(caddyBin, "run", "--config", name, "--adapter", "caddyfile")
		cmd.Env, cmd.Stderr = env, log
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { cmd.Process.Kill(); cmd.Wait() })
		waitListening(t, fmt.Sprintf("127.0.0.1:%d", port))
		return cmd, log.Name()
	}
	const unsealedWarning = "refresh tokens are stored unsealed in Caddy's storage: set storage_encryption_key"
	warned := func(log string) bool {
		b, err := os.ReadFile(log)
		if err != nil {
			t.Fatal(err)
		}
		return strings.Contains(string(b), unsealedWarning)
	}
	// stored is the file of acme's refresh token in the storage.
	stored := func() string {
		files, _ := filepath.Glob(filepath.Join(dir, "storage", "token_broker", "refresh_tokens", "bank*acme"))
		if len(files) != 1 {
			t.Fatalf("refresh token files: %v; want one", files)
		}
		b, err := os.ReadFile(files[0])
		if err != nil {
			t.Fatal(err)
		}
		return string(b)
	}
	base := fmt.Sprintf("http://127.0.0.1:%d", port)

	first, firstLog := start(caddyfile(""))
	if !warned(firstLog) {
		t.Errorf("no warning that refresh tokens are kept in clear")
	}
	// An operator loads the merchant's first refresh token from stdin.
	load := exec.Command(caddyBin, "token-broker-refresh-token", "--merchant", "acme", "--address", fmt.Sprintf("127.0.0.1:%d", admin))
	load.Stdin = strings.NewReader("rt-initial\n")
	if out, err := load.CombinedOutput(); err != nil || !strings.Contains(string(out), `"stored":true`) || strings.Contains(string(out), "rt-initial") {
		t.Fatalf("loading the refresh token: %v %s", err, out)
	}
	if status, body := get(t, base+"/accounts", "X-Merchant-Id", "acme"); status != 200 {
		t.Fatalf("first request: %d %s", status, body)
	}
	if got := stored(); got != "rt-1" {
		t.Fatalf("without a storage key the storage holds %q; want rt-1 in clear", got)
	}
	// kill -9: no graceful shutdown, nothing flushed at exit.
	first.Process.Signal(syscall.SIGKILL)
	first.Wait()

	_, secondLog := start(caddyfile("storage_encryption_key {env.TB_STORAGE_KEY}"))
	if warned(secondLog) {
		t.Errorf("warned of refresh tokens in clear with a storage_encryption_key")
	}
	if status, body := get(t, base+"/accounts", "X-Merchant-Id", "acme"); status != 200 {
		t.Fatalf("after the restart: %d %s (the rotated refresh token was not persisted)", status, body)
	}
	if got := stored(); strings.Contains(got, "rt-") || !strings.HasPrefix(got, "\x01") {
		t.Fatalf("with a storage key the storage holds %q; want rt-2 sealed", got)
	}
	bank.mu.Lock()
	used := strings.Join(bank.used, ",")
	bank.mu.Unlock()
	if used != "rt-initial,rt-1" {
		t.Fatalf("refresh tokens used: %s, want rt-initial,rt-1", used)
	}
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(seen, ",") != "Bearer at-1,Bearer at-2" {
		t.Fatalf("upstream saw %v", seen)
	}

	// The bank forgets the merchant's consent: the caller is told so.
	bank.mu.Lock()
	bank.current = "rt-revoked-by-the-bank"
	bank.mu.Unlock()
	if status, body := adminCallBody(t, admin, "POST", "/token_broker/merchants/acme/purge"); status != 200 {
		t.Fatalf("purge: %d %s", status, body)
	}
	status, body := get(t, base+"/accounts", "X-Merchant-Id", "acme")
	if status != http.StatusBadGateway || !strings.Contains(string(body), `"consent_required"`) {
		t.Fatalf("after invalid_grant: %d %s, want 502 consent_required", status, body)
	}
}

func adminCallBody(t *testing.T, port int, method, path string) (int, string) {
	t.Helper()
	req, _ := http.NewRequest(method, fmt.Sprintf("http://127.0.0.1:%d%s", port, path), nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b := new(strings.Builder)
	io.Copy(b, resp.Body)
	return resp.StatusCode, b.String()
}
