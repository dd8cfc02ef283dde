package integration

import (
	"bufio"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// seen is what the recording upstream saw of one request.
type seen struct {
	Authorization []string    `json:"authorization"`
	Proxy         []string    `json:"proxy_authorization"`
	Trailers      http.Header `json:"trailers"`
	Body          string      `json:"body"`
}

// recordingUpstream is a real upstream on 127.0.0.1 that records the
// credential headers and the trailers of each request, and answers 401
// `Bearer error="invalid_token"` to a request that carries no credential,
// as a resource server does.
type recordingUpstream struct {
	mu   sync.Mutex
	reqs []seen
	url  string
}

func startRecordingUpstream(t *testing.T) *recordingUpstream {
	t.Helper()
	u := &recordingUpstream{}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body) // the trailers are in r.Trailer once the body ended
		s := seen{Authorization: r.Header.Values("Authorization"), Proxy: r.Header.Values("Proxy-Authorization"),
			Trailers: r.Trailer.Clone(), Body: string(body)}
		u.mu.Lock()
		u.reqs = append(u.reqs, s)
		u.mu.Unlock()
		if len(s.Authorization) != 1 || !strings.HasPrefix(s.Authorization[0], "Bearer ") {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			w.WriteHeader(http.StatusUnauthorized)
		}
		// Never the credentials themselves: test output must not show a token.
		json.NewEncoder(w).Encode(map[string]any{"authorization_values": len(s.Authorization), "trailers": len(s.Trailers)})
	}))
	t.Cleanup(ts.Close)
	u.url = ts.URL
	return u
}

func (u *recordingUpstream) requests() []seen {
	u.mu.Lock()
	defer u.mu.Unlock()
	return append([]seen(nil), u.reqs...)
}

// headersCaddyfile is one token_broker route to the recording upstream,
// for the sandbox merchants (acme at the sandbox's Nuapay Gatekeeper).
func headersCaddyfile(t *testing.T, upstream, handlerBlock string) string {
	sandboxRegistryEnv(t)
	t.Setenv("UPSTREAM_URL", upstream)
	return `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
	}
	persist_config off
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker` + handlerBlock + `
	reverse_proxy {$UPSTREAM_URL}
}
`
}

// rawRequest writes a request as given on a new connection and reads the
// answer: the client library cannot send everything a caller can.
func rawRequest(t *testing.T, base, request string) (*http.Response, string) {
	t.Helper()
	conn, err := net.DialTimeout("tcp", strings.TrimPrefix(base, "http://"), 10*time.Second)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(60 * time.Second))
	if _, err := io.WriteString(conn, request); err != nil {
		t.Fatal(err)
	}
	resp, err := http.ReadResponse(bufio.NewReader(conn), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp, string(body)
}

// TestCallerCannotStripTheToken (issue 8, defect 1): a Connection option
// naming the token header would make reverse_proxy drop the injected token
// as hop-by-hop; the upstream's 401 would purge it and each request would
// cost a token request. Whatever the caller's Connection header says, the
// upstream gets the token and the token API is called once.
func TestCallerCannotStripTheToken(t *testing.T) {
	sb, _ := startSandbox(t)
	up := startRecordingUpstream(t)
	base := startCaddy(t, headersCaddyfile(t, up.url, ""))
	for _, connection := range []string{"Authorization", "keep-alive, authorization", "X-Merchant-Id, Proxy-Authorization", "Upgrade-Insecure, AUTHORIZATION "} {
		for range 5 {
			resp, body := rawRequest(t, base, "GET /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\n"+
				"Authorization: Bearer caller-chosen\r\nConnection: "+connection+"\r\n\r\n")
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("Connection: %s: status %d %s, want 200 with the broker's token at the upstream", connection, resp.StatusCode, body)
			}
		}
	}
	for i, s := range up.requests() {
		if len(s.Authorization) != 1 || s.Authorization[0] == "Bearer caller-chosen" {
			t.Fatalf("request %d reached the upstream with %d Authorization values, not the broker's token alone", i, len(s.Authorization))
		}
	}
	if got := sb.TokenRequests(); got != 1 {
		t.Fatalf("token requests = %d, want 1", got)
	}
}

