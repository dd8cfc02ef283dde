package dpop_test

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

var (
	rsaOnce sync.Once
	rsaKey  *rsa.PrivateKey
)

// testKeys returns one private key per supported kind; the RSA key is
// made once (generation is slow).
func testKeys(t testing.TB) map[string]crypto.Signer {
	rsaOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return map[string]crypto.Signer{dpop.ES256: ec, dpop.PS256: rsaKey, dpop.EdDSA: ed}
}

// b64 is the base64url encoding of s.
func b64(s string) string { return base64.RawURLEncoding.EncodeToString([]byte(s)) }

// pemOf encodes key as PKCS#8, or as SEC1 / PKCS#1 with format "legacy".
func pemOf(t testing.TB, key crypto.Signer, format string) []byte {
	var b *pem.Block
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		if format == "legacy" {
			der, err := x509.MarshalECPrivateKey(k)
			if err != nil {
				t.Fatal(err)
			}
			b = &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
		}
	case *rsa.PrivateKey:
		if format == "legacy" {
			b = &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(k)}
		}
	}
	if b == nil {
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		b = &pem.Block{Type: "PRIVATE KEY", Bytes: der}
	}
	return pem.EncodeToMemory(b)
}

// TestProof: each algorithm and PEM format gives proofs that go-jose
// verifies with the embedded jwk, with the claims asked for, a fresh jti
// each time and the key's thumbprint.
func TestProof(t *testing.T) {
	keys := testKeys(t)
	now := time.Unix(1_800_000_000, 0)
	for _, tc := range []struct {
		alg, format, override string
	}{
		{dpop.ES256, "pkcs8", ""},
		{dpop.ES256, "legacy", dpop.ES256},
		{dpop.PS256, "pkcs8", ""},
		{dpop.PS256, "legacy", dpop.PS256},
		{dpop.EdDSA, "pkcs8", ""},
		{dpop.EdDSA, "pkcs8", dpop.EdDSA},
	} {
		t.Run(tc.alg+"/"+tc.format+"/"+tc.override, func(t *testing.T) {
			k, err := dpop.ParseKey(append([]byte("junk\n"), pemOf(t, keys[tc.alg], tc.format)...), tc.override)
			if err != nil {
				t.Fatal(err)
			}
			if k.Alg() != tc.alg {
				t.Errorf("Alg = %s, want %s", k.Alg(), tc.alg)
			}
			seen := map[string]bool{}
			for _, c := range []struct{ htm, htu, ath, nonce string }{
				{"POST", "https://as.example/token", "", ""},
				{"GET", "https://rs.example/a%20b/c", dpop.ATH("tok"), "n-1_x.y~"},
				{"PUT", `https://rs.example/quote"and\back`, "", ""},
			} {
				proof, err := k.Proof(c.htm, c.htu, c.ath, c.nonce, now)
				if err != nil {
					t.Fatal(err)
				}
				p, err := dpoptest.Verify(proof)
				if err != nil {
					t.Fatal(err)
				}
				want := dpoptest.Proof{Alg: tc.alg, JKT: k.Thumbprint(), JTI: p.JTI, HTM: c.htm, HTU: c.htu, IAT: now.Unix(), ATH: c.ath, Nonce: c.nonce}
				if p != want {
					t.Errorf("proof = %+v\nwant    %+v", p, want)
				}
				if len(p.JTI) < 22 || seen[p.JTI] {
					t.Errorf("jti %q short or repeated", p.JTI)
				}
				seen[p.JTI] = true
			}
		})
	}
}

