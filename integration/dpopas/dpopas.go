// Package dpopas starts a real DPoP authorization server for tests: panva's
// oidc-provider (server.js beside this file, run by Node.js) with DPoP
// (RFC 9449, server nonces on demand), client credentials, the
// authorization code flow with pushed authorization requests (RFC 9126) and
// dpop_jkt, refresh tokens, and JWT access tokens that carry the proof key's
// thumbprint in cnf.jkt, signed with keys the server makes at start and
// serves at its jwks_uri.
//
// Start installs the server's npm packages once (npm ci, when the marker
// file in node_modules does not hold the SHA-256 of package-lock.json:
// never installed, or the lock file changed since), runs it on a port
// 127.0.0.1 chooses and stops it by its process id when the test ends.
// Without Node.js the test fails: `make tools` installs it.
//
// package-lock.json pins oidc-provider 8.8.1, the newest release line that
// supports Node.js 18 and 20 (Debian's and this project's machines); the 9
// line asks for Node.js 22. To change it: `npm install --save-exact
// oidc-provider@VERSION` in this folder; its .npmrc keeps download
// addresses out of package-lock.json.
package dpopas

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
)

// Defaults of Options.
const (
	// DefaultResource is the resource indicator (and the aud) of the access
	// tokens when Options.Resource is empty.
	DefaultResource = "urn:dpopas:resource"
	// DefaultScopes are the resource's scopes when Options.Scopes is empty.
	DefaultScopes = "accounts payments"
	// DefaultAccessTokenTTL is the access token lifetime when
	// Options.AccessTokenTTL is zero.
	DefaultAccessTokenTTL = 10 * time.Minute
)

// Subject is the account Approve signs in as: the sub of the access tokens
// of the authorization code flow.
const Subject = "dpopas-user"

// startTimeout bounds the server's start, from the process start to its
// ready line (key generation included).
const startTimeout = 30 * time.Second

// Options configure the authorization server.
type Options struct {
	// Clients are the registered clients; at least one.
	Clients []Client
	// Resource is the resource indicator every access token is issued for
	// (its aud); requests without a resource parameter get it. Default
	// DefaultResource.
	Resource string
	// Scopes are the resource's scopes, space separated; other requested
	// scopes are dropped. Default DefaultScopes.
	Scopes string
	// AccessTokenTTL is the access tokens' lifetime, in whole seconds.
	// Default DefaultAccessTokenTTL.
	AccessTokenTTL time.Duration
	// RequireNonce makes the server demand its DPoP-Nonce in every proof
	// (at the token and PAR endpoints): a proof without it gets a 400
	// use_dpop_nonce answer with a DPoP-Nonce header.
	RequireNonce bool
}

// Client is one registered client, in oidc-provider's client metadata
// (OpenID Connect Dynamic Client Registration names).
type Client struct {
	// ID is the client_id.
	ID string `json:"client_id"`
	// Secret is the client_secret of client_secret_basic and
	// client_secret_post clients.
	Secret string `json:"client_secret,omitempty"`
	// AuthMethod is the token_endpoint_auth_method: client_secret_basic
	// (the default), client_secret_post, private_key_jwt (with JWKS) or
	// none (a public client).
	AuthMethod string `json:"token_endpoint_auth_method"`
	// JWKS holds the public keys of a private_key_jwt client's assertions.
	JWKS *jose.JSONWebKeySet `json:"jwks,omitempty"`
	// GrantTypes default to client_credentials without RedirectURIs, and
	// to authorization_code and refresh_token with them.
	GrantTypes []string `json:"grant_types"`
	// RedirectURIs are the client's registered redirect URIs (the code
	// flow's callback).
	RedirectURIs []string `json:"redirect_uris"`
	// ResponseTypes default to code for a client with the
	// authorization_code grant.
	ResponseTypes []string `json:"response_types"`
	// RequirePAR makes the client's authorization requests valid only
	// through the pushed authorization request endpoint.
	RequirePAR bool `json:"require_pushed_authorization_requests,omitempty"`
	// AllowBearer lets the client get bearer tokens (a token request
	// without a DPoP proof); by default every token request of the client
	// must carry a proof.
	AllowBearer bool `json:"-"`
}

// wireClient is a Client as server.js reads it.
type wireClient struct {
	Client
	DPoPBound bool `json:"dpop_bound_access_tokens"`
}

