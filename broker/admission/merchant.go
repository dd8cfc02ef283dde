package admission

import (
	"net/http"
	"net/textproto"
	"strings"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// PlaceholderHeader returns the canonical name of the request header that
// a merchant selector reads when it is exactly one header placeholder
// ({http.request.header.NAME}), so that the merchant is read from the
// header directly (HeaderMerchant); "" for any other selector.
func PlaceholderHeader(selector string) string {
	name, ok := strings.CutPrefix(selector, "{http.request.header.")
	if !ok || !strings.HasSuffix(name, "}") || strings.ContainsAny(name[:len(name)-1], "{}") {
		return ""
	}
	return textproto.CanonicalMIMEHeaderKey(name[:len(name)-1])
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
