package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
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
