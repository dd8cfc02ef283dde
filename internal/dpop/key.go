// Package dpop makes DPoP proofs (RFC 9449): a Key signs, for each HTTP
// request, a short JWT that proves possession of the key the access token
// is bound to. Transport adds proofs to token-endpoint and PAR requests. A
// Key remembers the last DPoP-Nonce of each server, by its kind and origin
// (Nonce, SetNonce), for the next proof to that server.
//
// Proofs are credentials for a few seconds: never log one.
package dpop

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"

	jose "github.com/go-jose/go-jose/v4"
	"go.uber.org/zap/zapcore"

	"github.com/tokenbroker/caddy-token-broker/internal/pemkey"
)

// Signing algorithms of DPoP proofs.
const (
	// ES256 is ECDSA on P-256 with SHA-256, for EC P-256 keys.
	ES256 = "ES256"
	// PS256 is RSASSA-PSS with SHA-256, for RSA keys of at least 2048 bits.
	PS256 = "PS256"
	// EdDSA is Ed25519, for Ed25519 keys: the smallest and fastest proofs.
	// It is the polymorphic name of RFC 8037, which RFC 9864 deprecates
	// but most servers know.
	EdDSA = "EdDSA"
	// Ed25519 is the same algorithm under its fully-specified name
	// (RFC 9864), for Ed25519 keys.
	Ed25519 = "Ed25519"
)

// algs lists the supported algorithms, for messages.
const algs = "ES256, PS256, EdDSA, Ed25519"

// minRSABits is the smallest RSA key accepted.
const minRSABits = 2048

// Key is a DPoP private key with its algorithm, public JWK, RFC 7638
// thumbprint and the proof header made from them. It is safe for
// concurrent use.
type Key struct {
	signer crypto.Signer
	alg    string
	jkt    string
	// header is the base64url encoding of the proof's JOSE header and ".".
	header string
	// nonces are shared with twin.
	nonces *nonces
	// twin is, for an Ed25519 key, the same key under the other name of
	// its algorithm (EdDSA, Ed25519), for ForServer; nil for others.
	twin *Key
}

// ParseKey reads a PEM private key (PKCS#8, SEC1 or PKCS#1; unencrypted)
// and returns its DPoP Key. alg "" infers the algorithm from the key: EC
// P-256 -> ES256, RSA (2048 bits or more) -> PS256, Ed25519 -> EdDSA. A
// given alg must fit the key: an Ed25519 key takes EdDSA or Ed25519 (the
// same algorithm, RFC 9864), the name its proofs carry unless a server
// lists only the other (ForServer). Errors say what is wrong and what to
// do; they never quote the key.
func ParseKey(pemBytes []byte, alg string) (*Key, error) {
	key, err := pemkey.Parse(pemBytes)
	if err != nil {
		return nil, err
	}
	return NewKey(key, alg)
}

// NewKey returns the DPoP Key of a private key (*ecdsa.PrivateKey on
// P-256, *rsa.PrivateKey of 2048 bits or more, ed25519.PrivateKey). alg is
// as for ParseKey.
func NewKey(key crypto.Signer, alg string) (*Key, error) {
	var want string
	switch k := key.(type) {
	case *ecdsa.PrivateKey:
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("the EC key is on %s: DPoP with ES256 needs a P-256 key (openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256)", k.Curve.Params().Name)
		}
		want = ES256
	case *rsa.PrivateKey:
		if n := k.N.BitLen(); n < minRSABits {
			return nil, fmt.Errorf("the RSA key has %d bits: PS256 needs at least %d: make one with `openssl genpkey -algorithm RSA -pkeyopt rsa_keygen_bits:%d -out KEY.pem`, or an Ed25519 key (EdDSA, faster) with `openssl genpkey -algorithm ed25519 -out KEY.pem`", n, minRSABits, minRSABits)
		}
		want = PS256
	case ed25519.PrivateKey:
		want = EdDSA
	default:
		return nil, fmt.Errorf("unsupported private key type %T: use an EC P-256 (ES256), RSA (PS256) or Ed25519 (EdDSA) key", key)
	}
	switch {
	case alg == "":
		alg = want
	case alg != ES256 && alg != PS256 && alg != EdDSA && alg != Ed25519:
		return nil, fmt.Errorf("unknown DPoP algorithm %q (known: %s)", alg, algs)
	case alg == Ed25519 && want == EdDSA:
	case alg != want:
		fits := fmt.Sprintf("%q", want)
		if want == EdDSA {
			fits += ` or "Ed25519"`
		}
		return nil, fmt.Errorf("algorithm %s does not fit the key, which is for %s: set alg = %s or leave alg out", alg, want, fits)
	}
	pub := jose.JSONWebKey{Key: key.Public()}
	jwk, err := pub.MarshalJSON()
	if err != nil {
		return nil, fmt.Errorf("encoding the public key as a JWK: %w", err)
	}
	tp, err := pub.Thumbprint(crypto.SHA256)
	if err != nil {
		return nil, fmt.Errorf("computing the key thumbprint: %w", err)
	}
	k := &Key{signer: key, alg: alg, jkt: base64.RawURLEncoding.EncodeToString(tp), nonces: &nonces{}}
	if k.header, err = proofHeader(alg, jwk); err != nil {
		return nil, err
	}
	if want == EdDSA {
		twin := *k
		twin.alg = EdDSA
		if alg == EdDSA {
			twin.alg = Ed25519
		}
		if twin.header, err = proofHeader(twin.alg, jwk); err != nil {
			return nil, err
		}
		k.twin, twin.twin = &twin, k
	}
	return k, nil
}

