package integration

import (
	"bytes"
	"fmt"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// buildBinaries builds cmd/caddy and cmd/sandbox the way `make build` does,
// once per test binary (see builtOnce).
func buildBinaries(t *testing.T) (caddyBin, sandboxBin string) {
	t.Helper()
	return builtOnce(t, "./cmd/caddy"), builtOnce(t, "./cmd/sandbox")
}

// built are the commands this test binary built, by package path (a
// *builtBinary each).
var built sync.Map

// builtBinary is one command built for the tests, in a folder of its own.
type builtBinary struct {
	once sync.Once
	dir  string
	path string
	err  error
}

// builtOnce builds the command pkg (a path from the repository's top, such
// as ./cmd/caddy) the first time a test asks for it and returns the
// binary's path; tests that ask meanwhile wait for that build. The tests
// only run the binaries; TestMain removes them at the end.
func builtOnce(t *testing.T, pkg string) string {
	t.Helper()
	v, _ := built.LoadOrStore(pkg, &builtBinary{})
	b := v.(*builtBinary)
	b.once.Do(func() {
		if b.dir, b.err = os.MkdirTemp("", "integration-bin-"); b.err != nil {
			return
		}
		bin := filepath.Join(b.dir, filepath.Base(pkg))
		cmd := exec.Command("go", "build", "-o", bin, pkg)
		cmd.Dir = repoRoot(t)
		if out, err := cmd.CombinedOutput(); err != nil {
			b.err = fmt.Errorf("go build %s: %v\n%s", pkg, err, out)
			return
		}
		b.path = bin
	})
	if b.err != nil {
		t.Fatal(b.err)
	}
	return b.path
}

// removeBuilt removes the folders of the binaries builtOnce built.
func removeBuilt() {
	built.Range(func(_, v any) bool {
		if dir := v.(*builtBinary).dir; dir != "" {
			os.RemoveAll(dir)
		}
		return true
	})
}

// startProcess starts a command and stops it, by its process id, when the
// test ends. Its output goes to the returned buffer.
func startProcess(t *testing.T, dir string, env []string, name string, args ...string) *bytes.Buffer {
	t.Helper()
	var out bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Dir = dir
	cmd.Env = append(os.Environ(), env...)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	t.Cleanup(func() {
		_ = cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-done:
		case <-time.After(10 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
		if t.Failed() {
			t.Logf("%s output:\n%s", filepath.Base(name), out.String())
		}
	})
	return &out
}

// TestMakeRunDefault does what a newcomer does after `make run`: the built
// binaries, the root Caddyfile and its embedded sandbox registry, then the
// curl of the README, and the merchant consent `make run` prints: a consent
// link from the sidecar, the sandbox bank's approve page, the callback on
// the loopback consent site, then hooli's calls get tokens by refresh.
func TestMakeRunDefault(t *testing.T) {
	t.Parallel()
	caddyBin, sandboxBin := buildBinaries(t)
	root := repoRoot(t)
	addrFile := filepath.Join(t.TempDir(), "sandbox.addr")
	consentPort := freePort(t)
	consentSite := fmt.Sprintf("http://127.0.0.1:%d", consentPort)
	// The flags of the Makefile's run target.
	startProcess(t, root, nil, sandboxBin, "-listen", "127.0.0.1:0", "-api-key", "make-run-key", "-addr-file", addrFile,
		"-bank-client", "sandbox-bank-client:make-run-bank-secret", "-bank-redirect-uris", consentSite+"/consent/callback",
		"-state", t.TempDir())
	var sandboxAddr string
	for deadline := time.Now().Add(10 * time.Second); sandboxAddr == ""; time.Sleep(20 * time.Millisecond) {
		b, _ := os.ReadFile(addrFile)
		sandboxAddr = strings.TrimSpace(string(b))
		if time.Now().After(deadline) {
			t.Fatal("the sandbox did not write its address")
		}
	}

	port, adminPort := freePort(t), freePort(t)
	env := []string{
		"SANDBOX_URL=http://" + sandboxAddr, "NUAPAY_API_KEY=make-run-key",
		"SANDBOX_CONSENT_SITE=" + consentSite, "SANDBOX_BANK_SECRET=make-run-bank-secret",
		fmt.Sprintf("TOKEN_BROKER_PORT=%d", port), fmt.Sprintf("TOKEN_BROKER_ADMIN_PORT=%d", adminPort),
		"HOME=" + t.TempDir(), "XDG_DATA_HOME=" + t.TempDir(), "XDG_CONFIG_HOME=" + t.TempDir(),
	}
	startProcess(t, root, env, caddyBin, "run", "--config", "Caddyfile", "--adapter", "caddyfile")
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", port))

	e := getEcho(t, fmt.Sprintf("http://127.0.0.1:%d/tpp/payments", port), "X-Merchant-Id", "acme")
	a := e.Authorization
	if !a.Present || !a.Valid || !a.IssuedBySandbox || a.Organisation != "org-acme" || a.Scheme != "Bearer" {
		t.Fatalf("the sandbox saw %+v; want a valid Bearer token for org-acme", a)
	}

	// Merchant consent at the sandbox bank, as the banner says.
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", consentPort))
	if status, body := get(t, base+"/accounts", "X-Merchant-Id", "hooli"); status != http.StatusBadGateway || !strings.Contains(string(body), "consent_required") {
		t.Fatalf("hooli before consent: %d %s, want 502 consent_required", status, body)
	}
	status, link := consentLink(t, base, "hooli", "")
	if status != http.StatusOK || !strings.HasPrefix(link["url"], consentSite+"/consent/start?link=") {
		t.Fatalf("consent link: %d %v, want a link on %s", status, link, consentSite)
	}
	if _, final := consentThrough(t, newBrowser(), link["url"]); final != nil {
		t.Fatalf("the callback redirected to %s, want the thank-you page", final)
	}
	a = getEcho(t, base+"/accounts", "X-Merchant-Id", "hooli").Authorization
	if !a.Valid || a.Organisation != "sandbox-bank-client" || a.Scheme != "Bearer" {
		t.Fatalf("hooli after consent: the sandbox saw %+v; want a valid bank token", a)
	}
	if st := consentStates(t, fmt.Sprintf("http://127.0.0.1:%d", adminPort))["hooli"]; st["has_refresh_token"] != true || st["consent_required"] != false {
		t.Errorf("admin consent state of hooli: %v", st)
	}
	if status, _ := get(t, consentSite+"/tpp/payments", "X-Merchant-Id", "acme"); status != http.StatusNotFound {
		t.Errorf("the consent site proxied a call: %d, want 404", status)
	}
}
