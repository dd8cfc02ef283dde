package admission

import (
	"fmt"
	"net/http"
	"net/textproto"
	"slices"
	"strings"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Selector is a merchant selector: the placeholder that names the merchant
// a request is for ({http.request.header.X-Merchant-Id}), optionally with a
// default merchant after its first colon, as in Caddy's {$ENV:default}
// ({http.request.header.X-Merchant-Id:acme}): the default is the merchant
// of a request whose placeholder is absent or empty. A selector of several
// placeholders, or of text and placeholders, takes no default; a selector
// without placeholders names one merchant for every request.
type Selector struct {
	placeholder string // the selector without its default, for the replacer
	header      string // canonical header name when the selector is one header placeholder
	def         string // the default merchant; "" none
}

// Replacer expands the placeholders of a request (caddy.Replacer): an
// unknown or empty placeholder becomes empty.
type Replacer interface {
	ReplaceAll(input, empty string) string
}

// headerPrefix starts the placeholders of a request header.
const headerPrefix = "http.request.header."

// ParseSelector reads a merchant selector. The error says what is wrong
// with it: braces that do not pair, an empty placeholder, a default that is
// empty or not a valid merchant id, or a default in a selector that is not
// one placeholder.
func ParseSelector(selector string) (Selector, error) {
	inner, one := strings.CutPrefix(selector, "{")
	if inner, ok := strings.CutSuffix(inner, "}"); one && ok && !strings.ContainsAny(inner, "{}") {
		key, def, hasDef := strings.Cut(inner, ":")
		switch {
		case key == "":
			return Selector{}, fmt.Errorf("selector %q has an empty placeholder: name one, as in {http.request.header.X-Merchant-Id}", selector)
		case shorthand(key):
			return Selector{}, fmt.Errorf("selector %q names a Caddyfile shorthand, which Caddy expands only without a default: write the full placeholder, as in {http.request.header.NAME:default}", selector)
		case hasDef && def == "":
			return Selector{}, fmt.Errorf("selector %q has an empty default after ':': name a merchant, or remove the ':'", selector)
		case hasDef && !config.ValidMerchantID(def):
			return Selector{}, fmt.Errorf("selector %q: default %q is not a merchant id (1 to 128 letters, digits and ._-:@, starting with a letter or digit)", selector, def)
		}
		s := Selector{placeholder: "{" + key + "}", def: def}
		if name, ok := strings.CutPrefix(key, headerPrefix); ok && name != "" {
			s.header = textproto.CanonicalMIMEHeaderKey(name)
		}
		return s, nil
	}
	unpaired := fmt.Errorf("selector %q has braces that do not pair: write a placeholder as {name} or {name:default}", selector)
	depth := 0
	for i := 0; i < len(selector); i++ {
		switch selector[i] {
		case '{':
			depth++
		case '}':
			depth--
		case ':':
			if depth > 0 {
				return Selector{}, fmt.Errorf("selector %q has a default (':') in a placeholder, which only a selector of one placeholder may have", selector)
			}
		}
		if depth < 0 || depth > 1 {
			return Selector{}, unpaired
		}
		if selector[i] == '}' && selector[i-1] == '{' {
			return Selector{}, fmt.Errorf("selector %q has an empty placeholder", selector)
		}
	}
	if depth != 0 {
		return Selector{}, unpaired
	}
	return Selector{placeholder: selector}, nil
}

// shorthand reports whether a placeholder key starts with one of the
// Caddyfile's shorthands for a request's values ({header.NAME} for
// {http.request.header.NAME}...), which the Caddyfile adapter does not
// expand when a default follows the name: the replacer would not know it.
func shorthand(key string) bool {
	prefix, _, ok := strings.Cut(key, ".")
	return ok && slices.Contains([]string{"header", "cookie", "query", "vars", "labels", "path", "re"}, prefix)
}

// Header returns the canonical name of the request header the selector
// reads, when it is one header placeholder; "" otherwise.
func (s *Selector) Header() string { return s.header }

// Merchant reads and checks the merchant of a request, from its header
// (HeaderMerchant) when the selector is one header placeholder, from repl
// otherwise. The default, if any, is the merchant of a request whose
// placeholder is absent or empty. A non-zero code refuses the request.
func (s *Selector) Merchant(hdr http.Header, repl Replacer) (string, errcode.Code) {
	var merchant string
	var code errcode.Code
	if s.header != "" {
		merchant, code = HeaderMerchant(hdr, s.header)
	} else {
		merchant, code = CheckMerchant(repl.ReplaceAll(s.placeholder, ""))
	}
	if code == errcode.MissingMerchant && s.def != "" {
		return s.def, 0
	}
	return merchant, code
}

// HeaderMerchant reads the merchant of a request from its header name (a
// canonical name) and checks it (CheckMerchant). A non-zero code refuses
// the request: a merchant named twice is ambiguous.
func HeaderMerchant(hdr http.Header, name string) (string, errcode.Code) {
	vals := hdr[name]
	if len(vals) > 1 || hasUnderscoreTwin(hdr, name) {
		return "", errcode.AmbiguousMerchant
	}
	if len(vals) == 0 {
		return CheckMerchant("")
	}
	return CheckMerchant(vals[0])
}

// CheckMerchant checks the merchant of a request. A non-zero code refuses
// the request: the merchant is missing or malformed.
func CheckMerchant(merchant string) (string, errcode.Code) {
	switch {
	case merchant == "":
		return "", errcode.MissingMerchant
	case !config.ValidMerchantID(merchant):
		return "", errcode.InvalidMerchant
	}
	return merchant, 0
}

// hasUnderscoreTwin reports whether hdr has a header whose name is name's
// with an underscore or a dot for a hyphen (X-Merchant_Id or X-Merchant.Id
// beside X-Merchant-Id; Go does not canonicalise such names, so it is
// another header to Caddy). A server behind the proxy that folds
// underscores and dots into hyphens (CGI and FastCGI, PHP, WSGI) could read
// it as the merchant: another merchant than the one whose token is set.
// Such a request names the merchant twice: refused as ambiguous.
//
// Caddy's server drops every header name with an underscore or a dot before
// any handler runs, unless the server's expected_underscore_headers or
// expected_dot_headers keeps it (and then drops the hyphenated name): so
// this sees a twin only where the operator asked Caddy to keep one.
func hasUnderscoreTwin(hdr http.Header, name string) bool {
	for k := range hdr {
		// Only a name with an underscore or a dot is compared (and
		// copied): rare.
		if len(k) == len(name) && strings.ContainsAny(k, "_.") && strings.EqualFold(strings.Map(hyphenFold, k), name) {
			return true
		}
	}
	return false
}

// hyphenFold maps an underscore or a dot of a header name to a hyphen, as
// CGI backends fold them (strings.Map).
func hyphenFold(r rune) rune {
	if r == '_' || r == '.' {
		return '-'
	}
	return r
}
