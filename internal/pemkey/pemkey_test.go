package pemkey_test

import (
	"crypto/ecdh"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/pemkey"
)

// TestParseKeyTypes: Parse returns the RSA, EC and Ed25519 keys of
// PKCS#8 files as the signers they are, and refuses a key that cannot
// sign (X25519) by its type. (The PKCS#1 and SEC1 blocks are read in
// oauth's TestKeysAndSigners.)
func TestParseKeyTypes(t *testing.T) {
	x25519, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(x25519)
	if err != nil {
		t.Fatal(err)
	}
	x25519PEM := pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
	for _, tc := range []struct {
		name string
		pem  func() ([]byte, error)
		want string // the signer's type, or the error
	}{
		{"RSA", func() ([]byte, error) { return dpoptest.KeyPEM("PS256") }, "*rsa.PrivateKey"},
		{"EC P-256", func() ([]byte, error) { return dpoptest.KeyPEM("ES256") }, "*ecdsa.PrivateKey"},
		{"Ed25519", func() ([]byte, error) { return dpoptest.KeyPEM("EdDSA") }, "ed25519.PrivateKey"},
		{"X25519", func() ([]byte, error) { return x25519PEM, nil },
			"unsupported private key type *ecdh.PrivateKey: use an RSA, EC P-256 or Ed25519 key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b, err := tc.pem()
			if err != nil {
				t.Fatal(err)
			}
			key, err := pemkey.Parse(b)
			got := fmt.Sprintf("%T", key)
			if err != nil {
				got = err.Error()
			}
			if got != tc.want {
				t.Errorf("Parse: %s, want %s", got, tc.want)
			}
		})
	}
}
