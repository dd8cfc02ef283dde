package consentweb

import (
	"net/http"

	"github.com/tokenbroker/caddy-token-broker/broker/callers"
)

// The consent cookie binds the authorization state to the browser that
// opened the link (RFC 9700 §4.7.1): "__Host-token_broker_consent"
// (Secure, HttpOnly, SameSite=Lax, Path=/) on HTTPS or a host that is not
// loopback, "token_broker_consent" (HttpOnly, SameSite=Lax, Path=/) on
// plain HTTP to a loopback host. A callback without the cookie of the
// browser that started it is refused (outcome wrong_browser) and its
// state is left for that browser.

// browserCookie is the name of the consent cookie for r and whether it is
// Secure: "__Host-" prefixed and Secure unless r is plain HTTP to a
// loopback host (a browser keeps no Secure cookie from plain HTTP, but
// one behind a TLS-terminating proxy is on HTTPS).
func browserCookie(r *http.Request) (name string, secure bool) {
	if r.TLS == nil && callers.IsLoopback(r.Host) {
		return consentCookie, false
	}
	return "__Host-" + consentCookie, true
}

// consentCookie is the consent cookie's name, without prefix.
const consentCookie = "token_broker_consent"
