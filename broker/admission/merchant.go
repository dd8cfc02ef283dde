package admission

import (
	"fmt"
	"net/http"
	"net/textproto"
	"strings"

	"golang.org/x/net/http/httpguts"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Selector is a merchant selector: text and placeholders that name the
// merchant a request is for, expanded by the request's replacer. A selector
// that is one header placeholder ({http.request.header.X-Merchant-Id}) is
// read from the header directly (HeaderMerchant); a selector without
// placeholders names one merchant for every request. A placeholder has no
// default: an absent or empty one is empty.
type Selector struct {
	selector string
	header   string // canonical header name when the selector is one header placeholder
}

// Replacer expands the placeholders of a request (caddy.Replacer): an
// unknown or empty placeholder becomes empty.
type Replacer interface {
	ReplaceAll(input, empty string) string
}

// headerPrefix starts the placeholders of a request header.
const headerPrefix = "http.request.header."

// defaultHint is what an error says about a header placeholder key
// written with a default (http.request.header.NAME:DEFAULT), which a
// placeholder has not at request time: how to give one with Caddy's own
// directives. "" for another key.
func defaultHint(key string) string {
	name, ok := strings.CutPrefix(key, headerPrefix)
	header, def, colon := strings.Cut(name, ":")
	if !ok || !colon || def == "" || !httpguts.ValidHeaderFieldName(header) {
		return ""
	}
	return fmt.Sprintf("; a Caddy placeholder has no default at request time: to give requests without the header a default merchant, use "+
		"`@nomerchant not header %s *` and `request_header @nomerchant %s %s` before token_broker", header, header, def)
}

// ParseSelector reads a merchant selector. expand expands the Caddyfile's
// placeholder shorthands as the Caddyfile adapter does ({header.NAME} to
// {http.request.header.NAME}). It refuses braces that do not pair, an
// empty placeholder, a header placeholder whose name is not a header field
// name ({http.request.header.X-Merchant-Id:acme}: no default), and a
// Caddyfile shorthand, which Caddy does not know at request time.
func ParseSelector(selector string, expand func(string) string) (Selector, error) {
	unpaired := fmt.Errorf("selector %q has braces that do not pair: write a placeholder as {name}, as in {http.request.header.X-Merchant-Id}", selector)
	start := -1
	for i := 0; i < len(selector); i++ {
		switch {
		case selector[i] == '{' && start < 0:
			start = i
		case selector[i] == '{' || selector[i] == '}' && start < 0:
			return Selector{}, unpaired
		case selector[i] == '}':
			if err := checkPlaceholder(selector, selector[start+1:i], expand); err != nil {
				return Selector{}, err
			}
			start = -1
		}
	}
	if start >= 0 {
		return Selector{}, unpaired
	}
	s := Selector{selector: selector}
	if name, ok := strings.CutPrefix(selector, "{"+headerPrefix); ok && strings.IndexByte(name, '}') == len(name)-1 {
		s.header = textproto.CanonicalMIMEHeaderKey(name[:len(name)-1])
	}
	return s, nil
}

// checkPlaceholder checks the placeholder key of selector (between its
// braces).
func checkPlaceholder(selector, key string, expand func(string) string) error {
	if key == "" {
		return fmt.Errorf("selector %q has an empty placeholder: name one, as in {http.request.header.X-Merchant-Id}", selector)
	}
	if name, ok := strings.CutPrefix(key, headerPrefix); ok && !httpguts.ValidHeaderFieldName(name) {
		return fmt.Errorf("selector %q: %q is not a header field name, so no request has it%s", selector, name, defaultHint(key))
	}
	short, def, colon := strings.Cut(key, ":")
	// {file.PATH} is also Caddy's global placeholder of a file's contents.
	if expanded := expand("{" + short + "}"); expanded != "{"+short+"}" && !strings.HasPrefix(key, "file.") {
		hint := ""
		if colon {
			hint = defaultHint(strings.Trim(expanded, "{}") + ":" + def)
		}
		return fmt.Errorf("selector %q: {%s} is a Caddyfile shorthand, which Caddy does not know at request time (the Caddyfile adapter expands it only "+
			"without a ':' after its name, and a JSON config never): write the full placeholder, %s%s", selector, key, expanded, hint)
	}
	return nil
}

// Header returns the canonical name of the request header the selector
// reads, when it is one header placeholder; "" otherwise.
func (s *Selector) Header() string { return s.header }

// Merchant reads and checks the merchant of a request, from its header
// (HeaderMerchant) when the selector is one header placeholder, from repl
// otherwise. A non-zero code refuses the request.
func (s *Selector) Merchant(hdr http.Header, repl Replacer) (string, errcode.Code) {
	if s.header != "" {
		return HeaderMerchant(hdr, s.header)
	}
	return CheckMerchant(repl.ReplaceAll(s.selector, ""))
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
// with an underscore or a dot for a hyphen (X-Merchant_Id beside
// X-Merchant-Id): a backend that folds them into hyphens (CGI, PHP, WSGI)
// could read it as another merchant than the one whose token is set.
// Caddy drops such names unless expected_underscore_headers or
// expected_dot_headers keeps them.
func hasUnderscoreTwin(hdr http.Header, name string) bool {
	for k := range hdr {
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
