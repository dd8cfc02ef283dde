// Package integration runs the token broker inside a real Caddy, in this
// process or as the built binary, against the sandbox, over real HTTP on
// 127.0.0.1.
package integration

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	_ "github.com/tokenbroker/caddy-token-broker/module"
)

const (
	apiKey      = "it-partner-key-7f3c1d"
	oneIDID     = "it-oneid-client"
	oneIDSecret = "it-oneid-secret-9a8b"
)

// repoRoot is the repository's top folder.
func repoRoot(t testing.TB) string {
	_, file, _, _ := runtime.Caller(0)
	return filepath.Dir(filepath.Dir(file))
}

// parallelTests is how many of this package's parallel tests run at once
// unless -parallel says otherwise. The testing package's default, the
// number of CPUs, suits tests that compute; these mostly wait on the
// processes they start (Caddy, redis-server, prometheus, chromium, builds).
const parallelTests = 8

// TestMain runs the tests, parallelTests of the parallel ones at once
// unless -parallel is given, then removes the binaries they built (see
// builtOnce).
func TestMain(m *testing.M) {
	flag.Parse()
	given := false
	flag.Visit(func(f *flag.Flag) { given = given || f.Name == "test.parallel" })
	if !given {
		if err := flag.Set("test.parallel", strconv.Itoa(parallelTests)); err != nil {
			fmt.Fprintf(os.Stderr, "setting -test.parallel: %v\n", err)
			os.Exit(2)
		}
	}
	code := m.Run()
	removeBuilt()
	os.Exit(code)
}

// handedOut are the ports freePort returned in this test binary. Caddy
// binds with SO_REUSEPORT, so two of the tests' servers given the same port
// (the kernel hands a closed port out again) would share it silently.
var handedOut sync.Map

// freePort returns a port on 127.0.0.1 that was free a moment ago (the
// kernel's pick, port 0) and that no other caller of freePort in this test
// binary got.
func freePort(t testing.TB) int {
	t.Helper()
	for {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		port := l.Addr().(*net.TCPAddr).Port
		l.Close()
		if _, dup := handedOut.LoadOrStore(port, struct{}{}); !dup {
			return port
		}
	}
}

// startSandbox serves an in-process sandbox on 127.0.0.1 (see
// serveSandbox) and points the environment of the configs at it.
func startSandbox(t testing.TB, opts ...func(*sandbox.Config)) (*sandbox.Server, string) {
	t.Helper()
	sb, url := serveSandbox(t, opts...)
	t.Setenv("SANDBOX_URL", url)
	t.Setenv("NUAPAY_API", url)
	t.Setenv("NUAPAY_API_KEY", apiKey)
	return sb, url
}

// serveSandbox serves an in-process sandbox on 127.0.0.1 until the test
// ends and returns it and its URL; opts may change the sandbox's
// configuration first (e.g. register bank clients). It leaves the
// environment alone: a parallel test passes the URL and apiKey to the
// processes it starts.
func serveSandbox(t testing.TB, opts ...func(*sandbox.Config)) (*sandbox.Server, string) {
	t.Helper()
	cfg := sandbox.Config{
		APIKeys: []string{apiKey},
		Organisations: []sandbox.Organisation{
			{ID: "org-acme", Name: "Acme"}, {ID: "org-globex", Name: "Globex"}, {ID: "org-initech", Name: "Initech"},
		},
		OneIDClients: map[string]string{oneIDID: oneIDSecret},
	}
	for _, o := range opts {
		o(&cfg)
	}
	sb := sandbox.New(cfg)
	ts := httptest.NewServer(sb)
	t.Cleanup(ts.Close)
	return sb, ts.URL
}

// startCaddy adapts a Caddyfile and runs it in this process on a free
// port, returning the server's base URL. TOKEN_BROKER_PORT and
// TOKEN_BROKER_ADMIN_PORT are set for the Caddyfile to use.
func startCaddy(t testing.TB, caddyfile string) string {
	t.Helper()
	port := freePort(t)
	t.Setenv("TOKEN_BROKER_PORT", strconv.Itoa(port))
	t.Setenv("TOKEN_BROKER_ADMIN_PORT", strconv.Itoa(freePort(t)))
	loadCaddy(t, caddyfile)
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	base := fmt.Sprintf("http://127.0.0.1:%d", port)
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", port))
	return base
}