// proofHeader returns the base64url encoding of a proof's JOSE header
// {typ: dpop+jwt, alg, jwk}, followed by ".".
func proofHeader(alg string, jwk []byte) (string, error) {
	h, err := json.Marshal(struct {
		Typ string          `json:"typ"`
		Alg string          `json:"alg"`
		JWK json.RawMessage `json:"jwk"`
	}{"dpop+jwt", alg, jwk})
	if err != nil {
		return "", fmt.Errorf("encoding the proof header: %w", err)
	}
	return base64.RawURLEncoding.EncodeToString(h) + ".", nil
}

// ForServer returns the key to sign the proofs to an authorization server
// whose metadata lists supported as its dpop_signing_alg_values_supported
// (RFC 9449 §5.1): for an Ed25519 key, the same key under the name the
// server lists, Ed25519 (RFC 9864) when it lists it, else EdDSA when it
// lists that; k itself otherwise (another key, a server that lists
// neither name or publishes no list). The key returned shares k's
// nonces and thumbprint.
func (k *Key) ForServer(supported []string) *Key {
	if k == nil || k.twin == nil {
		return k
	}
	for _, name := range []string{Ed25519, EdDSA} {
		if slices.Contains(supported, name) {
			if k.alg == name {
				return k
			}
			return k.twin
		}
	}
	return k
}

// Alg returns the proofs' signing algorithm: ES256, PS256, EdDSA or
// Ed25519.
func (k *Key) Alg() string { return k.alg }

// Thumbprint returns the RFC 7638 SHA-256 thumbprint of the public key,
// base64url-encoded: the jkt that a DPoP-bound token's cnf claim names and
// the dpop_jkt of an authorization request. Public.
func (k *Key) Thumbprint() string { return k.jkt }

// String describes the key by its public parts only, the algorithm and
// the thumbprint: "EdDSA jkt=<thumbprint>". No key material is ever
// printed, whatever the verb (%v, %+v, %s).
func (k *Key) String() string {
	if k == nil {
		return "no DPoP key"
	}
	return k.alg + " jkt=" + k.jkt
}

// GoString is String, for %#v: a Key's fields hold the private key.
func (k *Key) GoString() string { return "dpop.Key(" + k.String() + ")" }

// MarshalLogObject logs the key as {alg, jkt} (zapcore.ObjectMarshaler):
// never its private part.
func (k *Key) MarshalLogObject(enc zapcore.ObjectEncoder) error {
	if k == nil {
		return nil
	}
	enc.AddString("alg", k.alg)
	enc.AddString("jkt", k.jkt)
	return nil
}

// errNoKey is the error of a nil Key.
var errNoKey = errors.New("no DPoP key")

// checkNonce reports whether a DPoP-Nonce value is usable: 1 to MaxNonce
// NQCHAR (RFC 9449 §8.1: %x21 / %x23-5B / %x5D-7E). Such a value needs no
// escaping in the proof's JSON.
func checkNonce(n string) bool {
	if n == "" || len(n) > MaxNonce {
		return false
	}
	return !strings.ContainsFunc(n, func(r rune) bool { return r < 0x21 || r == '"' || r == '\\' || r > 0x7e })
}

// MaxNonce is the largest DPoP-Nonce a Key remembers and puts in its
// proofs, in bytes. RFC 9449 sets no limit; servers send tens to a few
// hundred bytes, and a proof with an 8 KiB nonce is already over the 8 KiB
// header line common servers accept. A Key keeps at most maxServers
// nonces.
const MaxNonce = 8 << 10
