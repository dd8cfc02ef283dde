package integration

import (
	"bytes"
	"fmt"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
)

// syncBuffer is a bytes.Buffer safe for a process writing and a test
// reading at once.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

// makeRun is one `make run` started by a test in a process group of its
// own (make, the shell, the sandbox, Caddy), stopped through that group's
// id.
type makeRun struct {
	cmd  *exec.Cmd
	out  *syncBuffer
	done chan struct{}
}

func startMakeRun(t *testing.T, env []string, vars ...string) *makeRun {
	t.Helper()
	m := &makeRun{out: &syncBuffer{}, done: make(chan struct{})}
	m.cmd = exec.Command("make", append([]string{"run"}, vars...)...)
	m.cmd.Dir = repoRoot(t)
	m.cmd.Env = append(withoutMakeVars(os.Environ()), env...)
	m.cmd.Stdout, m.cmd.Stderr = m.out, m.out
	m.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := m.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { m.cmd.Wait(); close(m.done) }()
	t.Cleanup(func() {
		m.stop(t)
		if t.Failed() {
			t.Logf("make run output:\n%s", m.out.String())
		}
	})
	return m
}

// stop sends SIGTERM to the process group, as Ctrl-C in a terminal
// reaches every process of the foreground job, and waits for make to end.
func (m *makeRun) stop(t *testing.T) {
	t.Helper()
	select {
	case <-m.done:
		return
	default:
	}
	_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGTERM)
	select {
	case <-m.done:
	case <-time.After(30 * time.Second):
		_ = syscall.Kill(-m.cmd.Process.Pid, syscall.SIGKILL)
		<-m.done
	}
}

// waitUp waits until addr accepts connections; make run builds first, so
// the deadline is generous. It fails at once if make ends.
func (m *makeRun) waitUp(t *testing.T, addr string) {
	t.Helper()
	delay := 20 * time.Millisecond
	for deadline := time.Now().Add(10 * time.Minute); ; {
		if c, err := net.DialTimeout("tcp", addr, time.Second); err == nil {
			c.Close()
			return
		}
		select {
		case <-m.done:
			t.Fatalf("make run ended before %s listened:\n%s", addr, m.out.String())
		case <-time.After(delay):
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s did not listen within 10 minutes", addr)
		}
		delay = min(2*delay, time.Second)
	}
}

// TestMakeRunKeepsConsentAcrossRestarts runs `make run` as a newcomer does,
// gives the sandbox bank's merchant hooli its consent, stops everything
// (Ctrl-C), runs `make run` again, and calls for hooli: the broker's
// refresh token (in Caddy's data folder under RUN_DIR) and the sandbox's
// record of it (the sandbox's -state under RUN_DIR) both survived, so the
// call gets a token by refresh without a new consent. It also checks that
// make run says what it is doing while it builds.
func TestMakeRunKeepsConsentAcrossRestarts(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make is not installed (%v): the tests of `make run` and the README need it; install make", err)
	}
	runDir, bin := t.TempDir(), t.TempDir()
	sandboxPort, port, adminPort, consentPort := freePort(t), freePort(t), freePort(t), freePort(t)
	vars := []string{"BIN=" + bin, "RUN_DIR=" + runDir,
		fmt.Sprintf("SANDBOX_ADDR=127.0.0.1:%d", sandboxPort), fmt.Sprintf("SANDBOX_CONSENT_ADDR=127.0.0.1:%d", consentPort)}
	// HOME elsewhere: without RUN_DIR's folders Caddy would use the
	// user's ~/.local/share/caddy; this test must not.
	// The Go caches stay the machine's: without them make run would
	// download every module and compile Caddy again.
	env := append(goCacheEnv(t), "HOME="+t.TempDir(), "XDG_DATA_HOME=", "XDG_CONFIG_HOME=",
		fmt.Sprintf("TOKEN_BROKER_PORT=%d", port), fmt.Sprintf("TOKEN_BROKER_ADMIN_PORT=%d", adminPort))
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	consentSite := fmt.Sprintf("http://127.0.0.1:%d", consentPort)

	first := startMakeRun(t, env, vars...)
	first.waitUp(t, fmt.Sprintf("127.0.0.1:%d", port))
	first.waitUp(t, fmt.Sprintf("127.0.0.1:%d", consentPort))
	if out := first.out.String(); !strings.Contains(out, "build: "+bin+"/caddy (a first build") || !strings.Contains(out, "run: state in "+runDir) {
		t.Errorf("make run did not say what it does; its output:\n%s", out)
	}
	status, link := consentLink(t, base, "hooli", "")
	if status != http.StatusOK || !strings.HasPrefix(link["url"], consentSite+"/consent/start?link=") {
		t.Fatalf("consent link: %d %v, want a link on %s", status, link, consentSite)
	}
	if _, final := consentThrough(t, newBrowser(), link["url"]); final != nil {
		t.Fatalf("the callback redirected to %s, want the thank-you page", final)
	}
	if a := getEcho(t, base+"/accounts", "X-Merchant-Id", "hooli").Authorization; !a.Valid || a.Organisation != "sandbox-bank-client" {
		t.Fatalf("hooli after consent: the sandbox saw %+v; want a valid bank token", a)
	}
	first.stop(t)

	second := startMakeRun(t, env, vars...)
	second.waitUp(t, fmt.Sprintf("127.0.0.1:%d", port))
	status, body := get(t, base+"/accounts", "X-Merchant-Id", "hooli")
	if status != http.StatusOK {
		t.Fatalf("hooli after a restart of make run: %d %s, want 200 with a token by refresh (consent kept)", status, body)
	}
	if a := getEcho(t, base+"/accounts", "X-Merchant-Id", "hooli").Authorization; !a.Valid || a.Organisation != "sandbox-bank-client" {
		t.Errorf("hooli after the restart: the sandbox saw %+v; want a valid bank token", a)
	}
	for _, p := range []string{"sandbox/bank-state.json", "data/caddy"} {
		if _, err := os.Stat(filepath.Join(runDir, p)); err != nil {
			t.Errorf("RUN_DIR has no %s: %v", p, err)
		}
	}
}

