package dpop

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"encoding/base64"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"time"

	"golang.org/x/net/http/httpguts"
)

// b64 is the encoding of JWS parts.
var b64 = base64.RawURLEncoding

// Proof returns a fresh DPoP proof (a compact JWS) for a request with
// method htm to htu (see HTU) at now: header {typ: dpop+jwt, alg, jwk},
// claims {jti: 128 random bits, htm, htu, iat, ath (when not empty: ATH of
// the access token the request carries), nonce (when not empty: the
// server's DPoP-Nonce)}. An invalid nonce (not RFC 9449 NQCHAR, or over
// MaxNonce bytes) is refused.
func (k *Key) Proof(htm, htu, ath, nonce string, now time.Time) (string, error) {
	if k == nil {
		return "", errNoKey
	}
	if nonce != "" && !checkNonce(nonce) {
		if len(nonce) > MaxNonce {
			return "", fmt.Errorf("DPoP proof: the server's nonce has %d bytes, over the limit of %d", len(nonce), MaxNonce)
		}
		return "", errors.New("DPoP proof: the server's nonce holds characters a nonce may not (RFC 9449 §8.1)")
	}
	var jti [16]byte
	if _, err := rand.Read(jti[:]); err != nil {
		return "", fmt.Errorf("DPoP proof: %w", err)
	}
	var cbuf [512]byte
	c := append(cbuf[:0], `{"jti":"`...)
	c = b64.AppendEncode(c, jti[:])
	c = append(c, `","htm":`...)
	c = appendJSONString(c, htm)
	c = append(c, `,"htu":`...)
	c = appendJSONString(c, htu)
	c = append(c, `,"iat":`...)
	c = strconv.AppendInt(c, now.Unix(), 10)
	if ath != "" {
		c = append(c, `,"ath":`...)
		c = appendJSONString(c, ath)
	}
	if nonce != "" {
		c = append(c, `,"nonce":"`...)
		c = append(c, nonce...)
		c = append(c, '"')
	}
	c = append(c, '}')

	buf := make([]byte, 0, len(k.header)+b64.EncodedLen(len(c))+1+b64.EncodedLen(k.sigLen()))
	buf = append(buf, k.header...)
	buf = b64.AppendEncode(buf, c)
	sig, err := k.sign(buf)
	if err != nil {
		return "", fmt.Errorf("DPoP proof: signing with %s: %w", k.alg, err)
	}
	buf = append(buf, '.')
	buf = b64.AppendEncode(buf, sig)
	return string(buf), nil
}

// sigLen is the length of the key's JWS signatures.
func (k *Key) sigLen() int {
	if r, ok := k.signer.(*rsa.PrivateKey); ok {
		return r.Size()
	}
	return 64 // ES256: r and s, 32 bytes each; EdDSA: Ed25519
}

// sign returns the JWS signature of input (RFC 7518 §3.4, §3.5; RFC 8037).
func (k *Key) sign(input []byte) ([]byte, error) {
	switch key := k.signer.(type) {
	case ed25519.PrivateKey:
		return ed25519.Sign(key, input), nil
	case *ecdsa.PrivateKey:
		d := sha256.Sum256(input)
		r, s, err := ecdsa.Sign(rand.Reader, key, d[:])
		if err != nil {
			return nil, err
		}
		sig := make([]byte, 64) // r and s, 32 big-endian bytes each (RFC 7518 §3.4)
		r.FillBytes(sig[:32])
		s.FillBytes(sig[32:])
		return sig, nil
	case *rsa.PrivateKey:
		d := sha256.Sum256(input)
		return rsa.SignPSS(rand.Reader, key, crypto.SHA256, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	}
	return nil, fmt.Errorf("unsupported key type %T", k.signer)
}

// appendJSONString appends s as a JSON string. The values of a proof
// (methods, URLs, hashes) are ASCII; quotes, backslashes and control
// characters are escaped.
func appendJSONString(b []byte, s string) []byte {
	const hex = "0123456789abcdef"
	b = append(b, '"')
	for i := 0; i < len(s); i++ {
		switch ch := s[i]; {
		case ch == '"' || ch == '\\':
			b = append(b, '\\', ch)
		case ch < 0x20:
			b = append(b, '\\', 'u', '0', '0', hex[ch>>4], hex[ch&0xf])
		default:
			b = append(b, ch)
		}
	}
	return append(b, '"')
}

// ATH returns the ath claim of a proof that accompanies token:
// base64url(SHA-256(token)).
func ATH(token string) string {
	sum := sha256.Sum256([]byte(token))
	return b64.EncodeToString(sum[:])
}

// HTU returns the htu claim for a request to u (RFC 9449 §4.2): scheme,
// host and path, without query or fragment; scheme and host lower-case,
// the scheme's default port left out, a host name with non-ASCII letters
// in Punycode (as it is sent), an empty path "/".
func HTU(u *url.URL) string {
	path := u.EscapedPath()
	if path == "" {
		path = "/"
	}
	var b [256]byte
	return string(append(appendOrigin(b[:0], u), path...))
}

// appendOrigin appends the origin of u to b: scheme://host[:port],
// lower-case and without the scheme's default port, the host as it is
// sent (WireHost); the key of a server's remembered nonce (Nonce,
// SetNonce).
func appendOrigin(b []byte, u *url.URL) []byte {
	host := WireHost(u.Host)
	if p := defaultPort(u.Scheme); p != "" && len(host) > len(p) && host[len(host)-len(p):] == p {
		host = host[:len(host)-len(p)]
	}
	b = appendLower(b, u.Scheme)
	b = append(b, "://"...)
	return appendLower(b, host)
}

// WireHost returns host (host[:port]) as Go's HTTP client sends it in the
// Host header: a name with non-ASCII letters in Punycode (RFC 3492). An
// ASCII host is returned as it is, and so is one Punycode refuses, which
// the client does not send at all. It allocates only for a non-ASCII
// host.
func WireHost(host string) string {
	if h, err := httpguts.PunycodeHostPort(host); err == nil {
		return h
	}
	return host
}

// defaultPort is ":443" for https, ":80" for http (any case), else "".
func defaultPort(scheme string) string {
	switch {
	case strings.EqualFold(scheme, "https"):
		return ":443"
	case strings.EqualFold(scheme, "http"):
		return ":80"
	}
	return ""
}

// appendLower appends s with ASCII letters in lower case.
func appendLower(b []byte, s string) []byte {
	for i := 0; i < len(s); i++ {
		ch := s[i]
		if 'A' <= ch && ch <= 'Z' {
			ch += 'a' - 'A'
		}
		b = append(b, ch)
	}
	return b
}
