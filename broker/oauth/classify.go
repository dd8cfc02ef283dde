package oauth

import (
	"errors"
	"net/http"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// Classify implements broker.Classifier for both oauth2 sources: a
// refusal of the client (clientRefused) is of the source's client
// credential or registration, which every merchant of the source shares;
// a refused or missing refresh token (ConsentRequiredError) is one
// merchant's. A use_dpop_nonce that brought a new nonce
// (nonceChallengeError) is sent again at once with it
// (broker.ClassRetryNow); one that got none (no new nonce to send) is
// temporary: the next attempt carries the nonce remembered by then.
func (*core) Classify(err error) broker.Class {
	var ce *ConsentRequiredError
	var nc *nonceChallengeError
	var ae *broker.APIError
	switch {
	case errors.As(err, &ce):
		return broker.ClassPermanent
	case errors.As(err, &nc):
		return broker.ClassRetryNow
	case errors.As(err, &ae) && ae.Code == "use_dpop_nonce":
		return broker.ClassTemporary
	case errors.As(err, &ae) && clientRefused(ae):
		return broker.ClassCredential
	}
	return broker.DefaultClass(err)
}

// clientRefused reports whether an endpoint's refusal ae is of the client
// itself, not of one request (RFC 6749 §5.2): invalid_client (its
// authentication failed), unauthorized_client (it may not use the grant;
// Keycloak also answers it, with 401, to a wrong secret or assertion), or
// a 401 without an error code (the status a server answers a failed
// client authentication with, the body an HTML page or empty).
func clientRefused(ae *broker.APIError) bool {
	switch ae.Code {
	case "invalid_client", "unauthorized_client":
		return true
	case "":
		return ae.StatusCode == http.StatusUnauthorized
	}
	return false
}
