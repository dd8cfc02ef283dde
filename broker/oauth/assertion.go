package oauth

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"encoding/base64"
	"fmt"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tokenbroker/caddy-token-broker/internal/pemkey"
)

// Signing algorithms of client assertions. UK Open Banking and FAPI want
// PS256 or ES256; RS256 is there for older servers.
const (
	PS256 = string(jose.PS256)
	ES256 = string(jose.ES256)
	RS256 = string(jose.RS256)
)

// ClientAssertionType is the client_assertion_type of RFC 7523 §2.2.
const ClientAssertionType = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer"

// minRSABits is the smallest RSA key accepted for signing.
const minRSABits = 2048

// Signer signs private_key_jwt client assertions (RFC 7523 §3) with one
// private key. It is safe for concurrent use.
type Signer struct {
	signer jose.Signer
	alg    string
}

// Alg returns the signing algorithm of the assertions (PS256, ES256 or
// RS256).
func (s *Signer) Alg() string { return s.alg }

// ParsePrivateKey reads the first private key of a PEM file: PKCS#1
// ("RSA PRIVATE KEY"), PKCS#8 ("PRIVATE KEY") or SEC1 ("EC PRIVATE KEY").
// Other blocks (certificates, "EC PARAMETERS") are skipped. Only RSA and EC
// keys sign client assertions. Errors never quote the key.
func ParsePrivateKey(pemBytes []byte) (crypto.Signer, error) {
	key, err := pemkey.Parse(pemBytes)
	if err != nil {
		return nil, err
	}
	switch key.(type) {
	case *rsa.PrivateKey, *ecdsa.PrivateKey:
		return key, nil
	}
	return nil, fmt.Errorf("unsupported private key type %T: use an RSA or EC P-256 key", key)
}

// NewSigner returns a signer for key. alg is PS256, RS256 (RSA keys of at
// least 2048 bits) or ES256 (EC P-256 keys); empty means PS256 for an RSA
// key and ES256 for an EC key. keyID is the kid header; empty means the
// key's RFC 7638 SHA-256 thumbprint, base64url-encoded.
func NewSigner(key crypto.Signer, alg, keyID string) (*Signer, error) {
	switch k := key.(type) {
	case *rsa.PrivateKey:
		if alg == "" {
			alg = PS256
		}
		if alg != PS256 && alg != RS256 {
			return nil, fmt.Errorf("signing algorithm %q does not fit an RSA key: use PS256 or RS256", alg)
		}
		if k.N.BitLen() < minRSABits {
			return nil, fmt.Errorf("the RSA key has %d bits: at least %d are needed", k.N.BitLen(), minRSABits)
		}
	case *ecdsa.PrivateKey:
		if alg == "" {
			alg = ES256
		}
		if alg != ES256 {
			return nil, fmt.Errorf("signing algorithm %q does not fit an EC key: use ES256", alg)
		}
		if k.Curve != elliptic.P256() {
			return nil, fmt.Errorf("the EC key is on %s: ES256 needs P-256", k.Curve.Params().Name)
		}
	default:
		return nil, fmt.Errorf("unsupported private key type %T: use an RSA or EC P-256 key", key)
	}
	if keyID == "" {
		tp, err := (&jose.JSONWebKey{Key: key.Public()}).Thumbprint(crypto.SHA256)
		if err != nil {
			return nil, fmt.Errorf("computing the key thumbprint: %w", err)
		}
		keyID = base64.RawURLEncoding.EncodeToString(tp)
	}
	opts := (&jose.SignerOptions{}).WithType("JWT").WithHeader(jose.HeaderKey("kid"), keyID)
	s, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.SignatureAlgorithm(alg), Key: key}, opts)
	if err != nil {
		return nil, fmt.Errorf("creating the %s signer: %w", alg, err)
	}
	return &Signer{signer: s, alg: alg}, nil
}

// Assertion returns a fresh client assertion: iss = sub = clientID, aud =
// audience, a random jti, iat = now and exp = now + AssertionLifetime.
func (s *Signer) Assertion(clientID, audience string, now time.Time) (string, error) {
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", fmt.Errorf("client assertion: %w", err)
	}
	claims := jwt.Claims{
		Issuer:   clientID,
		Subject:  clientID,
		Audience: jwt.Audience{audience},
		ID:       base64.RawURLEncoding.EncodeToString(jti[:]),
		IssuedAt: jwt.NewNumericDate(now),
		Expiry:   jwt.NewNumericDate(now.Add(AssertionLifetime)),
	}
	out, err := jwt.Signed(s.signer).Claims(claims).Serialize()
	if err != nil {
		return "", fmt.Errorf("signing the client assertion: %w", err)
	}
	return out, nil
}

// jwtAlgorithms are the algorithms accepted when reading (not verifying)
// an access token's claims.
var jwtAlgorithms = []jose.SignatureAlgorithm{
	jose.RS256, jose.RS384, jose.RS512, jose.PS256, jose.PS384, jose.PS512,
	jose.ES256, jose.ES384, jose.ES512, jose.HS256, jose.HS384, jose.HS512, jose.EdDSA,
}

// jwtExpiry reads the exp claim of an access token that is a signed JWT,
// without verifying it: the token is opaque to the broker, which only wants
// to know how long to keep it. ok is false when the token is not a JWS
// compact serialisation or has no exp.
func jwtExpiry(token string) (exp time.Time, ok bool) {
	if strings.Count(token, ".") != 2 {
		return time.Time{}, false
	}
	t, err := jwt.ParseSigned(token, jwtAlgorithms)
	if err != nil {
		return time.Time{}, false
	}
	var c jwt.Claims
	if err := t.UnsafeClaimsWithoutVerification(&c); err != nil || c.Expiry == nil {
		return time.Time{}, false
	}
	return c.Expiry.Time(), true
}