// TestParseKeyRefused: keys and algorithms that do not fit are refused
// with a message that says what to do.
func TestParseKeyRefused(t *testing.T) {
	keys := testKeys(t)
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	small, err := rsa.GenerateKey(rand.Reader, 1024)
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		pem  []byte
		alg  string
		want string
	}{
		{"no PEM", []byte("hello"), "", "no PEM private key"},
		{"certificate only", []byte("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"), "", "no PEM private key"},
		{"encrypted", []byte("-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n"), "", "encrypted"},
		{"corrupt", []byte("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"), "", "not a valid key"},
		{"P-384", pemOf(t, p384, "pkcs8"), "", "needs a P-256 key"},
		{"RSA 1024", pemOf(t, small, "pkcs8"), "", "at least 2048: make one with `openssl genpkey -algorithm RSA"},
		{"ES256 on RSA", pemOf(t, keys[dpop.PS256], "pkcs8"), dpop.ES256, `algorithm ES256 does not fit the key, which is for PS256: set alg = "PS256"`},
		{"PS256 on EC", pemOf(t, keys[dpop.ES256], "pkcs8"), dpop.PS256, "does not fit the key, which is for ES256"},
		{"ES256 on Ed25519", pemOf(t, keys[dpop.EdDSA], "pkcs8"), dpop.ES256, `which is for EdDSA: set alg = "EdDSA" or "Ed25519" or leave alg out`},
		{"Ed25519 on EC", pemOf(t, keys[dpop.ES256], "pkcs8"), dpop.Ed25519, `algorithm Ed25519 does not fit the key, which is for ES256: set alg = "ES256"`},
		{"RS256", pemOf(t, keys[dpop.PS256], "pkcs8"), "RS256", `unknown DPoP algorithm "RS256" (known: ES256, PS256, EdDSA, Ed25519)`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := dpop.ParseKey(tc.pem, tc.alg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
			if err != nil && strings.Contains(err.Error(), "BEGIN") {
				t.Errorf("the error quotes the PEM: %v", err)
			}
		})
	}
}

// TestThumbprint: RFC 8037's Ed25519 example key has the thumbprint the
// RFC gives, and the proof header carries its public JWK.
func TestThumbprint(t *testing.T) {
	// RFC 8037 Appendix A.1 and A.3: the Ed25519 key and its thumbprint.
	seed := []byte{0x9d, 0x61, 0xb1, 0x9d, 0xef, 0xfd, 0x5a, 0x60, 0xba, 0x84, 0x4a, 0xf4, 0x92, 0xec, 0x2c, 0xc4,
		0x44, 0x49, 0xc5, 0x69, 0x7b, 0x32, 0x69, 0x19, 0x70, 0x3b, 0xac, 0x03, 0x1c, 0xae, 0x7f, 0x60}
	k, err := dpop.NewKey(ed25519.NewKeyFromSeed(seed), "")
	if err != nil {
		t.Fatal(err)
	}
	if got, want := k.Thumbprint(), "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"; got != want {
		t.Errorf("Thumbprint = %s, want %s", got, want)
	}
	proof, err := k.Proof("GET", "https://rs.example/", "", "", time.Now())
	if err != nil {
		t.Fatal(err)
	}
	header, _, _ := strings.Cut(proof, ".")
	if got, want := header, b64(`{"typ":"dpop+jwt","alg":"EdDSA","jwk":{"kty":"OKP","crv":"Ed25519","x":"11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"}}`); got != want {
		t.Errorf("proof header %s, want %s", got, want)
	}
}

// TestATHAndHTU: ath is RFC 9449's example; htu drops query, fragment and
// default ports and lower-cases scheme and host.
func TestATHAndHTU(t *testing.T) {
	if got, want := dpop.ATH("Kz~8mXK1EalYznwH-LC-1fBAo.4Ljp~zsPE_NeO.gxU"), "fUHyO2r2Z3DZ53EsNrWBb0xWXoaNy59IiKCAqksmQEo"; got != want {
		t.Errorf("ATH = %s, want %s", got, want)
	}
	for _, tc := range []struct{ in, htu, origin string }{
		{"https://server.example.com/token", "https://server.example.com/token", "https://server.example.com"},
		{"HTTPS://Server.Example.COM:443/Path?q=1#frag", "https://server.example.com/Path", "https://server.example.com"},
		{"http://upstream.test:8443", "http://upstream.test:8443/", "http://upstream.test:8443"},
		{"http://h:80/a%2Fb/c", "http://h/a%2Fb/c", "http://h"},
		{"http://h/c d", "http://h/c%20d", "http://h"},
		{"https://h:8443/x", "https://h:8443/x", "https://h:8443"},
		{"https://Bänk.Example:443/p", "https://xn--bnk-qla.example/p", "https://xn--bnk-qla.example"},
	} {
		u, err := url.Parse(tc.in)
		if err != nil {
			t.Fatal(err)
		}
		if got := dpop.HTU(u); got != tc.htu {
			t.Errorf("HTU(%s) = %s, want %s", tc.in, got, tc.htu)
		}
		if got := dpop.Origin(u); got != tc.origin {
			t.Errorf("Origin(%s) = %s, want %s", tc.in, got, tc.origin)
		}
	}
}

