package broker

import (
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// Secret is a credential or token value that prints, formats and
// marshals as "[REDACTED]". Reveal returns the value itself.
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
	// Type is the token type as the provider spelled it; the broker sends
	// "DPoP" for DPoPType (any case), else "Bearer".
	Type string
	// Expiry is when the token stops working; sources must set it.
	Expiry time.Time
	// ID is the provider's identifier of the token, used for revocation
	// (Nuapay's data.id). Empty when the provider has none.
	ID string
	// Scopes are the scopes the provider granted, when it says. From the
	// cache (Entry.Token) the slice is shared: never modify it.
	Scopes []string
	// IssuedAt is when the broker received the token (broker clock).
	IssuedAt time.Time
	// RefreshAt is when the broker that minted the token planned its
	// refresh-ahead; a broker adopting it from the shared tier keeps it,
	// so that one node refreshes and the others adopt. Zero: the broker
	// that caches the token plans it.
	RefreshAt time.Time
	// Status is the HTTP status of the provider's answer that carried the
	// token; 0 when the source does not say (taken as 200) and for a
	// token from a cache.
	Status int
}

// Fingerprint identifies the token in logs, spans and admin output.
func (t Token) Fingerprint() string { return t.Value.Fingerprint() }

// issuedBy sets IssuedAt to now when it is unset or after now.
func (t *Token) issuedBy(now time.Time) {
	if t.IssuedAt.IsZero() || t.IssuedAt.After(now) {
		t.IssuedAt = now
	}
}

// Lifetime is the token's whole lifetime as the broker saw it.
func (t Token) Lifetime() time.Duration { return t.Expiry.Sub(t.IssuedAt) }

// ValidAt reports whether the token can still be used at now with at least
// leeway to spare.
func (t Token) ValidAt(now time.Time, leeway time.Duration) bool {
	return t.Value != "" && now.Add(leeway).Before(t.Expiry)
}

// ValidTokenValue reports whether v can go into an HTTP header as a token:
// non-empty, at most MaxTokenBytes, printable ASCII without spaces.
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
