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
// of header that has an error parameter, with the error_description of
// the same challenge. The fields are read as RFC 9110 §11.6.1 lets a
// server write them: one field may hold several challenges, separated by
// commas; a parameter's name is matched in any letter case; its value is
// a token or a quoted-string (commas, "=" and quoted-pairs inside it are
// part of the value), with optional white space around "=". Of a
// parameter given twice in one challenge, the first counts. A value
// without a quoted-pair is a part of the field: reading allocates nothing
// then.
func Errors(header http.Header) iter.Seq[Challenge] {
	return func(yield func(Challenge) bool) {
		for _, field := range header["Www-Authenticate"] { // by its canonical key: Values canonicalizes the key it is given
			var c Challenge
			hasError, hasDescription := false, false
			for s := field; s != ""; {
				var name string
				if name, s = cutToken(s); name == "" {
					s = s[1:] // a comma, white space, or what no token holds
					continue
				}
				rest := strings.TrimLeft(s, " \t")
				if !strings.HasPrefix(rest, "=") {
					// A name without "=" starts a challenge (or is its token68).
					if hasError && !yield(c) {
						return
					}
					c, hasError, hasDescription = Challenge{Scheme: name}, false, false
					continue
				}
				var value string
				value, s = cutParamValue(strings.TrimLeft(rest[1:], " \t"))
				switch {
				case !hasError && strings.EqualFold(name, "error"):
					c.Error, hasError = value, true
				case !hasDescription && strings.EqualFold(name, "error_description"):
					c.Description, hasDescription = value, true
				}
			}
			if hasError && !yield(c) {
				return
			}
		}
	}
}

// Error returns the first challenge of the WWW-Authenticate fields of
// header that has an error parameter (Errors) and is of one of schemes,
// matched in any letter case (of any scheme when none is given), and
// whether there is one.
func Error(header http.Header, schemes ...string) (Challenge, bool) {
	for c := range Errors(header) {
		if len(schemes) == 0 {
			return c, true
		}
		for _, s := range schemes {
			if strings.EqualFold(c.Scheme, s) {
				return c, true
			}
		}
	}
	return Challenge{}, false
}

// cutToken returns the token (RFC 9110 §5.6.2) s starts with, "" when
// none, and the rest of s.
func cutToken(s string) (token, rest string) {
	i := 0
	for i < len(s) && (s[i] >= 'a' && s[i] <= 'z' || s[i] >= 'A' && s[i] <= 'Z' || s[i] >= '0' && s[i] <= '9' ||
		strings.IndexByte("!#$%&'*+-.^_`|~", s[i]) >= 0) {
		i++
	}
	return s[:i], s[i:]
}

// cutParamValue returns the parameter value s starts with, a token or a
// quoted-string (RFC 9110 §5.6.4, unquoted), and the rest of s.
func cutParamValue(s string) (value, rest string) {
	if !strings.HasPrefix(s, `"`) {
		return cutToken(s)
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
