package integration

import (
	"bufio"
	"encoding/json"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"testing"
	"time"
)

// edgeSeen is what the edge upstream saw of one request.
type edgeSeen struct {
	method, host, uri, body string
	authorization, proxy    []string
	merchant                []string
	trailers                http.Header
}

// edgeUpstream is a real upstream on 127.0.0.1 that records every request
// it gets, answers 401 `Bearer error="invalid_token"` to a request whose
// Authorization was revoked (revoke), and accepts a websocket upgrade
// (101), then echoes the tunnel's bytes.
type edgeUpstream struct {
	mu      sync.Mutex
	reqs    []edgeSeen
	revoked map[string]bool
	url     string
}

func startEdgeUpstream(t *testing.T) *edgeUpstream {
	t.Helper()
	u := &edgeUpstream{revoked: map[string]bool{}}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		body, _ := io.ReadAll(r.Body)
		s := edgeSeen{method: r.Method, host: r.Host, uri: r.RequestURI, body: string(body),
			authorization: r.Header.Values("Authorization"), proxy: r.Header.Values("Proxy-Authorization"),
			merchant: r.Header.Values("X-Merchant-Id"), trailers: r.Trailer.Clone()}
		u.mu.Lock()
		u.reqs = append(u.reqs, s)
		revoked := len(s.authorization) == 1 && u.revoked[s.authorization[0]]
		u.mu.Unlock()
		if revoked {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		if strings.EqualFold(r.Header.Get("Upgrade"), "websocket") {
			conn, brw, err := http.NewResponseController(w).Hijack()
			if err != nil {
				return
			}
			defer conn.Close()
			brw.WriteString("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n")
			brw.Flush()
			conn.SetDeadline(time.Now().Add(10 * time.Second))
			line, _ := brw.ReadString('\n')
			io.WriteString(conn, "echo "+line)
			return
		}
		io.WriteString(w, "ok")
	}))
	t.Cleanup(ts.Close)
	u.url = ts.URL
	return u
}

// take returns the requests seen since the last call and forgets them.
func (u *edgeUpstream) take() []edgeSeen {
	u.mu.Lock()
	defer u.mu.Unlock()
	r := u.reqs
	u.reqs = nil
	return r
}

// revoke makes the upstream answer 401 invalid_token to the Authorization
// value v.
func (u *edgeUpstream) revoke(v string) {
	u.mu.Lock()
	defer u.mu.Unlock()
	u.revoked[v] = true
}

// errorCode is the "error" field of a JSON error body; "" when none.
func errorCode(body string) string {
	var e struct {
		Error string `json:"error"`
	}
	_ = json.Unmarshal([]byte(body), &e)
	return e.Error
}