// TestTrailersNamingOwnedHeadersNeverReachUpstream (issue 8, defect 2): a
// declared trailer naming the token, merchant or a credential header is
// refused with 400 before any token request; an undeclared one is dropped;
// other trailers still pass.
func TestTrailersNamingOwnedHeadersNeverReachUpstream(t *testing.T) {
	sb, _ := startSandbox(t)
	up := startRecordingUpstream(t)
	base := startCaddy(t, headersCaddyfile(t, up.url, ""))
	chunked := func(declared string, trailers ...string) string {
		return "POST /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nTransfer-Encoding: chunked\r\n" +
			"Trailer: " + declared + "\r\n\r\n7\r\npayload\r\n0\r\n" + strings.Join(trailers, "") + "\r\n"
	}

	for _, tt := range []struct{ declared, trailer string }{
		{"Authorization", "Authorization: Bearer x\r\n"},
		{"Proxy-Authorization", "Proxy-Authorization: Basic eDp5\r\n"},
		{"X-Checksum, x-merchant-id", "X-Checksum: abc\r\nX-Merchant-Id: globex\r\n"},
	} {
		resp, body := rawRequest(t, base, chunked(tt.declared, tt.trailer))
		if resp.StatusCode != http.StatusBadRequest || !strings.Contains(body, "forbidden_trailer") {
			t.Errorf("Trailer: %s: status %d %s, want 400 forbidden_trailer", tt.declared, resp.StatusCode, body)
		}
	}
	if n := len(up.requests()); n != 0 || sb.TokenRequests() != 0 {
		t.Fatalf("refused requests: %d reached the upstream, %d token requests; want none", n, sb.TokenRequests())
	}

	// Declared harmless, but the caller sends an owned one too.
	resp, body := rawRequest(t, base, chunked("X-Checksum", "X-Checksum: abc\r\nAuthorization: Bearer x\r\nX-Merchant-Id: globex\r\n"))
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("undeclared trailer: status %d %s, want 200", resp.StatusCode, body)
	}
	reqs := up.requests()
	if len(reqs) != 1 {
		t.Fatalf("%d requests at the upstream, want 1", len(reqs))
	}
	got := reqs[0]
	if got.Body != "payload" || got.Trailers.Get("X-Checksum") != "abc" {
		t.Fatalf("upstream got body %q, trailers %v: want the payload and X-Checksum", got.Body, got.Trailers)
	}
	for name := range got.Trailers {
		if name != "X-Checksum" {
			t.Errorf("trailer %s reached the upstream", name)
		}
	}
	if len(got.Authorization) != 1 || got.Authorization[0] == "Bearer x" {
		t.Errorf("Authorization at the upstream: %d values or the caller's, want the broker's token", len(got.Authorization))
	}
}

// TestProxyAuthorizationHeaderRefused (issue 8, defect 4): reverse_proxy
// removes Proxy-Authorization (hop-by-hop), so `header Proxy-Authorization`
// would send no credential upstream. It is refused when the config is
// loaded, from a Caddyfile (with the file and line) and from JSON.
func TestProxyAuthorizationHeaderRefused(t *testing.T) {
	sb, _ := startSandbox(t)
	up := startRecordingUpstream(t)
	port := freePort(t)
	t.Setenv("TOKEN_BROKER_PORT", fmt.Sprint(port))
	t.Setenv("TOKEN_BROKER_ADMIN_PORT", fmt.Sprint(freePort(t)))
	adapt := func(cf string) ([]byte, error) {
		cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
		return cfg, err
	}
	// load loads cfg; if it runs, it reports what a request got upstream.
	load := func(cfg []byte) error {
		err := caddy.Load(cfg, true)
		if err != nil {
			return err
		}
		defer caddy.Stop()
		base := fmt.Sprintf("http://127.0.0.1:%d", port)
		waitListening(t, strings.TrimPrefix(base, "http://"))
		status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
		var creds []int
		for _, s := range up.requests() {
			creds = append(creds, len(s.Authorization)+len(s.Proxy))
		}
		return fmt.Errorf("the config was accepted; a request got %d %s; credentials at the upstream per request: %v", status, body, creds)
	}

	_, err := adapt(headersCaddyfile(t, up.url, " {\n\t\theader Proxy-Authorization\n\t}"))
	if err == nil || !strings.Contains(err.Error(), "reverse_proxy removes Proxy-Authorization") || !strings.Contains(err.Error(), "Caddyfile:12") {
		if err == nil {
			cfg, _ := adapt(headersCaddyfile(t, up.url, " {\n\t\theader Proxy-Authorization\n\t}"))
			err = load(cfg)
		}
		t.Errorf("Caddyfile header Proxy-Authorization: %v; want an error at Caddyfile:12 saying reverse_proxy removes it", err)
	}

	cfg, err := adapt(headersCaddyfile(t, up.url, " {\n\t\theader Authorization\n\t}"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(cfg), `"header":"Authorization"`) {
		t.Fatalf("adapted config %s has no header field", cfg)
	}
	cfg = []byte(strings.Replace(string(cfg), `"header":"Authorization"`, `"header":"Proxy-Authorization"`, 1))
	if err := load(cfg); err == nil || !strings.Contains(err.Error(), "reverse_proxy removes Proxy-Authorization") {
		t.Errorf("JSON header Proxy-Authorization: %v; want a load error saying reverse_proxy removes it", err)
	}
	if sb.TokenRequests() != 0 {
		t.Errorf("token requests = %d, want 0", sb.TokenRequests())
	}
}