// goCacheEnv returns the Go module and build caches of the go command
// running the tests, for a child that gets another HOME.
func goCacheEnv(t *testing.T) []string {
	t.Helper()
	out, err := exec.Command("go", "env", "GOPATH", "GOMODCACHE", "GOCACHE").Output()
	if err != nil {
		t.Fatalf("go env: %v", err)
	}
	v := strings.Split(strings.TrimSpace(string(out)), "\n")
	if len(v) != 3 {
		t.Fatalf("go env printed %q", out)
	}
	return []string{"GOPATH=" + v[0], "GOMODCACHE=" + v[1], "GOCACHE=" + v[2]}
}

// withoutMakeVars drops from environ what an outer make (`make test`)
// exports: its own flags, which the make run under test would take as its
// own, and the Makefile's exported variables, which that make run sets
// itself.
func withoutMakeVars(environ []string) []string {
	drop := []string{"MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES",
		"SANDBOX_URL", "NUAPAY_API_KEY", "SANDBOX_CONSENT_SITE", "SANDBOX_BANK_SECRET"}
	var out []string
	for _, kv := range environ {
		name, _, _ := strings.Cut(kv, "=")
		if !slices.Contains(drop, name) {
			out = append(out, kv)
		}
	}
	return out
}

// TestMakeRunStopsWhenTheSandboxCannotListen runs `make run` with the
// sandbox's address already taken (another `make run` still going, or any
// other program): make run must end with an error naming the address, and
// Caddy must not start, rather than serve every request a token error (or,
// with another `make run`'s Caddy on the same ports, share them with it
// through SO_REUSEPORT).
func TestMakeRunStopsWhenTheSandboxCannotListen(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make is not installed (%v): the tests of `make run` and the README need it; install make", err)
	}
	busy, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer busy.Close()
	port, adminPort, consentPort := freePort(t), freePort(t), freePort(t)
	vars := []string{"BIN=" + t.TempDir(), "RUN_DIR=" + t.TempDir(),
		"SANDBOX_ADDR=" + busy.Addr().String(), fmt.Sprintf("SANDBOX_CONSENT_ADDR=127.0.0.1:%d", consentPort)}
	env := append(goCacheEnv(t), "HOME="+t.TempDir(), "XDG_DATA_HOME=", "XDG_CONFIG_HOME=",
		fmt.Sprintf("TOKEN_BROKER_PORT=%d", port), fmt.Sprintf("TOKEN_BROKER_ADMIN_PORT=%d", adminPort))

	run := startMakeRun(t, env, vars...)
	for deadline := time.Now().Add(10 * time.Minute); ; {
		select {
		case <-run.done:
			if run.cmd.ProcessState.Success() {
				t.Errorf("make run ended with success; want an error")
			}
			if out := run.out.String(); !strings.Contains(out, "the sandbox did not start on "+busy.Addr().String()) {
				t.Errorf("make run did not say that the sandbox did not start on %s; its output:\n%s", busy.Addr(), out)
			}
			return
		case <-time.After(100 * time.Millisecond):
		}
		if out := run.out.String(); strings.Contains(out, "serving initial configuration") {
			t.Fatalf("Caddy started although the sandbox could not listen on %s:\n%s", busy.Addr(), out)
		}
		if time.Now().After(deadline) {
			t.Fatalf("make run neither ended nor started Caddy within 10 minutes:\n%s", run.out.String())
		}
	}
}

