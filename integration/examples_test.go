package integration

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"maps"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// useExample points TOKEN_BROKER_CONFIG at an example's registry and
// returns its Caddyfile.
func useExample(t *testing.T, name string) string {
	dir := filepath.Join(repoRoot(t), "examples", name)
	t.Setenv("TOKEN_BROKER_CONFIG", filepath.Join(dir, "merchants.toml"))
	return readFile(t, filepath.Join(dir, "Caddyfile"))
}

func TestExampleNuapayTPP(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, useExample(t, "nuapay-tpp"))
	tests := []struct {
		path       string
		wantScopes []string
	}{
		{"/tpp/accounts", []string{"openbanking_aisp"}},
		{"/tpp/payments", []string{"openbanking_pisp"}},
	}
	for _, tt := range tests {
		a := getEcho(t, base+tt.path, "X-Merchant-Id", "globex").Authorization
		if !a.Valid || a.Organisation != "org-globex" || !slices.Equal(a.Scopes, tt.wantScopes) {
			t.Errorf("%s: %+v", tt.path, a)
		}
	}
	if status, _ := get(t, base+"/other", "X-Merchant-Id", "globex"); status != http.StatusNotFound {
		t.Errorf("/other: %d, want 404", status)
	}
	if sb.TokenRequests() != 2 {
		t.Errorf("token requests = %d, want 2", sb.TokenRequests())
	}
}

func TestExampleNuapayEMandates(t *testing.T) {
	startSandbox(t)
	base := startCaddy(t, useExample(t, "nuapay-emandates"))
	a := getEcho(t, base+"/schemes/s1/mandates", "X-Merchant-Id", "acme").Authorization
	if !a.Valid || a.Organisation != "org-acme" || !slices.Equal(a.Scopes, []string{"admin"}) {
		t.Fatalf("authorization %+v, want an admin token for org-acme", a)
	}
}

// TestExampleNuapayWhiteLabel runs the Technical Service Provider example
// against a sandbox served with TLS as api.partnerdomain.com that demands a
// client certificate (the partner's QWAC) on every connection: the token
// request and the proxied call.
func TestExampleNuapayWhiteLabel(t *testing.T) {
	sb, _ := startSandbox(t)
	pki := newTestPKI(t, "api.partnerdomain.com")
	tlsSrv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Report to the echo what the TLS layer saw.
		r.Header.Del("X-Test-Client-Cert")
		if len(r.TLS.PeerCertificates) > 0 {
			r.Header.Set("X-Test-Client-Cert", r.TLS.PeerCertificates[0].Subject.CommonName)
		}
		sb.ServeHTTP(w, r)
	}))
	tlsSrv.TLS = &tls.Config{Certificates: []tls.Certificate{pki.server}, ClientCAs: pki.pool, ClientAuth: tls.RequireAndVerifyClientCert}
	tlsSrv.StartTLS()
	t.Cleanup(tlsSrv.Close)

	t.Setenv("PARTNER_API", tlsSrv.URL)
	t.Setenv("PARTNER_API_HOST", "api.partnerdomain.com")
	t.Setenv("QWAC_CERT", pki.clientCertFile)
	t.Setenv("QWAC_KEY", pki.clientKeyFile)
	t.Setenv("PARTNER_CA_FILE", pki.caFile)
	base := startCaddy(t, useExample(t, "nuapay-white-label"))

	e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	if !e.Authorization.Valid || e.Authorization.Organisation != "org-acme" {
		t.Fatalf("authorization %+v", e.Authorization)
	}
	if e.Host != "api.partnerdomain.com" {
		t.Errorf("upstream saw Host %q, want the white-labelled api.partnerdomain.com", e.Host)
	}
	if got := e.Headers["X-Test-Client-Cert"]; !slices.Contains(anyStrings(got), "partner-qwac") {
		t.Errorf("upstream saw client certificate %v, want partner-qwac", got)
	}
	if sb.TokenRequests() != 1 {
		t.Errorf("token requests = %d, want 1 (made over mutual TLS)", sb.TokenRequests())
	}
}

func anyStrings(v any) []string {
	switch v := v.(type) {
	case string:
		return []string{v}
	case []any:
		var out []string
		for _, s := range v {
			if s, ok := s.(string); ok {
				out = append(out, s)
			}
		}
		return out
	}
	return nil
}

