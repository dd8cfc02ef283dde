package oauth

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// secretValue is a distinctive secret: no error text may ever hold it.
const secretValue = "cs-DISTINCTIVE:s3cr3t/+%&=9f8e"

var (
	rsaOnce sync.Once
	rsaKey  *rsa.PrivateKey
)

// testRSAKey is one 2048-bit key shared by the tests (generation is slow).
func testRSAKey(t testing.TB) *rsa.PrivateKey {
	rsaOnce.Do(func() {
		var err error
		if rsaKey, err = rsa.GenerateKey(rand.Reader, 2048); err != nil {
			panic(err)
		}
	})
	return rsaKey
}

func testECKey(t testing.TB) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// keyPEM encodes key as PKCS#1 ("pkcs1"), PKCS#8 ("pkcs8") or SEC1 ("sec1").
func keyPEM(t testing.TB, key crypto.Signer, format string) []byte {
	var b *pem.Block
	switch format {
	case "pkcs1":
		b = &pem.Block{Type: "RSA PRIVATE KEY", Bytes: x509.MarshalPKCS1PrivateKey(key.(*rsa.PrivateKey))}
	case "sec1":
		der, err := x509.MarshalECPrivateKey(key.(*ecdsa.PrivateKey))
		if err != nil {
			t.Fatal(err)
		}
		b = &pem.Block{Type: "EC PRIVATE KEY", Bytes: der}
	default:
		der, err := x509.MarshalPKCS8PrivateKey(key)
		if err != nil {
			t.Fatal(err)
		}
		b = &pem.Block{Type: "PRIVATE KEY", Bytes: der}
	}
	return pem.EncodeToMemory(b)
}

func mustSigner(t testing.TB, key crypto.Signer, alg, kid string) *Signer {
	t.Helper()
	s, err := NewSigner(key, alg, kid)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// testPKI is a CA with a server certificate for 127.0.0.1 and client
// certificates, written to files for httpclient.TLSOptions.
type testPKI struct {
	dir    string
	ca     *x509.Certificate
	caKey  *ecdsa.PrivateKey
	CAFile string
	Server tls.Certificate
	Pool   *x509.CertPool
}

func newPKI(t *testing.T) *testPKI {
	t.Helper()
	p := &testPKI{dir: t.TempDir(), caKey: testECKey(t)}
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true, IsCA: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &p.caKey.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	p.ca, _ = x509.ParseCertificate(der)
	p.Pool = x509.NewCertPool()
	p.Pool.AddCert(p.ca)
	p.CAFile = filepath.Join(p.dir, "ca.pem")
	writeFile(t, p.CAFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	certFile, keyFile := p.issue(t, "server", x509.ExtKeyUsageServerAuth)
	if p.Server, err = tls.LoadX509KeyPair(certFile, keyFile); err != nil {
		t.Fatal(err)
	}
	return p
}

// issue writes a certificate for cn (with IP SAN 127.0.0.1) and its key.
func (p *testPKI) issue(t *testing.T, cn string, usage x509.ExtKeyUsage) (certFile, keyFile string) {
	t.Helper()
	key := testECKey(t)
	tmpl := &x509.Certificate{
		SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		KeyUsage: x509.KeyUsageDigitalSignature, ExtKeyUsage: []x509.ExtKeyUsage{usage},
		IPAddresses: []net.IP{net.IPv4(127, 0, 0, 1)},
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &key.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	certFile, keyFile = filepath.Join(p.dir, cn+".pem"), filepath.Join(p.dir, cn+".key")
	writeFile(t, certFile, pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}))
	writeFile(t, keyFile, keyPEM(t, key, "pkcs8"))
	return certFile, keyFile
}

// client returns an HTTP client trusting the CA, with cn's certificate
// when cn is not empty.
func (p *testPKI) client(t *testing.T, cn string) *http.Client {
	t.Helper()
	o := httpclient.TLSOptions{CAFile: p.CAFile}
	if cn != "" {
		o.CertFile, o.KeyFile = p.issue(t, cn, x509.ExtKeyUsageClientAuth)
	}
	c, err := httpclient.New(5*time.Second, o)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

func writeFile(t testing.TB, path string, data []byte) {
	t.Helper()
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
}

// newClock returns a test clock at a fixed date.
func newClock() *clocktest.Clock { return clocktest.New(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)) }

// stored returns how many values s holds, expired ones not yet swept
// included.
func stored(s *MemoryPendingStore) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.m)
}

// cryptoSigner is crypto.Signer, named for test tables.
type cryptoSigner = crypto.Signer

// serverConfig is a TLS server config with the PKI's server certificate
// that asks for (and verifies, when given) client certificates.
func (p *testPKI) serverConfig() *tls.Config {
	return &tls.Config{Certificates: []tls.Certificate{p.Server}, ClientAuth: tls.VerifyClientCertIfGiven, ClientCAs: p.Pool}
}

// brokerToken mints a token of src for req as the broker does for a
// lookup (its attempts send a DPoP nonce challenge again), through a
// broker of its own with one attempt: a failure is returned, not tried
// again after a backoff.
func brokerToken(t *testing.T, src broker.Source, req broker.Request) (broker.Token, error) {
	t.Helper()
	br := broker.New(broker.Options{MaxAttempts: 1})
	defer br.Close()
	return brokertest.Token(context.Background(), br, brokertest.NewBinding("bank#1", src, req))
}

// newFlow builds the refresh-token source of cfg over store and its
// consent flow of consent, with the pending store of pend (default: a
// MemoryPendingStore on the wall clock).
func newFlow(t *testing.T, cfg Config, store Store, consent AuthCodeConfig, pend ...*Pendings) (*RefreshToken, *AuthCode) {
	t.Helper()
	src, err := NewRefreshToken(cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	p := &Pendings{Store: &MemoryPendingStore{}}
	if len(pend) > 0 {
		p = pend[0]
	}
	flow, err := NewAuthCode(src, consent, p)
	if err != nil {
		t.Fatal(err)
	}
	return src, flow
}

// newLinkID makes a consent link of flow for merchant and returns its id.
func newLinkID(t *testing.T, flow *AuthCode, merchant string) string {
	t.Helper()
	link, err := flow.NewLink(context.Background(), merchant, "", "")
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(link.URL)
	if err != nil || u.Query().Get("link") == "" {
		t.Fatalf("consent link %v: %v", link, err)
	}
	return u.Query().Get("link")
}

// startLink makes a consent link of flow for merchant and starts it with
// opts, at the link's host, as the merchant's browser does: it returns
// the authorization URL, the host (the callback's) and Start's error.
func startLink(t *testing.T, flow *AuthCode, merchant string, opts ...StepOption) (authURL, host string, err error) {
	t.Helper()
	link, err := flow.NewLink(context.Background(), merchant, "", "")
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(link.URL)
	if err != nil {
		t.Fatal(err)
	}
	authURL, _, err = flow.Start(context.Background(), u.Query().Get("link"), u.Host, opts...)
	return authURL, u.Host, err
}