// withDefaults returns c with its defaults filled in.
func (c Client) withDefaults() Client {
	if c.AuthMethod == "" {
		c.AuthMethod = "client_secret_basic"
	}
	if c.GrantTypes == nil {
		if len(c.RedirectURIs) == 0 {
			c.GrantTypes = []string{"client_credentials"}
		} else {
			c.GrantTypes = []string{"authorization_code", "refresh_token"}
		}
	}
	if c.RedirectURIs == nil {
		c.RedirectURIs = []string{}
	}
	if c.ResponseTypes == nil {
		c.ResponseTypes = []string{}
		for _, g := range c.GrantTypes {
			if g == "authorization_code" {
				c.ResponseTypes = []string{"code"}
			}
		}
	}
	return c
}

// Server is a running authorization server.
type Server struct {
	// Issuer is the server's issuer identifier, http://127.0.0.1:port.
	Issuer string
	// TokenURL is the token endpoint.
	TokenURL string
	// AuthURL is the authorization endpoint.
	AuthURL string
	// PARURL is the pushed authorization request endpoint.
	PARURL string
	// JWKSURL serves the public keys that sign the access tokens.
	JWKSURL string
	// RevocationURL is the token revocation endpoint.
	RevocationURL string
	// Resource is the access tokens' aud (Options.Resource or its default).
	Resource string
	// Clients are the registered clients with their defaults filled in.
	Clients []Client

	cmd    *exec.Cmd
	stdin  io.Closer
	exit   chan struct{}
	stderr *syncBuffer
}

// ready is the line server.js prints once it serves.
type ready struct {
	Issuer        string `json:"issuer"`
	TokenURL      string `json:"token_endpoint"`
	AuthURL       string `json:"authorization_endpoint"`
	PARURL        string `json:"pushed_authorization_request_endpoint"`
	JWKSURL       string `json:"jwks_uri"`
	RevocationURL string `json:"revocation_endpoint"`
}

// wireConfig is the configuration file server.js reads.
type wireConfig struct {
	Clients        []wireClient `json:"clients"`
	Resource       string       `json:"resource"`
	Scopes         string       `json:"scopes"`
	AccessTokenTTL int64        `json:"access_token_ttl"`
	RequireNonce   bool         `json:"require_nonce"`
}

// Start runs the authorization server and stops it when the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	if len(opts.Clients) == 0 {
		t.Fatal("dpopas.Start: Options.Clients is empty: register at least one client")
	}
	node, err := exec.LookPath("node")
	if err != nil {
		t.Fatalf("node is not installed: run make tools (apt-get install -y nodejs npm): %v", err)
	}
	dir := packageDir(t)
	if err := install(dir); err != nil {
		t.Fatalf("installing the DPoP authorization server's npm packages in %s: %v (make tools runs npm ci there)", dir, err)
	}

	cfg := wireConfig{
		Resource:       opts.Resource,
		Scopes:         opts.Scopes,
		AccessTokenTTL: int64(opts.AccessTokenTTL / time.Second),
		RequireNonce:   opts.RequireNonce,
	}
	if cfg.Resource == "" {
		cfg.Resource = DefaultResource
	}
	if cfg.Scopes == "" {
		cfg.Scopes = DefaultScopes
	}
	if cfg.AccessTokenTTL <= 0 {
		cfg.AccessTokenTTL = int64(DefaultAccessTokenTTL / time.Second)
	}
	s := &Server{Resource: cfg.Resource, exit: make(chan struct{}), stderr: &syncBuffer{}}
	for _, c := range opts.Clients {
		c = c.withDefaults()
		s.Clients = append(s.Clients, c)
		cfg.Clients = append(cfg.Clients, wireClient{Client: c, DPoPBound: !c.AllowBearer})
	}
	raw, err := json.Marshal(cfg)
	if err != nil {
		t.Fatalf("dpopas.Start: encoding the configuration: %v", err)
	}
	cfgFile := filepath.Join(t.TempDir(), "dpopas.json")
	if err := os.WriteFile(cfgFile, raw, 0o600); err != nil {
		t.Fatal(err)
	}

	cmd := exec.Command(node, filepath.Join(dir, "server.js"), cfgFile)
	cmd.Dir = dir
	cmd.Stderr = s.stderr
	stdout, stdoutW, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stdout = stdoutW
	// The server exits when its standard input closes: when this process
	// ends without stopping it.
	stdin, err := cmd.StdinPipe()
	if err != nil {
		t.Fatal(err)
	}
	err = cmd.Start()
	stdoutW.Close()
	if err != nil {
		stdout.Close()
		t.Fatalf("starting %s server.js: %v", node, err)
	}
	s.cmd, s.stdin = cmd, stdin
	go func() { _ = cmd.Wait(); close(s.exit) }()
	t.Cleanup(func() {
		s.stop()
		if t.Failed() { // a failed start, or a test to debug
			t.Logf("DPoP authorization server's log:\n%s", s.stderr.String())
		}
	})

	lines := make(chan string, 1)
	go func() {
		defer stdout.Close()
		r := bufio.NewReader(stdout)
		line, _ := r.ReadString('\n')
		lines <- line
		_, _ = io.Copy(io.Discard, r)
	}()
	var line string
	select {
	case line = <-lines:
	case <-time.After(startTimeout):
		t.Fatalf("the DPoP authorization server did not start within %s (its log follows)", startTimeout)
	}
	var r ready
	if err := json.Unmarshal([]byte(line), &r); err != nil || r.Issuer == "" {
		if line == "" { // its standard output closed: wait for its last words
			select {
			case <-s.exit:
			case <-time.After(5 * time.Second):
			}
		}
		t.Fatalf("the DPoP authorization server did not start (ready line %q: %v; its log follows)", line, err)
	}
	s.Issuer, s.TokenURL, s.AuthURL, s.PARURL = r.Issuer, r.TokenURL, r.AuthURL, r.PARURL
	s.JWKSURL, s.RevocationURL = r.JWKSURL, r.RevocationURL
	return s
}

