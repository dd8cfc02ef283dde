package pemkey

import (
	"crypto"
	"crypto/ecdh"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"testing"
)

// TestParseKeyTypes: Parse returns the RSA, EC and Ed25519 keys of the
// three PEM block types, and refuses a PKCS#8 key that cannot sign
// (X25519) by its type.
func TestParseKeyTypes(t *testing.T) {
	rsaKey, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	ecKey, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, edKey, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	xKey, err := ecdh.X25519().GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	sec1, err := x509.MarshalECPrivateKey(ecKey)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8 := func(k any) []byte {
		b, err := x509.MarshalPKCS8PrivateKey(k)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	for _, tc := range []struct {
		name      string
		blockType string
		der       []byte
		want      crypto.Signer // nil: refused with wantErr
		wantErr   string
	}{
		{"RSA, PKCS#1", "RSA PRIVATE KEY", x509.MarshalPKCS1PrivateKey(rsaKey), rsaKey, ""},
		{"RSA, PKCS#8", "PRIVATE KEY", pkcs8(rsaKey), rsaKey, ""},
		{"EC, SEC1", "EC PRIVATE KEY", sec1, ecKey, ""},
		{"EC, PKCS#8", "PRIVATE KEY", pkcs8(ecKey), ecKey, ""},
		{"Ed25519, PKCS#8", "PRIVATE KEY", pkcs8(edKey), edKey, ""},
		{"X25519, PKCS#8", "PRIVATE KEY", pkcs8(xKey), nil, "unsupported private key type *ecdh.PrivateKey: use an RSA, EC P-256 or Ed25519 key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := Parse(pem.EncodeToMemory(&pem.Block{Type: tc.blockType, Bytes: tc.der}))
			if tc.want == nil {
				if err == nil || err.Error() != tc.wantErr {
					t.Fatalf("Parse = %T, %v; want the error %q", got, err, tc.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatalf("Parse: %v", err)
			}
			if !tc.want.Public().(interface{ Equal(crypto.PublicKey) bool }).Equal(got.Public()) {
				t.Errorf("Parse returned a %T whose public key is not the one written", got)
			}
		})
	}
}