// testPKI is a throwaway CA with a server certificate and a client
// certificate (standing in for an eIDAS QWAC).
type testPKI struct {
	pool                                  *x509.CertPool
	server                                tls.Certificate
	caFile, clientCertFile, clientKeyFile string
}

func newTestPKI(t *testing.T, serverName string) *testPKI {
	t.Helper()
	dir := t.TempDir()
	caKey, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IsCA: true, BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	caCert, _ := x509.ParseCertificate(caDER)
	issue := func(serial int64, cn string, usage x509.ExtKeyUsage, dns []string, ips []net.IP) ([]byte, *ecdsa.PrivateKey) {
		key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: cn},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
			ExtKeyUsage: []x509.ExtKeyUsage{usage}, DNSNames: dns, IPAddresses: ips, KeyUsage: x509.KeyUsageDigitalSignature}
		der, err := x509.CreateCertificate(rand.Reader, tmpl, caCert, &key.PublicKey, caKey)
		if err != nil {
			t.Fatal(err)
		}
		return der, key
	}
	pemFile := func(name, typ string, der []byte) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	srvDER, srvKey := issue(2, serverName, x509.ExtKeyUsageServerAuth, []string{serverName}, nil)
	cliDER, cliKey := issue(3, "partner-qwac", x509.ExtKeyUsageClientAuth, nil, nil)
	cliKeyDER, _ := x509.MarshalPKCS8PrivateKey(cliKey)
	p := &testPKI{pool: x509.NewCertPool()}
	p.pool.AddCert(caCert)
	p.server = tls.Certificate{Certificate: [][]byte{srvDER}, PrivateKey: srvKey}
	p.caFile = pemFile("ca.pem", "CERTIFICATE", caDER)
	p.clientCertFile = pemFile("qwac.pem", "CERTIFICATE", cliDER)
	p.clientKeyFile = pemFile("qwac.key", "PRIVATE KEY", cliKeyDER)
	return p
}