// stop ends the server by its process id: SIGTERM, then SIGKILL if it has
// not exited within 5 s.
func (s *Server) stop() {
	_ = s.stdin.Close()
	_ = s.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-s.exit:
	case <-time.After(5 * time.Second):
		_ = s.cmd.Process.Kill()
		<-s.exit
	}
}

// packageDir is the folder of this package: server.js, package.json and
// node_modules.
func packageDir(t testing.TB) string {
	t.Helper()
	_, file, _, ok := runtime.Caller(0)
	if !ok {
		t.Fatal("dpopas: cannot find the package's folder (runtime.Caller)")
	}
	return filepath.Dir(file)
}

// installedMarker, in node_modules, holds the SHA-256 of the
// package-lock.json that npm ci installed last.
const installedMarker = ".dpopas-installed"

// install runs npm ci in dir unless node_modules holds what
// package-lock.json pins. A lock on a file in dir serialises the tests of
// every process: one installs, the others wait and find it installed.
func install(dir string) error {
	lock, err := os.ReadFile(filepath.Join(dir, "package-lock.json"))
	if err != nil {
		return err
	}
	sum := sha256.Sum256(lock)
	want := hex.EncodeToString(sum[:])
	marker := filepath.Join(dir, "node_modules", installedMarker)
	if got, err := os.ReadFile(marker); err == nil && string(got) == want {
		return nil
	}

	f, err := os.OpenFile(filepath.Join(dir, "node_modules.lock"), os.O_CREATE|os.O_RDWR, 0o644)
	if err != nil {
		return err
	}
	defer f.Close()
	if err := syscall.Flock(int(f.Fd()), syscall.LOCK_EX); err != nil {
		return fmt.Errorf("locking %s: %w", f.Name(), err)
	}
	defer func() { _ = syscall.Flock(int(f.Fd()), syscall.LOCK_UN) }()
	if got, err := os.ReadFile(marker); err == nil && string(got) == want {
		return nil // another test installed it meanwhile
	}

	npm, err := exec.LookPath("npm")
	if err != nil {
		return errors.New("npm is not installed: run make tools (apt-get install -y nodejs npm)")
	}
	cmd := exec.Command(npm, "ci", "--prefer-offline", "--no-audit", "--no-fund")
	cmd.Dir = dir
	if out, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("npm ci: %v\n%s", err, bytes.TrimSpace(out))
	}
	return os.WriteFile(marker, []byte(want), 0o644)
}

// syncBuffer is a bytes.Buffer safe for a writer and readers in other
// goroutines.
type syncBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *syncBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

// String returns what was written so far.
func (b *syncBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return strings.TrimSpace(b.buf.String())
}