// TestRequestEdge sends, over raw TCP, what a caller can write at the
// sidecar's request edge: for each request, the caller's status and error
// code, what the upstream got (exactly the broker's Authorization, never
// the caller's credentials or merchant header) and how many token
// requests it cost. The broker's token must not appear in any answer.
func TestRequestEdge(t *testing.T) {
	sb, _ := startSandbox(t)
	up := startEdgeUpstream(t)
	base := startCaddy(t, headersCaddyfile(t, up.url, ""))
	addr := strings.TrimPrefix(base, "http://")

	// The first request fetches the token; every later one reuses it.
	resp, body := rawRequest(t, base, "GET /warm HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\n\r\n")
	warm := up.take()
	if resp.StatusCode != http.StatusOK || len(warm) != 1 || len(warm[0].authorization) != 1 {
		t.Fatalf("warm-up: status %d %s, %d requests upstream", resp.StatusCode, body, len(warm))
	}
	token := warm[0].authorization[0]
	secret := strings.TrimPrefix(token, "Bearer ")

	const req = "GET /tpp/payments HTTP/1.1\r\nHost: localhost\r\n"
	for _, tt := range []struct {
		name    string
		request string
		status  int
		code    string // the JSON error code; "" for an answer of the upstream or of Go's server
		reached int    // requests at the upstream
		uri     string // the request-URI the upstream got, when it got one ("" is not checked)
	}{
		{"Connection names the merchant header", req + "X-Merchant-Id: acme\r\nConnection: X-Merchant-Id, Authorization\r\n\r\n", 200, "", 1, ""},
		{"two Connection fields", req + "X-Merchant-Id: acme\r\nConnection: keep-alive\r\nConnection: dpop, authorization\r\n\r\n", 200, "", 1, ""},
		{"caller Authorization in other case, twice, and Proxy-Authorization", req + "X-Merchant-Id: acme\r\nauthorization: Bearer mine\r\nAUTHORIZATION: Basic eDp5\r\n" +
			"Proxy-Authorization: Basic eDp5\r\nDPoP: x.y.z\r\n\r\n", 200, "", 1, ""},
		{"merchant header name in lower case", req + "x-merchant-id: acme\r\n\r\n", 200, "", 1, ""},
		{"merchant value with white space around", req + "X-Merchant-Id:  acme \t\r\n\r\n", 200, "", 1, ""},
		{"two merchant headers", req + "X-Merchant-Id: acme\r\nX-Merchant-Id: globex\r\n\r\n", 400, "ambiguous_merchant", 0, ""},
		{"two merchant headers, same value", req + "X-Merchant-Id: acme\r\nx-merchant-id: acme\r\n\r\n", 400, "ambiguous_merchant", 0, ""},
		{"merchant with a comma", req + "X-Merchant-Id: acme,globex\r\n\r\n", 400, "invalid_merchant", 0, ""},
		{"merchant with a space inside", req + "X-Merchant-Id: acme globex\r\n\r\n", 400, "invalid_merchant", 0, ""},
		{"merchant not ASCII", req + "X-Merchant-Id: acm\u00e9\r\n\r\n", 400, "invalid_merchant", 0, ""},
		{"merchant 8 KiB long", req + "X-Merchant-Id: " + strings.Repeat("a", 8<<10) + "\r\n\r\n", 400, "invalid_merchant", 0, ""},
		{"merchant empty", req + "X-Merchant-Id: \r\n\r\n", 400, "missing_merchant", 0, ""},
		{"unknown merchant", req + "X-Merchant-Id: nobody-known\r\n\r\n", 403, "unknown_merchant", 0, ""},
		{"unknown merchant in other case", req + "X-Merchant-Id: ACME\r\n\r\n", 403, "unknown_merchant", 0, ""},
		{"HTTP/1.0 without Host", "GET /tpp/payments HTTP/1.0\r\nX-Merchant-Id: acme\r\n\r\n", 200, "", 1, "/tpp/payments"},
		{"absolute-form naming another host", "GET http://evil.example/steal HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\n\r\n", 421, "host_not_allowed", 0, ""},
		{"absolute-form naming localhost, Host another", "GET http://localhost/tpp/x HTTP/1.1\r\nHost: evil.example\r\nX-Merchant-Id: acme\r\n\r\n", 200, "", 1, "/tpp/x"},
		{"CONNECT to another host", "CONNECT evil.example:443 HTTP/1.1\r\nHost: evil.example:443\r\nX-Merchant-Id: acme\r\n\r\n", 421, "host_not_allowed", 0, ""},
		{"CONNECT to a loopback host", "CONNECT 127.0.0.1:9 HTTP/1.1\r\nHost: 127.0.0.1:9\r\nX-Merchant-Id: acme\r\n\r\n", 405, "method_refused", 0, ""},
		{"CONNECT with a :protocol header", "CONNECT /ws HTTP/1.1\r\nHost: localhost\r\n:protocol: websocket\r\nX-Merchant-Id: acme\r\n\r\n", 400, "", 0, ""},
		{"CONNECT in path form", "CONNECT /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\n\r\n", 405, "method_refused", 0, ""},
		{"chunked with an undeclared Authorization trailer", "POST /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nTransfer-Encoding: chunked\r\n\r\n" +
			"7\r\npayload\r\n0\r\nAuthorization: Bearer mine\r\nX-Merchant-Id: globex\r\n\r\n", 200, "", 1, ""},
		{"Transfer-Encoding and Content-Length", "POST /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n" +
			"7\r\npayload\r\n0\r\n\r\n", 200, "", 1, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := sb.TokenRequests()
			resp, body := rawRequest(t, base, tt.request)
			if resp.StatusCode != tt.status || errorCode(body) != tt.code {
				t.Errorf("status %d %q, want %d %q", resp.StatusCode, body, tt.status, tt.code)
			}
			if strings.Contains(body, secret) || strings.Contains(resp.Header.Get("Authorization"), secret) {
				t.Errorf("the answer reveals the token")
			}
			got := up.take()
			if len(got) != tt.reached {
				t.Fatalf("%d requests reached the upstream, want %d", len(got), tt.reached)
			}
			for _, s := range got {
				if len(s.authorization) != 1 || s.authorization[0] != token || len(s.proxy) != 0 || len(s.merchant) != 0 || len(s.trailers) != 0 {
					t.Errorf("upstream got %d Authorization values (the broker's: %t), %d Proxy-Authorization, merchant %q, trailers %v; want the broker's token alone",
						len(s.authorization), len(s.authorization) == 1 && s.authorization[0] == token, len(s.proxy), s.merchant, s.trailers)
				}
				if tt.uri != "" && s.uri != tt.uri {
					t.Errorf("upstream got request-URI %q, want %q", s.uri, tt.uri)
				}
				if s.method == "POST" && s.body != "payload" {
					t.Errorf("upstream got body %q, want payload", s.body)
				}
			}
			if n := sb.TokenRequests() - before; n != 0 {
				t.Errorf("%d token requests, want none", n)
			}
		})
	}

	t.Run("h2c", func(t *testing.T) {
		// The plain port serves HTTP/2 with prior knowledge too.
		var p http.Protocols
		p.SetUnencryptedHTTP2(true)
		tr := &http.Transport{Protocols: &p}
		defer tr.CloseIdleConnections()
		for _, tt := range []struct {
			method, host string
			header       http.Header
			status       int
			code         string
			reached      int
		}{
			{"GET", "", http.Header{"X-Merchant-Id": {"acme"}, "Authorization": {"Bearer mine", "Basic eDp5"}, "Proxy-Authorization": {"Basic eDp5"}}, 200, "", 1},
			{"GET", "", http.Header{"X-Merchant-Id": {"acme", "acme"}}, 400, "ambiguous_merchant", 0},
			{"CONNECT", "127.0.0.1:9", http.Header{"X-Merchant-Id": {"acme"}}, 405, "method_refused", 0},
		} {
			before := sb.TokenRequests()
			r, _ := http.NewRequest(tt.method, base+"/tpp/payments", nil)
			r.Header = tt.header
			if tt.host != "" {
				r.Host = tt.host
			}
			resp, err := tr.RoundTrip(r)
			if err != nil {
				t.Fatal(err)
			}
			b, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			if resp.ProtoMajor != 2 || resp.StatusCode != tt.status || errorCode(string(b)) != tt.code || strings.Contains(string(b), secret) {
				t.Errorf("h2c %s: %s %d %q, want HTTP/2 %d %q", tt.method, resp.Proto, resp.StatusCode, b, tt.status, tt.code)
			}
			got := up.take()
			if len(got) != tt.reached || tt.reached == 1 && (len(got[0].authorization) != 1 || got[0].authorization[0] != token || len(got[0].proxy) != 0) {
				t.Errorf("h2c %s: %d requests upstream; want %d, with the broker's token alone", tt.method, len(got), tt.reached)
			}
			if n := sb.TokenRequests() - before; n != 0 {
				t.Errorf("h2c %s: %d token requests, want none", tt.method, n)
			}
		}
	})

	// upgrade opens a websocket through the sidecar and sends one line
	// through it; it returns the upstream's requests.
	upgrade := func(t *testing.T) []edgeSeen {
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		io.WriteString(conn, "GET /ws HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nAuthorization: Bearer mine\r\n"+
			"Upgrade: websocket\r\nConnection: Upgrade, Authorization\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n")
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil {
			t.Fatal(err)
		}
		if resp.StatusCode != http.StatusSwitchingProtocols {
			t.Fatalf("status %d, want 101", resp.StatusCode)
		}
		io.WriteString(conn, "hello\n")
		line, _ := br.ReadString('\n')
		if line != "echo hello\n" || strings.Contains(line, secret) {
			t.Errorf("tunnel answered %q, want the echo", line)
		}
		return up.take()
	}
	// revokeCurrent makes the upstream refuse the token the broker holds
	// now for acme, and returns it.
	revokeCurrent := func(t *testing.T) string {
		t.Helper()
		resp, _ := rawRequest(t, base, "GET /current HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\n\r\n")
		cur := up.take()
		if resp.StatusCode != http.StatusOK || len(cur) != 1 {
			t.Fatalf("status %d, %d requests upstream", resp.StatusCode, len(cur))
		}
		up.revoke(cur[0].authorization[0])
		return cur[0].authorization[0]
	}
	t.Run("websocket upgrade", func(t *testing.T) {
		got := upgrade(t)
		if len(got) != 1 || len(got[0].authorization) != 1 || got[0].authorization[0] != token {
			t.Errorf("upstream got %d requests; want one with the broker's token alone", len(got))
		}
	})

	t.Run("Expect 100-continue with a 401 retry", func(t *testing.T) {
		before := sb.TokenRequests()
		up.revoke(token)
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		io.WriteString(conn, "POST /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nContent-Length: 7\r\nExpect: 100-continue\r\n\r\n")
		br := bufio.NewReader(conn)
		resp, err := http.ReadResponse(br, nil)
		if err != nil || resp.StatusCode != http.StatusContinue {
			t.Fatalf("got %v %v, want 100 Continue before the body", resp, err)
		}
		io.WriteString(conn, "payload")
		// The upstream's own 100 Continue to each attempt may be passed on
		// too: a client reads 1xx answers until the final one.
		for resp.StatusCode == http.StatusContinue {
			if resp, err = http.ReadResponse(br, nil); err != nil {
				t.Fatal(err)
			}
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusOK || strings.Contains(string(b), secret) {
			t.Errorf("status %d %q, want 200 after the retry", resp.StatusCode, b)
		}
		got := up.take()
		if len(got) != 2 || got[0].authorization[0] != token || len(got[1].authorization) != 1 || got[1].authorization[0] == token {
			t.Fatalf("upstream got %d requests; want the revoked token, then one new token", len(got))
		}
		for i, s := range got {
			if s.body != "payload" {
				t.Errorf("attempt %d: body %q, want payload", i+1, s.body)
			}
		}
		if n := sb.TokenRequests() - before; n != 1 {
			t.Errorf("%d token requests, want 1", n)
		}
	})

	t.Run("websocket upgrade with a 401 retry", func(t *testing.T) {
		before := sb.TokenRequests()
		revoked := revokeCurrent(t)
		got := upgrade(t)
		if len(got) != 2 || got[0].authorization[0] != revoked || len(got[1].authorization) != 1 || got[1].authorization[0] == revoked {
			t.Errorf("upstream got %d requests; want the revoked token, then one new token", len(got))
		}
		if n := sb.TokenRequests() - before; n != 1 {
			t.Errorf("%d token requests, want 1", n)
		}
	})

	t.Run("Expect 100-continue, a body over retry_body_limit and a 401", func(t *testing.T) {
		before := sb.TokenRequests()
		revokeCurrent(t)
		big := strings.Repeat("x", 70<<10) // over the default 64 KiB: streamed, not kept
		conn, err := net.DialTimeout("tcp", addr, 10*time.Second)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(30 * time.Second))
		io.WriteString(conn, "POST /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nContent-Length: 71680\r\nExpect: 100-continue\r\n\r\n")
		br := bufio.NewReader(conn)
		var resp *http.Response
		for {
			if resp, err = http.ReadResponse(br, nil); err != nil {
				t.Fatal(err)
			}
			if resp.StatusCode != http.StatusContinue {
				break
			}
			if big != "" {
				io.WriteString(conn, big)
				big = ""
			}
		}
		b, _ := io.ReadAll(resp.Body)
		if resp.StatusCode != http.StatusUnauthorized || resp.Header.Get("WWW-Authenticate") == "" || strings.Contains(string(b), secret) {
			t.Errorf("status %d %q, want the upstream's 401", resp.StatusCode, b)
		}
		got := up.take()
		if len(got) != 1 || len(got[0].body) != 70<<10 {
			t.Fatalf("upstream got %d requests; want one, with the whole body", len(got))
		}
		if n := sb.TokenRequests() - before; n != 0 {
			t.Errorf("%d token requests, want none (the token is purged; the next request fetches one)", n)
		}
	})
}
