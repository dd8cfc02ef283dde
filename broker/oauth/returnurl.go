package oauth

import (
	"errors"
	"fmt"
	"net/url"
	"strings"

	whatwg "github.com/nlnwa/whatwg-url/url"
)

// The query parameters the callback adds to the return URL. A return URL
// that has one already is refused.
const (
	// ReturnMerchant is the merchant whose consent it was.
	ReturnMerchant = "merchant"
	// ReturnOutcome is "ok" or the refusal reason.
	ReturnOutcome = "outcome"
	// ReturnError is the provider's error code of a provider_error.
	ReturnError = "error"
)

// checkReturnURL reports why u is not on the allow-list, nil when it is.
// A return URL is allowed when the browser, resolving it as the WHATWG URL
// standard says, lands on the scheme and host of an entry and on its path,
// or under it for an entry ending in "/"; and when neither the browser nor
// the app's server can read it differently: no control character, space,
// backslash, user info or fragment, a query that parses without the
// parameters the callback adds, no dot segment however encoded, and no ";"
// (a path parameter, "..;" to some servers) or encoded "/", "\" or ";" in
// a path segment.
func checkReturnURL(allow []string, u string) error {
	if len(u) > MaxReturnURLLength {
		return fmt.Errorf("it is %d bytes long; at most %d", len(u), MaxReturnURLLength)
	}
	for _, c := range []byte(u) {
		if c <= ' ' || c == 0x7f || c == '\\' {
			return errors.New("it contains a control character, a space or a backslash")
		}
	}
	if strings.Contains(u, "#") {
		return errors.New("it has a fragment")
	}
	bu, err := whatwg.Parse(u)
	if err != nil || bu.Username() != "" || bu.Password() != "" || bu.Host() == "" || (bu.Scheme() != "https" && bu.Scheme() != "http") {
		return errors.New("it is not an absolute http(s) URL without user info")
	}
	nu, err := url.Parse(u)
	if err != nil || nu.Opaque != "" || strings.ToLower(nu.Host) != bu.Host() {
		return errors.New("its host does not read the same in a browser and on a server: write it in lower case, without default port")
	}
	q, err := url.ParseQuery(nu.RawQuery)
	if err != nil {
		return errors.New("its query is malformed (a \";\" between parameters, or a bad escape): separate parameters with \"&\" and percent-encode values")
	}
	for _, name := range []string{ReturnMerchant, ReturnOutcome, ReturnError} {
		if q.Has(name) {
			return fmt.Errorf("its query has the parameter %q, which the callback sets on the redirect (merchant, outcome, error): the app would read the link's value instead of the consent's", name)
		}
	}
	path := bu.Pathname()
	if nu.EscapedPath() != path && !(nu.EscapedPath() == "" && path == "/") {
		return errors.New("a browser would request another path (dot segments or encoding)")
	}
	for _, seg := range strings.Split(path, "/") {
		lower := strings.ToLower(seg)
		dec, err := url.PathUnescape(seg)
		if err != nil || dec == "." || dec == ".." || strings.ContainsAny(dec, ";\\") || strings.Contains(lower, "%2f") || strings.ContainsFunc(dec, func(r rune) bool { return r < ' ' || r == 0x7f }) {
			return errors.New("its path has a dot segment, a \";\" or an encoded \"/\", \"\\\" or control character")
		}
	}
	for _, e := range allow {
		eu, err := whatwg.Parse(e)
		if err != nil || eu.Scheme() != bu.Scheme() || eu.Host() != bu.Host() {
			continue
		}
		ep := eu.Pathname()
		if path == ep || strings.HasSuffix(ep, "/") && strings.HasPrefix(path, ep) {
			return nil
		}
	}
	return errors.New("it is not on the provider's return_urls allow-list")
}
