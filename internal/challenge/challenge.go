// Package challenge reads the error a server gives in its
// WWW-Authenticate challenges (RFC 6750 §3, RFC 9449 §7.1): the one
// tokenizer of those fields, for the upstream answers (broker/outbound)
// and the authorization servers' (broker/oauth).
package challenge

import (
	"iter"
	"net/http"
	"strings"
)

// Challenge is one challenge of a WWW-Authenticate field that has an
// error parameter: its scheme (as the server spelled it; "" when the
// field starts with a parameter) and its error and error_description
// parameters, unquoted.
type Challenge struct {
	Scheme      string
	Error       string
	Description string
}

// Errors yields, in order, each challenge of the WWW-Authenticate fields
// of header that has an error parameter, with its error_description. The
// fields are read as RFC 9110 §11.6.1 lets a server write them: several
// comma-separated challenges in one field; a challenge starts at a word
// without "=" at the start of a field, after a comma, or before the
// challenge's first parameter (a word after a parameter and white space,
// as in algs=ES256 PS256, counts for nothing); a token68 is one word.
// Parameter names match in any letter case; a value is a token, token68
// or quoted-string, with optional white space around "="; of a parameter
// given twice, the first counts. Reading allocates only for a value with a
// quoted-pair.
func Errors(header http.Header) iter.Seq[Challenge] {
	return func(yield func(Challenge) bool) {
		for _, field := range header["Www-Authenticate"] {
			var c Challenge
			hasError, hasDescription := false, false
			hasParam, afterComma := false, false // a parameter read in c; a comma since the last item
			for s := field; s != ""; {
				switch s[0] {
				case ',':
					afterComma = true
					s = s[1:]
					continue
				case ' ', '\t':
					s = s[1:]
					continue
				}
				word, rest := cutWord(s)
				if word == "" || !endsItem(rest) {
					// Not a lone word: a parameter, or a name followed by one.
					var name string
					if name, s = cutToken(s); name == "" {
						s = s[1:] // what no token holds
						afterComma = false
						continue
					}
					if rest = strings.TrimLeft(s, " \t"); strings.HasPrefix(rest, "=") {
						var value string
						value, s = cutParamValue(strings.TrimLeft(rest[1:], " \t"))
						hasParam, afterComma = true, false
						switch {
						case !hasError && strings.EqualFold(name, "error"):
							c.Error, hasError = value, true
						case !hasDescription && strings.EqualFold(name, "error_description"):
							c.Description, hasDescription = value, true
						}
						continue
					}
					word = name
				}
				s = rest
				// A word without "=": a scheme, which starts a challenge, at
				// the start or after a comma, or before any parameter (a
				// token68 is read as one too); after a parameter without a
				// comma between, a word of an unquoted value (algs=ES256
				// PS256), which counts for nothing.
				if hasParam && !afterComma {
					continue
				}
				if hasError && !yield(c) {
					return
				}
				c, hasError, hasDescription, hasParam, afterComma = Challenge{Scheme: word}, false, false, false, false
			}
			if hasError && !yield(c) {
				return
			}
		}
	}
}

// Error returns the first challenge of the WWW-Authenticate fields of
// header that has an error parameter (Errors), and whether there is one.
func Error(header http.Header) (Challenge, bool) {
	for c := range Errors(header) {
		return c, true
	}
	return Challenge{}, false
}

// TokenError reports whether a challenge of the Bearer or DPoP scheme
// (any letter case) in header has the error parameter code: what an
// upstream says of the token a request carried (RFC 6750 §3.1, RFC 9449
// §7.1).
func TokenError(header http.Header, code string) bool {
	for c := range Errors(header) {
		if (strings.EqualFold(c.Scheme, "Bearer") || strings.EqualFold(c.Scheme, "DPoP")) && c.Error == code {
			return true
		}
	}
	return false
}

// cutToken returns the token (RFC 9110 §5.6.2) s starts with, "" when
// none, and the rest of s.
func cutToken(s string) (token, rest string) {
	i := 0
	for i < len(s) && isTokenChar(s[i]) {
		i++
	}
	return s[:i], s[i:]
}

// isTokenChar reports whether b is a tchar (RFC 9110 §5.6.2).
func isTokenChar(b byte) bool {
	return b >= 'a' && b <= 'z' || b >= 'A' && b <= 'Z' || b >= '0' && b <= '9' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", b) >= 0
}

// cutWord returns the word s starts with, "" when none, and the rest of
// s: a token (RFC 9110 §5.6.2) or a token68 (RFC 9110 §11.2), that is a
// run of token characters and "/", then any "=".
func cutWord(s string) (word, rest string) {
	i := 0
	for i < len(s) && (isTokenChar(s[i]) || s[i] == '/') {
		i++
	}
	for i > 0 && i < len(s) && s[i] == '=' {
		i++
	}
	return s[:i], s[i:]
}

// endsItem reports whether s, after optional white space, is empty or
// starts with the comma that ends a list item.
func endsItem(s string) bool {
	s = strings.TrimLeft(s, " \t")
	return s == "" || s[0] == ','
}

// cutParamValue returns the parameter value s starts with, a token or a
// quoted-string (RFC 9110 §5.6.4, unquoted), and the rest of s.
func cutParamValue(s string) (value, rest string) {
	if !strings.HasPrefix(s, `"`) {
		return cutWord(s)
	}
	// A value without a quoted-pair is a part of s; one with a quoted-pair
	// is copied into b from its first backslash on.
	var b strings.Builder
	copied := false
	for i := 1; i < len(s); i++ {
		switch s[i] {
		case '"':
			if !copied {
				return s[1:i], s[i+1:]
			}
			return b.String(), s[i+1:]
		case '\\':
			if !copied {
				b.WriteString(s[1:i])
				copied = true
			}
			if i+1 < len(s) {
				i++
			}
		}
		if copied {
			b.WriteByte(s[i])
		}
	}
	if !copied {
		return s[1:], ""
	}
	return b.String(), ""
}
