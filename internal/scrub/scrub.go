// Package scrub keeps secrets out of what a provider says back: a token
// API that echoes a credential in an error must not put it in a log line,
// a span or an error body (Secrets), and a provider's text is cut to a
// bounded length (Truncate, MaxText).
package scrub

import (
	"encoding/base64"
	"net/url"
	"strings"
	"unicode/utf8"
)

// Redacted is what a scrubbed secret becomes.
const Redacted = "[REDACTED]"

// MaxText is the length a provider-supplied text is cut to.
const MaxText = 500

// Secrets replaces every secret of at least 4 bytes in s with [REDACTED]:
// as sent, form-encoded, and base64-encoded (inside a Basic credential),
// then cuts the result to MaxText. Pass a Basic credential itself too
// when the header was sent: it encodes more than one secret.
func Secrets(s string, secrets ...string) string {
	for _, v := range secrets {
		if len(v) < 4 {
			continue
		}
		for _, form := range []string{v, url.QueryEscape(v), base64.StdEncoding.EncodeToString([]byte(v))} {
			s = strings.ReplaceAll(s, form, Redacted)
		}
	}
	return Truncate(s, MaxText)
}

// Truncate cuts s to at most max bytes (on a rune boundary) and marks the
// cut with "…".
func Truncate(s string, max int) string {
	if len(s) <= max {
		return s
	}
	cut := max
	for cut > 0 && !utf8.RuneStart(s[cut]) {
		cut--
	}
	return s[:cut] + "…"
}
