package dpoptest

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// NewKey returns a new Ed25519 DPoP key (EdDSA) for a test; it fails t when
// the key cannot be made.
func NewKey(t testing.TB) *dpop.Key {
	t.Helper()
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := dpop.NewKey(priv, "")
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// KeyPEM returns a new private key for a DPoP algorithm as PKCS#8 PEM, as
// an operator would write it to a file: ES256 an EC P-256 key, PS256 an
// RSA key of 2048 bits, EdDSA or Ed25519 an Ed25519 key.
func KeyPEM(alg string) ([]byte, error) {
	var (
		signer crypto.Signer
		err    error
	)
	switch alg {
	case "ES256":
		signer, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case "PS256":
		signer, err = rsa.GenerateKey(rand.Reader, 2048)
	case "EdDSA", "Ed25519":
		_, signer, err = ed25519.GenerateKey(rand.Reader)
	default:
		return nil, fmt.Errorf("dpoptest: unknown DPoP algorithm %q: want ES256, PS256, EdDSA or Ed25519", alg)
	}
	if err != nil {
		return nil, err
	}
	der, err := x509.MarshalPKCS8PrivateKey(signer)
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), nil
}