// TestNonceMemory: nonces are kept per server kind and origin (a URL's
// scheme and host, lower-case, without the default port), invalid ones
// ignored, and at most 64 servers remembered.
func TestNonceMemory(t *testing.T) {
	k, err := dpop.NewKey(testKeys(t)[dpop.EdDSA], "")
	if err != nil {
		t.Fatal(err)
	}
	rs, as := dpop.ResourceServer, dpop.AuthorizationServer
	origin := func(host string) *url.URL { return &url.URL{Scheme: "https", Host: host} }
	a, b, c := origin("a"), origin("b"), origin("c")
	k.SetNonce(rs, &url.URL{Scheme: "HTTPS", Host: "A:443", Path: "/token"}, "n1")
	k.SetNonce(rs, b, "n2")
	k.SetNonce(rs, a, `bad"nonce`)
	k.SetNonce(rs, a, "has space")
	if k.Nonce(rs, a) != "n1" || k.Nonce(rs, b) != "n2" || k.Nonce(rs, c) != "" || k.Nonce(rs, origin("a:8443")) != "" {
		t.Errorf("nonces a=%q b=%q c=%q a:8443=%q", k.Nonce(rs, a), k.Nonce(rs, b), k.Nonce(rs, c), k.Nonce(rs, origin("a:8443")))
	}
	if k.Nonce(as, a) != "" {
		t.Errorf("the authorization server at a has the resource server's nonce %q", k.Nonce(as, a))
	}
	k.SetNonce(as, a, "as-n")
	if k.Nonce(as, a) != "as-n" || k.Nonce(rs, a) != "n1" {
		t.Errorf("at a: authorization server's nonce %q, resource server's %q, want as-n and n1", k.Nonce(as, a), k.Nonce(rs, a))
	}
	hosts := []*url.URL{a, a, b}
	for i := range 200 {
		h := origin(fmt.Sprintf("h%d", i))
		k.SetNonce(rs, h, "n")
		hosts = append(hosts, h)
	}
	kept := 0
	for i, o := range hosts {
		s := rs
		if i == 0 {
			s = as
		}
		if k.Nonce(s, o) != "" {
			kept++
		}
	}
	if kept != 64 || k.Nonce(rs, origin("h199")) != "n" {
		t.Errorf("%d origins kept (want 64), the newest %q", kept, k.Nonce(rs, origin("h199")))
	}
	if _, err := k.Proof("GET", "https://a/", "", "bad nonce", time.Now()); err == nil {
		t.Error("a proof with an invalid nonce was made")
	}
}

// TestNonceMemoryConcurrent: readers and writers of nonces race cleanly.
func TestNonceMemoryConcurrent(t *testing.T) {
	k, err := dpop.NewKey(testKeys(t)[dpop.EdDSA], "")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for g := range 4 {
		wg.Go(func() {
			for i := range 500 {
				o := &url.URL{Scheme: "https", Host: fmt.Sprintf("h%d", i%80)}
				kind := []dpop.Server{dpop.AuthorizationServer, dpop.ResourceServer}[i%2]
				k.SetNonce(kind, o, fmt.Sprintf("n%d-%d", g, i))
				_ = k.Nonce(kind, o)
			}
		})
	}
	wg.Wait()
}