// readmeTestCommands returns the commands of a README's blocks marked for
// testing (a ```sh fence right after a `<!-- test -->` line), in order:
// lines ending in `\` joined, blank and comment lines dropped.
func readmeTestCommands(t *testing.T, path string) []string {
	t.Helper()
	var cmds []string
	lines := strings.Split(readFile(t, path), "\n")
	for i := 0; i < len(lines); i++ {
		if strings.TrimSpace(lines[i]) != "<!-- test -->" {
			continue
		}
		if i+1 >= len(lines) || strings.TrimSpace(lines[i+1]) != "```sh" {
			t.Fatalf("%s:%d: <!-- test --> must be followed by a ```sh block", path, i+1)
		}
		var cur string
		for i += 2; i < len(lines) && strings.TrimSpace(lines[i]) != "```"; i++ {
			line := lines[i]
			if c, ok := strings.CutSuffix(line, `\`); ok {
				cur += c
				continue
			}
			line, cur = cur+line, ""
			if s := strings.TrimSpace(line); s != "" && !strings.HasPrefix(s, "#") {
				cmds = append(cmds, s)
			}
		}
	}
	return cmds
}

// portRe matches a port: ${VAR:-1234}, $VAR or a number.
const portRe = `(?:\$\{(\w+):-(\d+)\}|\$(\w+)|(\d+))`

var (
	// namedPortRe matches the ports a command names: after 127.0.0.1:
	// or --port.
	namedPortRe = regexp.MustCompile(`(?:127\.0\.0\.1:|--port )` + portRe)
	// listenPortRe matches the ports a server listens on: after
	// -listen 127.0.0.1: or --port.
	listenPortRe = regexp.MustCompile(`(?:-listen 127\.0\.0\.1:|--port )` + portRe)
)

// commandPorts returns the ports re finds in a command, with env's values
// for its variables.
func commandPorts(re *regexp.Regexp, cmd string, env map[string]string) []string {
	var ports []string
	for _, m := range re.FindAllStringSubmatch(cmd, -1) {
		switch {
		case m[1] != "":
			if v, ok := env[m[1]]; ok && v != "" {
				ports = append(ports, v)
			} else {
				ports = append(ports, m[2])
			}
		case m[3] != "":
			ports = append(ports, env[m[3]])
		default:
			ports = append(ports, m[4])
		}
	}
	return ports
}

// readmeRun runs a README's commands as a user would from the
// repository's root, with bash: `make build` is the build of
// buildBinaries (the same commands), bin/caddy and bin/sandbox are those
// binaries, a command ending in `&` runs in the background (in a process
// group of its own, stopped by its id when the test ends), the others in
// the foreground; the environment a command exports (`export`, or any
// assignment) is kept for the next ones. env holds the port variables the
// commands read (free ports, in place of the README's defaults) and
// HOME, XDG_* and TMPDIR in the test's temporary folders. A user types
// slower than processes start: a server started in the background with
// its port on the command line (-listen, --port) is waited for, and
// before a curl command every port named so far. It returns the output of
// the foreground
// curl commands, in order.
func readmeRun(t *testing.T, cmds []string, env map[string]string, caddyBin, sandboxBin string) []string {
	t.Helper()
	root := repoRoot(t)
	binRe := regexp.MustCompile(`(^|[\s;&|(])bin/(caddy|sandbox)\b`)
	envFile := filepath.Join(t.TempDir(), "env")
	var outs, named []string
	for _, cmd := range cmds {
		if cmd == "make build" {
			continue
		}
		cmd = binRe.ReplaceAllStringFunc(cmd, func(s string) string {
			i := strings.Index(s, "bin/")
			bin := caddyBin
			if strings.HasSuffix(s, "sandbox") {
				bin = sandboxBin
			}
			return s[:i] + bin
		})
		bg, background := strings.CutSuffix(cmd, "&")
		named = append(named, commandPorts(namedPortRe, cmd, env)...)
		isCurl := strings.HasPrefix(cmd, "curl ")
		if isCurl {
			for _, p := range named {
				waitListening(t, "127.0.0.1:"+p)
			}
		}
		var environ []string
		for k, v := range env {
			environ = append(environ, k+"="+v)
		}
		if background {
			c := exec.Command("bash", "-c", "set -a\n"+bg)
			c.Dir, c.Env = root, environ
			var out bytes.Buffer
			c.Stdout, c.Stderr = &out, &out
			c.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
			if err := c.Start(); err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() { c.Wait(); close(done) }()
			t.Cleanup(func() {
				_ = syscall.Kill(-c.Process.Pid, syscall.SIGTERM)
				select {
				case <-done:
				case <-time.After(15 * time.Second):
					_ = syscall.Kill(-c.Process.Pid, syscall.SIGKILL)
					<-done
				}
				if t.Failed() {
					t.Logf("%s:\n%s", bg, out.String())
				}
			})
			for _, p := range commandPorts(listenPortRe, cmd, env) {
				waitListening(t, "127.0.0.1:"+p)
			}
			continue
		}
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
		c := exec.CommandContext(ctx, "bash", "-c", "set -a\n"+cmd+"\nrc=$?\nenv -0 > "+envFile+"\nexit $rc")
		c.Dir, c.Env = root, environ
		var stdout, stderr bytes.Buffer
		c.Stdout, c.Stderr = &stdout, &stderr
		err := c.Run()
		cancel()
		if err != nil {
			t.Fatalf("%s: %v\n%s%s", cmd, err, stdout.String(), stderr.String())
		}
		b, err := os.ReadFile(envFile)
		if err != nil {
			t.Fatal(err)
		}
		for _, kv := range strings.Split(string(b), "\x00") {
			if k, v, ok := strings.Cut(kv, "="); ok && k != "_" && k != "SHLVL" && k != "PWD" && k != "OLDPWD" && k != "rc" {
				env[k] = v
			}
		}
		if isCurl {
			outs = append(outs, stdout.String())
		}
	}
	return outs
}

// echoOf decodes the sandbox's echo in a command's output.
func echoOf(t *testing.T, out string) echo {
	t.Helper()
	var e echo
	if err := json.Unmarshal([]byte(out), &e); err != nil {
		t.Fatalf("not the sandbox's echo: %q: %v", out, err)
	}
	return e
}

// wantToken checks that an output is the sandbox's echo of a request that
// carried a valid token for org with scopes (nil: any).
func wantToken(org string, scopes ...string) func(*testing.T, string) {
	return func(t *testing.T, out string) {
		t.Helper()
		a := echoOf(t, out).Authorization
		if !a.Valid || a.Organisation != org || scopes != nil && !slices.Equal(a.Scopes, scopes) {
			t.Errorf("the sandbox saw %+v, want a valid token of %s with scopes %v", a, org, scopes)
		}
	}
}

// wantDPoPToken checks that the sandbox saw a valid DPoP-bound token of
// org with scopes, with a valid proof of its key for the request.
func wantDPoPToken(org string, scopes ...string) func(*testing.T, string) {
	return func(t *testing.T, out string) {
		t.Helper()
		wantToken(org, scopes...)(t, out)
		wantText(`"scheme":"DPoP"`, `"dpop":true`)(t, out)
	}
}

// wantText checks that an output holds every one of subs.
func wantText(subs ...string) func(*testing.T, string) {
	return func(t *testing.T, out string) {
		t.Helper()
		for _, s := range subs {
			if !strings.Contains(out, s) {
				t.Errorf("output %q does not hold %q", out, s)
			}
		}
	}
}

// TestExampleREADMEs runs the commands of every example's README, as
// written, against the sandbox (with free ports in the variables the
// commands read), and checks what each foreground command printed. The
// sandbox example is `make run` itself: TestMakeRunDefault runs it.
func TestExampleREADMEs(t *testing.T) {
	t.Parallel()
	caddyBin, sandboxBin := buildBinaries(t)
	ports := []string{"TOKEN_BROKER_PORT", "TOKEN_BROKER_ADMIN_PORT", "SANDBOX_PORT"}
	tests := []struct {
		example string
		ports   []string // more port variables the commands read
		checks  []func(*testing.T, string)
		after   func(t *testing.T, outs []string)
	}{
		{example: "nuapay-tpp", checks: []func(*testing.T, string){
			wantToken("org-globex", "openbanking_aisp"), wantToken("org-acme", "openbanking_pisp")}},
		{example: "nuapay-emandates", checks: []func(*testing.T, string){wantToken("org-acme", "admin")}},
		{example: "oneid", checks: []func(*testing.T, string){wantToken("sandbox-oneid-client"), wantToken("sandbox-oneid-client")},
			after: func(t *testing.T, outs []string) {
				if a, b := echoOf(t, outs[0]).Authorization.Fingerprint, echoOf(t, outs[1]).Authorization.Fingerprint; a != b {
					t.Errorf("two tokens (%s, %s), want one for both calls", a, b)
				}
			}},
		{example: "tracing-otlp", checks: []func(*testing.T, string){func(t *testing.T, out string) {
			wantToken("org-acme", "openbanking_pisp")(t, out)
			wantText(`"Traceparent"`)(t, out)
		}}},
		{example: "bank-oauth2", checks: []func(*testing.T, string){
			wantToken("sandbox-bank-client", "accounts"), wantToken("sandbox-bank-client", "payments")}},
		{example: "nuapay-white-label", ports: []string{"FRONT_PORT", "FRONT_ADMIN_PORT"}, checks: []func(*testing.T, string){
			func(t *testing.T, out string) {
				wantToken("org-acme", "openbanking_aisp", "openbanking_pisp")(t, out)
				if h := echoOf(t, out).Host; h != "api.partnerdomain.com" {
					t.Errorf("upstream saw Host %q, want api.partnerdomain.com", h)
				}
			}}},
		{example: "fleet-redis", ports: []string{"REDIS_PORT", "FLEET_PORT_1", "FLEET_PORT_2", "FLEET_ADMIN_1", "FLEET_ADMIN_2"},
			checks: []func(*testing.T, string){wantToken("org-acme", "openbanking_pisp"), wantToken("org-acme", "openbanking_pisp")},
			after: func(t *testing.T, outs []string) {
				if a, b := echoOf(t, outs[0]).Authorization.Fingerprint, echoOf(t, outs[1]).Authorization.Fingerprint; a != b {
					t.Errorf("the sidecars used tokens %s and %s, want the one shared through Redis", a, b)
				}
			}},
		{example: "bank-dpop", checks: []func(*testing.T, string){
			wantDPoPToken("sandbox-bank-client", "accounts"), wantDPoPToken("sandbox-bank-client", "accounts")}},
		{example: "bank-consent", ports: []string{"CONSENT_PORT"}, checks: []func(*testing.T, string){
			wantText(`"error":"consent_required"`),
			wantText("Back in the example app", "Consent of merchant acme: outcome ok."),
			wantToken("sandbox-bank-client", "accounts"),
			wantText(`"merchant":"acme"`, `"has_refresh_token":true`)}},
	}
	seen := map[string]bool{"sandbox": true}
	for _, tt := range tests {
		seen[tt.example] = true
		t.Run(tt.example, func(t *testing.T) {
			if tt.example == "fleet-redis" {
				if _, err := exec.LookPath("redis-server"); err != nil {
					t.Fatal("redis-server is needed (make tools installs it)")
				}
			}
			cmds := readmeTestCommands(t, filepath.Join(repoRoot(t), "examples", tt.example, "README.md"))
			tmp := t.TempDir()
			env := map[string]string{"PATH": os.Getenv("PATH"), "HOME": tmp, "XDG_DATA_HOME": filepath.Join(tmp, "data"),
				"XDG_CONFIG_HOME": filepath.Join(tmp, "config"), "TMPDIR": tmp}
			for _, v := range append(slices.Clone(ports), tt.ports...) {
				env[v] = strconv.Itoa(freePort(t))
			}
			outs := readmeRun(t, cmds, env, caddyBin, sandboxBin)
			if len(outs) != len(tt.checks) {
				t.Fatalf("%d curl commands, want %d (update this test with the README): %q", len(outs), len(tt.checks), outs)
			}
			for i, check := range tt.checks {
				if check != nil {
					check(t, outs[i])
				}
			}
			if tt.after != nil && !t.Failed() {
				tt.after(t, outs)
			}
		})
	}
	dirs, err := os.ReadDir(filepath.Join(repoRoot(t), "examples"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if d.IsDir() && !seen[d.Name()] {
			t.Errorf("examples/%s: its README's commands are not run by TestExampleREADMEs", d.Name())
		}
	}
}

// portMentionRe finds the ports a file names: a Caddyfile's
// {$VAR:1234} default, a shell ${VAR:-1234} default, a loopback
// address's port, redis-server's --port.
var portMentionRe = regexp.MustCompile(`\{\$\w+:(\d{2,5})\}|\$\{\w+:-(\d{2,5})\}|(?:127\.0\.0\.1|localhost):(\d{2,5})\b|--port (\d{2,5})\b`)

// adminRe finds the admin address of a Caddyfile's global options.
var adminRe = regexp.MustCompile(`(?m)^\s*admin\s+\S*:(?:\{\$\w+:(\d{2,5})\}|(\d{2,5}))\s*$`)

// TestExamplePortsDistinct: no two examples, and no example and `make run`
// (the root Caddyfile, the Makefile and the sandbox example), name the same
// port, in their Caddyfiles, READMEs or registries: Caddy listens with
// SO_REUSEPORT, so two of them started together would share a port
// silently and answer each other's requests. Every example's Caddyfile
// sets an admin address of its own.
func TestExamplePortsDistinct(t *testing.T) {
	root := repoRoot(t)
	groups := map[string][]string{"make run": {
		filepath.Join(root, "Caddyfile"), filepath.Join(root, "Makefile"), filepath.Join(root, "examples", "sandbox", "README.md"),
	}}
	dirs, err := os.ReadDir(filepath.Join(root, "examples"))
	if err != nil {
		t.Fatal(err)
	}
	for _, d := range dirs {
		if !d.IsDir() || d.Name() == "sandbox" {
			continue
		}
		files, _ := filepath.Glob(filepath.Join(root, "examples", d.Name(), "*"))
		groups["examples/"+d.Name()] = files
		caddyfiles, _ := filepath.Glob(filepath.Join(root, "examples", d.Name(), "*Caddyfile"))
		if len(caddyfiles) == 0 {
			t.Errorf("examples/%s has no Caddyfile", d.Name())
		}
		for _, f := range caddyfiles {
			if m := adminRe.FindStringSubmatch(readFile(t, f)); m == nil || m[1]+m[2] == "2019" {
				t.Errorf("%s: set `admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT:<a port of its own>}` in the global options (Caddy's default, 2019, is make run's)", f)
			}
		}
	}
	owner := map[string]string{} // port -> group
	for _, g := range slices.Sorted(maps.Keys(groups)) {
		ports := map[string]bool{}
		for _, f := range groups[g] {
			for _, m := range portMentionRe.FindAllStringSubmatch(readFile(t, f), -1) {
				ports[m[1]+m[2]+m[3]+m[4]] = true
			}
		}
		if len(ports) == 0 {
			t.Errorf("%s names no port", g)
		}
		for p := range ports {
			if o, ok := owner[p]; ok {
				t.Errorf("port %s is named by %s and by %s: give each its own", p, o, g)
			}
			owner[p] = g
		}
	}
}