// loadCaddy adapts and loads (or reloads) a Caddyfile in this process,
// and returns once the servers of the config it replaced no longer listen
// (waitOldListenersClosed).
func loadCaddy(t testing.TB, caddyfile string) {
	t.Helper()
	cfg, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("adapting Caddyfile: %v", err)
	}
	for _, w := range warnings {
		t.Logf("caddyfile warning: %s", w)
	}
	if err := caddy.Load(cfg, true); err != nil {
		t.Fatalf("loading config: %v", err)
	}
	waitOldListenersClosed(t, cfg)
	// A reload stops the old servers, closing their keep-alive connections:
	// a request on one that the client still holds idle would read EOF (a
	// race that a busy machine widens). The tests' client starts afresh.
	http.DefaultClient.CloseIdleConnections()
}

// waitOldListenersClosed waits until every address the HTTP servers and
// the admin endpoint of the config cfg listen on is held by one listener
// only, the new config's. caddy.Load returns once the shutdowns of the old servers are
// scheduled, not done: on a busy machine an old server can still hold its
// own socket on the port (SO_REUSEPORT), and the kernel can hand it a new
// connection, which it serves with the old config.
func waitOldListenersClosed(t testing.TB, cfg []byte) {
	t.Helper()
	var c struct {
		Admin struct {
			Listen string `json:"listen"`
		} `json:"admin"`
		Apps struct {
			HTTP struct {
				Servers map[string]struct {
					Listen []string `json:"listen"`
				} `json:"servers"`
			} `json:"http"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(cfg, &c); err != nil {
		t.Fatalf("reading the listen addresses of the config: %v", err)
	}
	deadline := time.Now().Add(10 * time.Second)
	// The admin endpoint is started anew by every load, and the one it
	// replaces is shut down after: a call to it in between can be reset.
	if c.Admin.Listen != "" {
		na, err := caddy.ParseNetworkAddress(c.Admin.Listen)
		if err != nil {
			t.Fatalf("admin listen address %q: %v", c.Admin.Listen, err)
		}
		for caddy.ListenerUsage(na.Network, na.JoinHostPort(0)) > 1 {
			if time.Now().After(deadline) {
				t.Fatalf("a replaced admin endpoint still listens on %s 10s after the reload", c.Admin.Listen)
			}
			time.Sleep(5 * time.Millisecond)
		}
	}
	for name, srv := range c.Apps.HTTP.Servers {
		for _, l := range srv.Listen {
			na, err := caddy.ParseNetworkAddress(l)
			if err != nil {
				t.Fatalf("server %s: listen address %q: %v", name, l, err)
			}
			for off := range na.PortRangeSize() {
				addr := na.JoinHostPort(off)
				for caddy.ListenerUsage(na.Network, addr) > 1 {
					if time.Now().After(deadline) {
						t.Fatalf("server %s: a replaced server still listens on %s/%s 10s after the reload", name, na.Network, addr)
					}
					time.Sleep(5 * time.Millisecond)
				}
			}
		}
	}
}

func waitListening(t testing.TB, addr string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s is not listening: %v", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// echo is what the sandbox's echo upstream reports.
type echo struct {
	Method        string            `json:"method"`
	Path          string            `json:"path"`
	Host          string            `json:"host"`
	Headers       map[string]any    `json:"headers"`
	Authorization echoAuthorization `json:"authorization"`
	BodyBytes     int               `json:"body_bytes"`
}

type echoAuthorization struct {
	Present         bool     `json:"present"`
	Scheme          string   `json:"scheme"`
	Fingerprint     string   `json:"fingerprint"`
	IssuedBySandbox bool     `json:"issued_by_sandbox"`
	Valid           bool     `json:"valid"`
	Organisation    string   `json:"organisation"`
	Scopes          []string `json:"scopes"`
}

// get sends a GET with headers (name, value pairs) and returns status and body.
func get(t testing.TB, url string, headers ...string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	for attempt := 1; err != nil && attempt < 3 && isReloadRace(err); attempt++ {
		// A GET is idempotent: a connection refused or reset while a
		// reload swaps Caddy's listeners is tried again.
		t.Logf("GET %s: %v; trying again", url, err)
		http.DefaultClient.CloseIdleConnections()
		resp, err = http.DefaultClient.Do(req)
	}
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, body
}

// getEcho GETs through the broker and decodes the sandbox's echo.
// isReloadRace reports whether err is what a connection caught by a reload
// sees: reset, refused, or closed before an answer.
func isReloadRace(err error) bool {
	return errors.Is(err, syscall.ECONNRESET) || errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, io.EOF)
}

func getEcho(t testing.TB, url string, headers ...string) echo {
	t.Helper()
	status, body := get(t, url, headers...)
	if status != http.StatusOK {
		t.Fatalf("GET %s: %d %s", url, status, body)
	}
	var e echo
	if err := json.Unmarshal(body, &e); err != nil {
		t.Fatalf("echo body %s: %v", body, err)
	}
	return e
}

func readFile(t testing.TB, path string) string {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}
