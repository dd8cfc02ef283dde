package broker

import (
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// Secret is a credential or token value. Its String, GoString and text
// marshalling all print "[REDACTED]", so passing one to a logger, fmt or
// encoding/json by accident never reveals it. Use Reveal where the value is
// really needed (an Authorization header, a request body).
type Secret string

// Reveal returns the secret value itself.
func (s Secret) Reveal() string { return string(s) }

// String implements fmt.Stringer without revealing the value.
func (s Secret) String() string { return scrub.Redacted }

// GoString implements fmt.GoStringer without revealing the value.
func (s Secret) GoString() string { return scrub.Redacted }

// MarshalText implements encoding.TextMarshaler without revealing the value.
func (s Secret) MarshalText() ([]byte, error) { return []byte(scrub.Redacted), nil }

// Fingerprint returns the first 8 hex characters of the SHA-256 of the
// value: enough to correlate log lines, useless to an attacker.
func (s Secret) Fingerprint() string { return Fingerprint(string(s)) }

// Fingerprint returns the first 8 hex characters of the SHA-256 of v.
func Fingerprint(v string) string {
	if v == "" {
		return ""
	}
	sum := sha256.Sum256([]byte(v))
	return hex.EncodeToString(sum[:4])
}

// Token is an access token obtained from a Source.
type Token struct {
	// Value is the access token itself. It prints as [REDACTED].
	Value Secret
	// Type is the token type as the provider spelled it ("Bearer",
	// "BEARER", "bearer", "DPoP"); the broker sends "Bearer", or "DPoP"
	// for a DPoP-bound token (DPoPType, any case).
	Type string
	// Expiry is when the provider says the token stops working. A zero
	// Expiry is not allowed: sources must fill it in (from the response or
	// a configured default).
	Expiry time.Time
	// ID is the provider's identifier of the token, used for revocation
	// (Nuapay's data.id). Empty when the provider has none.
	ID string
	// Scopes are the scopes the provider granted, when it says. In a
	// token from the cache (Entry.Token) the slice is
	// shared with the other tokens of the same grant: never modify it.
	Scopes []string
	// IssuedAt is when the broker received the token (broker clock).
	IssuedAt time.Time
	// RefreshAt is when the broker that minted the token planned its
	// refresh-ahead (within its refresh window); a broker adopting the
	// token from the shared tier keeps it, so that one node of a fleet
	// refreshes when planned and the others adopt. Zero: the broker that
	// caches the token plans it.
	RefreshAt time.Time
	// Status is the HTTP status of the provider's answer that carried the
	// token (Nuapay's 201, OAuth's 200), set by the source that received
	// it; 0 when the source does not say, then taken as 200. A token from
	// the cache or the shared tier has none.
	Status int
}

// Fingerprint identifies the token in logs, spans and admin output.
func (t Token) Fingerprint() string { return t.Value.Fingerprint() }

// Lifetime is the token's whole lifetime as the broker saw it.
func (t Token) Lifetime() time.Duration { return t.Expiry.Sub(t.IssuedAt) }

// ValidAt reports whether the token can still be used at now with at least
// leeway to spare.
func (t Token) ValidAt(now time.Time, leeway time.Duration) bool {
	return t.Value != "" && now.Add(leeway).Before(t.Expiry)
}

// ValidTokenValue reports whether v can go into an HTTP header as a token:
// non-empty, at most 16 KiB, and without control characters, spaces or
// non-ASCII bytes (RFC 6750 b64token is a strict subset of printable ASCII).
func ValidTokenValue(v string) bool {
	if v == "" || len(v) > MaxTokenBytes {
		return false
	}
	for i := 0; i < len(v); i++ {
		c := v[i]
		if c <= ' ' || c >= 0x7f {
			return false
		}
	}
	return true
}

// MaxTokenBytes bounds the size of a token the broker keeps: an access
// token (a large JWT is a few KiB) or a refresh token.
const MaxTokenBytes = 16 << 10