// TestTransport: the transport signs each request with its own method and
// URL, remembers the nonce of every answer for the server's origin, and
// the next proof to that origin carries it; the body goes through intact.
func TestTransport(t *testing.T) {
	for _, resourceServer := range []bool{false, true} {
		t.Run(fmt.Sprintf("resourceServer=%t", resourceServer), func(t *testing.T) {
			k, err := dpop.NewKey(testKeys(t)[dpop.ES256], "")
			if err != nil {
				t.Fatal(err)
			}
			var bodies []string
			gate := &dpoptest.Gate{Nonce: "srv-nonce-1", ResourceServer: resourceServer}
			gate.Next = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				p, _ := dpoptest.ProofFrom(r.Context())
				if p.JKT != k.Thumbprint() || p.HTU != "http://"+r.Host+"/token" || p.HTM != http.MethodPost {
					t.Errorf("proof %+v", p)
				}
				b, _ := io.ReadAll(r.Body)
				bodies = append(bodies, string(b))
				io.WriteString(w, "ok")
			})
			srv := httptest.NewServer(gate)
			defer srv.Close()
			client := &http.Client{Transport: dpop.Transport(srv.Client().Transport, k)}
			send := func() int {
				req, err := http.NewRequest(http.MethodPost, srv.URL+"/token?x=1#f", strings.NewReader("grant_type=client_credentials"))
				if err != nil {
					t.Fatal(err)
				}
				req.Header.Set("DPoP", "a stale proof the transport replaces")
				resp, err := client.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				io.Copy(io.Discard, resp.Body)
				resp.Body.Close()
				if req.Header.Get("DPoP") != "a stale proof the transport replaces" {
					t.Error("the transport changed the caller's request")
				}
				return resp.StatusCode
			}
			want := http.StatusBadRequest
			if resourceServer {
				want = http.StatusUnauthorized
			}
			if got := send(); got != want {
				t.Fatalf("first request: status %d, want the nonce challenge %d", got, want)
			}
			if u, _ := url.Parse(srv.URL); k.Nonce(dpop.AuthorizationServer, u) != "srv-nonce-1" {
				t.Errorf("nonce not remembered for %s", dpop.Origin(u))
			}
			for i := range 2 {
				if got := send(); got != http.StatusOK {
					t.Fatalf("request %d with the nonce: status %d", i, got)
				}
			}
			if gate.Challenges.Load() != 1 || gate.Refused.Load() != 0 || len(bodies) != 2 || bodies[0] != "grant_type=client_credentials" {
				t.Errorf("server: %d challenges, %d refusals, bodies %q", gate.Challenges.Load(), gate.Refused.Load(), bodies)
			}
		})
	}
}

// TestTransportUnicodeHost: a request to a host name with non-ASCII
// letters goes out with the name in Punycode (RFC 3492, as Go sends the
// Host header), and its proof's htu names that host: the server accepts
// it.
func TestTransportUnicodeHost(t *testing.T) {
	k, err := dpop.NewKey(testKeys(t)[dpop.EdDSA], "")
	if err != nil {
		t.Fatal(err)
	}
	gate := &dpoptest.Gate{Next: http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})}
	srv := httptest.NewServer(gate)
	defer srv.Close()
	base := srv.Client().Transport.(*http.Transport).Clone()
	base.DialContext = func(ctx context.Context, network, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, network, srv.Listener.Addr().String())
	}
	_, port, _ := net.SplitHostPort(srv.Listener.Addr().String())
	resp, err := (&http.Client{Transport: dpop.Transport(base, k)}).Post("http://Bänk.example:"+port+"/token", "application/x-www-form-urlencoded", nil)
	if err != nil {
		t.Fatal(err)
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("status %d %s, want 200", resp.StatusCode, body)
	}
}

// TestTransportKeyFailure: a proof that cannot be made fails the request
// before it is sent, and its body is closed.
func TestTransportKeyFailure(t *testing.T) {
	calls := 0
	srv := httptest.NewServer(http.HandlerFunc(func(http.ResponseWriter, *http.Request) { calls++ }))
	defer srv.Close()
	client := &http.Client{Transport: dpop.Transport(nil, nil)}
	body := &closeRecorder{Reader: strings.NewReader("b")}
	req, _ := http.NewRequest(http.MethodPost, srv.URL, body)
	if _, err := client.Do(req); err == nil || calls != 0 || !body.closed {
		t.Errorf("err %v, %d calls, body closed %t: want an error, no call, the body closed", err, calls, body.closed)
	}
}