// TestREADMEValidate runs the README's validate block as written, from the
// repository's root, in a shell without the variables make exports (a
// newcomer's second terminal while `make run` goes), with bin/ holding the
// binaries `make build` makes: it must succeed and say the root
// Caddyfile's registry is valid.
func TestREADMEValidate(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make is not installed (%v): the tests of `make run` and the README need it; install make", err)
	}
	caddyBin, sandboxBin := buildBinaries(t)
	bin := t.TempDir()
	for _, b := range []string{caddyBin, sandboxBin} {
		if err := os.Symlink(b, filepath.Join(bin, filepath.Base(b))); err != nil {
			t.Fatal(err)
		}
	}
	block := readmeBlock(t, filepath.Join(repoRoot(t), "README.md"), "validate")
	cmd := exec.Command("bash", "-e", "-c", strings.ReplaceAll(block, "bin/", "$BIN/"))
	cmd.Dir = repoRoot(t)
	cmd.Env = append(withoutMakeVars(os.Environ()), append(goCacheEnv(t), "BIN="+bin, "HOME="+t.TempDir())...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		t.Fatalf("the README's validate block: %v\n%s", err, out)
	}
	if !strings.Contains(string(out), "examples/sandbox/merchants.toml: valid") {
		t.Errorf("the README's validate block did not say the root registry is valid:\n%s", out)
	}
}

// TestMakeRunIgnoresTheExamplesEnvironment runs `make run` in a shell that
// followed an example's README against a real provider first: SANDBOX_URL
// exported for another sandbox (examples/fleet-redis), NUAPAY_API_KEY a
// partner's real key (examples/nuapay-tpp). make run's sidecar must still
// get its tokens from make run's own sandbox, and the key must appear on
// no process's command line.
func TestMakeRunIgnoresTheExamplesEnvironment(t *testing.T) {
	t.Parallel()
	if _, err := exec.LookPath("make"); err != nil {
		t.Fatalf("make is not installed (%v): the tests of `make run` and the README need it; install make", err)
	}
	const realKey = "partners-real-nuapay-key"
	sandboxPort, port, adminPort, consentPort := freePort(t), freePort(t), freePort(t), freePort(t)
	vars := []string{"BIN=" + t.TempDir(), "RUN_DIR=" + t.TempDir(),
		fmt.Sprintf("SANDBOX_ADDR=127.0.0.1:%d", sandboxPort), fmt.Sprintf("SANDBOX_CONSENT_ADDR=127.0.0.1:%d", consentPort)}
	env := append(goCacheEnv(t), "HOME="+t.TempDir(), "XDG_DATA_HOME=", "XDG_CONFIG_HOME=",
		fmt.Sprintf("TOKEN_BROKER_PORT=%d", port), fmt.Sprintf("TOKEN_BROKER_ADMIN_PORT=%d", adminPort),
		fmt.Sprintf("SANDBOX_URL=http://127.0.0.1:%d", freePort(t)), "NUAPAY_API_KEY="+realKey)

	run := startMakeRun(t, env, vars...)
	run.waitUp(t, fmt.Sprintf("127.0.0.1:%d", port))
	status, body := get(t, fmt.Sprintf("http://127.0.0.1:%d/tpp/payments", port), "X-Merchant-Id", "acme")
	if status != http.StatusOK {
		t.Fatalf("acme: %d %s; want 200 with a token of make run's sandbox", status, body)
	}
	procs, _ := filepath.Glob("/proc/[0-9]*/cmdline")
	for _, p := range procs {
		if b, err := os.ReadFile(p); err == nil && bytes.Contains(b, []byte(realKey)) {
			t.Errorf("the key is on a command line (%s): %q", p, bytes.ReplaceAll(b, []byte{0}, []byte{' '}))
		}
	}
}