type closeRecorder struct {
	io.Reader
	closed bool
}

func (c *closeRecorder) Close() error { c.closed = true; return nil }

// BenchmarkProof is the cost of one proof per algorithm: one signature and
// the proof's bytes.
func BenchmarkProof(b *testing.B) {
	keys := testKeys(b)
	ath := dpop.ATH("an-access-token")
	for _, alg := range []string{dpop.EdDSA, dpop.ES256, dpop.PS256} {
		k, err := dpop.NewKey(keys[alg], "")
		if err != nil {
			b.Fatal(err)
		}
		b.Run(alg, func(b *testing.B) {
			b.ReportAllocs()
			now := time.Now()
			for b.Loop() {
				if _, err := k.Proof("GET", "https://api.example.com/v1/payments", ath, "nonce-value", now); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// TestKeyPrinted: however a Key is printed or logged, only its algorithm
// and thumbprint show, never its private or public key material.
func TestKeyPrinted(t *testing.T) {
	for alg, priv := range testKeys(t) {
		k, err := dpop.NewKey(priv, "")
		if err != nil {
			t.Fatal(err)
		}
		core, logs := observer.New(zapcore.InfoLevel)
		zap.New(core).Info("key", zap.Object("dpop_key", k), zap.Any("any", k))
		logged, _ := json.Marshal(logs.All()[0].ContextMap())
		printed := map[string]string{
			"%v": fmt.Sprintf("%v", k), "%+v": fmt.Sprintf("%+v", k),
			"%#v": fmt.Sprintf("%#v", k), "struct %+v": fmt.Sprintf("%+v", struct{ K *dpop.Key }{k}),
			"zap": string(logged),
		}
		for how, out := range printed {
			if !strings.Contains(out, k.Thumbprint()) || !strings.Contains(out, alg) {
				t.Errorf("%s %s: %s, want the alg and thumbprint", alg, how, out)
			}
			// Fields of a JWK, private ("d") or public ("x", "n"), and
			// the Go field names of the key and its header.
			for _, leak := range []string{`"d"`, `"x"`, `"n"`, "signer", "header", "nonces", "PrivateKey", "D:", "N:"} {
				if strings.Contains(out, leak) {
					t.Errorf("%s %s: %s shows %s", alg, how, out, leak)
				}
			}
		}
	}
	var nilKey *dpop.Key
	if got := nilKey.String(); got != "no DPoP key" {
		t.Errorf("nil key: %q", got)
	}
}

// TestNonceLimit: nonces up to dpop.MaxNonce (8 KiB) bytes are remembered
// and carried by the proofs; a larger one, or one with characters a nonce
// may not hold, is refused with a *dpop.NonceError that names the server,
// the size and the limit but never the nonce, the nonce before it is kept,
// and RefusedNonce reports the refusal until a usable nonce comes.
func TestNonceLimit(t *testing.T) {
	if dpop.MaxNonce != 8192 {
		t.Fatalf("MaxNonce %d, want 8192", dpop.MaxNonce)
	}
	nonce := func(n int) string { return strings.Repeat("N", n-1) + "z" }
	for _, tc := range []struct {
		name     string
		nonce    string
		refused  bool
		badChars bool
	}{
		{"one byte", "z", false, false},
		{"1 KiB", nonce(1024), false, false},
		{"1.5 KiB", nonce(1536), false, false},
		{"at the limit", nonce(dpop.MaxNonce), false, false},
		{"one byte over", nonce(dpop.MaxNonce + 1), true, false},
		{"1 MiB", nonce(1 << 20), true, false},
		{"a quote", `bad"nonce`, true, true},
		{"over the limit, with a space", nonce(dpop.MaxNonce) + " ", true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k, err := dpop.NewKey(testKeys(t)[dpop.EdDSA], "")
			if err != nil {
				t.Fatal(err)
			}
			as, u := dpop.AuthorizationServer, &url.URL{Scheme: "https", Host: "AS.example:443", Path: "/token"}
			if err := k.SetNonce(as, u, "before"); err != nil {
				t.Fatal(err)
			}
			err = k.SetNonce(as, u, tc.nonce)
			if !tc.refused {
				if err != nil || k.Nonce(as, u) != tc.nonce || k.RefusedNonce(as, u) != nil {
					t.Fatalf("SetNonce of %d bytes: %v, remembered %d bytes, refusal %v", len(tc.nonce), err, len(k.Nonce(as, u)), k.RefusedNonce(as, u))
				}
				proof, err := k.Proof("POST", "https://as.example/token", "", k.Nonce(as, u), time.Now())
				if err != nil {
					t.Fatal(err)
				}
				if p, err := dpoptest.Verify(proof); err != nil || p.Nonce != tc.nonce {
					t.Errorf("the proof carries a nonce of %d bytes (%v), want %d", len(p.Nonce), err, len(tc.nonce))
				}
				return
			}
			ne, ok := err.(*dpop.NonceError)
			if !ok {
				t.Fatalf("SetNonce of %d bytes: %T %v, want a *dpop.NonceError", len(tc.nonce), err, err)
			}
			if *ne != (dpop.NonceError{Server: as, Origin: "https://as.example", Size: len(tc.nonce), BadChars: tc.badChars}) {
				t.Errorf("NonceError %+v", *ne)
			}
			want := []string{"authorization server https://as.example", fmt.Sprintf("%d bytes", len(tc.nonce))}
			if !tc.badChars {
				want = append(want, "over the limit of 8192 bytes", "ask the provider to send shorter nonces")
			}
			for _, w := range want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			if strings.Contains(err.Error(), tc.nonce) || strings.Contains(err.Error(), "NNNN") {
				t.Errorf("error %q holds the nonce", err)
			}
			if k.Nonce(as, u) != "before" {
				t.Errorf("remembered %d bytes, want the nonce before", len(k.Nonce(as, u)))
			}
			if got := k.RefusedNonce(as, u); got == nil || got.Error() != err.Error() {
				t.Errorf("RefusedNonce %v, want %v", got, err)
			}
			if got := k.RefusedNonce(dpop.ResourceServer, u); got != nil {
				t.Errorf("the resource server at the same origin has a refusal: %v", got)
			}
			if _, err := k.Proof("POST", "https://as.example/token", "", tc.nonce, time.Now()); err == nil || strings.Contains(err.Error(), tc.nonce) {
				t.Errorf("a proof with the refused nonce: %v", err)
			}
			if err := k.SetNonce(as, u, "after"); err != nil || k.Nonce(as, u) != "after" || k.RefusedNonce(as, u) != nil {
				t.Errorf("a usable nonce after the refusal: %v, remembered %q, refusal %v", err, k.Nonce(as, u), k.RefusedNonce(as, u))
			}
		})
	}
	// The nonce kept through a refusal, sent again, is the server's
	// nonce once more: the refusal is over.
	t.Run("same nonce re-sent after a refusal", func(t *testing.T) {
		k, err := dpop.NewKey(testKeys(t)[dpop.EdDSA], "")
		if err != nil {
			t.Fatal(err)
		}
		as, u := dpop.AuthorizationServer, &url.URL{Scheme: "https", Host: "as.example"}
		if err := k.SetNonce(as, u, "A"); err != nil {
			t.Fatal(err)
		}
		if err := k.SetNonce(as, u, nonce(9000)); err == nil {
			t.Fatal("a nonce of 9000 bytes was not refused")
		}
		if err := k.SetNonce(as, u, "A"); err != nil || k.Nonce(as, u) != "A" || k.RefusedNonce(as, u) != nil {
			t.Errorf("nonce A re-sent after a refusal: %v, remembered %q, refusal %v; want A and no refusal", err, k.Nonce(as, u), k.RefusedNonce(as, u))
		}
	})
}

// TestEd25519Name: an Ed25519 key takes alg EdDSA or Ed25519 (RFC 9864),
// its proofs carry the name configured, and ForServer gives the key under
// the name an authorization server lists (Ed25519 first), sharing the
// thumbprint and the nonces; other keys keep their name.
func TestEd25519Name(t *testing.T) {
	keys := testKeys(t)
	edPEM := pemOf(t, keys[dpop.EdDSA], "pkcs8")
	byName := map[string]*dpop.Key{}
	for _, alg := range []string{"", dpop.EdDSA, dpop.Ed25519} {
		k, err := dpop.ParseKey(edPEM, alg)
		if err != nil {
			t.Fatal(err)
		}
		byName[alg] = k
	}
	if byName[""].Alg() != dpop.EdDSA || byName[dpop.Ed25519].Alg() != dpop.Ed25519 || byName[dpop.Ed25519].Thumbprint() != byName[""].Thumbprint() {
		t.Fatalf("algs %s, %s; thumbprints %s, %s", byName[""].Alg(), byName[dpop.Ed25519].Alg(), byName[""].Thumbprint(), byName[dpop.Ed25519].Thumbprint())
	}
	for i, tc := range []struct {
		name       string
		configured string
		listed     []string
		want       string
	}{
		{"default, no list", "", nil, dpop.EdDSA},
		{"Ed25519, no list", dpop.Ed25519, nil, dpop.Ed25519},
		{"default, Ed25519 listed", "", []string{"ES256", "Ed25519"}, dpop.Ed25519},
		{"default, both listed", "", []string{"EdDSA", "Ed25519"}, dpop.Ed25519},
		{"default, EdDSA listed", "", []string{"EdDSA"}, dpop.EdDSA},
		{"Ed25519, EdDSA listed", dpop.Ed25519, []string{"EdDSA", "ES256"}, dpop.EdDSA},
		{"Ed25519, neither listed", dpop.Ed25519, []string{"ES256"}, dpop.Ed25519},
		{"EdDSA, Ed25519 listed", dpop.EdDSA, []string{"Ed25519"}, dpop.Ed25519},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := byName[tc.configured]
			sk := k.ForServer(tc.listed)
			// The same key under the other name.
			other := dpop.EdDSA
			if sk.Alg() == dpop.EdDSA {
				other = dpop.Ed25519
			}
			ok := k.ForServer([]string{other})
			if sk.Alg() != tc.want || sk.Thumbprint() != k.Thumbprint() || k.ForServer(tc.listed) != sk {
				t.Fatalf("ForServer(%q): %v, want %s with thumbprint %s, the same each time", tc.listed, sk, tc.want, k.Thumbprint())
			}
			proof, err := sk.Proof("POST", "https://as.example/token", "", "", time.Now())
			if err != nil {
				t.Fatal(err)
			}
			if p, err := dpoptest.Verify(proof); err != nil || p.Alg != tc.want || p.JKT != k.Thumbprint() {
				t.Errorf("proof alg %q jkt %s (%v), want %s %s", p.Alg, p.JKT, err, tc.want, k.Thumbprint())
			}
			u := &url.URL{Scheme: "https", Host: "as.example"}
			nonce := fmt.Sprintf("n-%d", i) // not any other case's: the keys outlive the case
			if ok.Alg() != other {
				t.Fatalf("ForServer([%s]) signs as %s", other, ok.Alg())
			}
			if err := sk.SetNonce(dpop.AuthorizationServer, u, nonce); err != nil || ok.Nonce(dpop.AuthorizationServer, u) != nonce || k.Nonce(dpop.AuthorizationServer, u) != nonce {
				t.Errorf("nonce %q remembered through ForServer's %s key: %q under %s, %q under the configured name (%v)",
					nonce, sk.Alg(), ok.Nonce(dpop.AuthorizationServer, u), other, k.Nonce(dpop.AuthorizationServer, u), err)
			}
		})
	}
	for _, alg := range []string{dpop.ES256, dpop.PS256} {
		k, err := dpop.NewKey(keys[alg], "")
		if err != nil {
			t.Fatal(err)
		}
		if k.ForServer([]string{"Ed25519", "EdDSA"}) != k {
			t.Errorf("ForServer changed a %s key", alg)
		}
	}
	var none *dpop.Key
	if none.ForServer([]string{"Ed25519"}) != nil {
		t.Error("ForServer of no key is a key")
	}
}
