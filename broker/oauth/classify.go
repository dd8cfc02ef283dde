package oauth

import (
	"errors"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// Classify implements broker.Classifier for both oauth2 sources:
// invalid_client (RFC 6749 §5.2: client authentication failed) refuses the
// source's client credential, which every merchant of the source shares; a
// refused or missing refresh token (ConsentRequiredError) is one
// merchant's. A use_dpop_nonce that brought a new nonce
// (nonceChallengeError) is sent again at once with it
// (broker.ClassRetryNow); one that got none (no new nonce to send) is
// temporary: the next attempt carries the nonce remembered by then. Any
// other failure is classified by broker.DefaultClass: a failed discovery
// of the endpoints (*DiscoveryError), which fails every merchant of the
// source, whatever its cause, is temporary there, counted by the source's
// breaker, also when the document is wrong as it is
// (DiscoveryError.Transient false, which only the consent callback goes
// by); one answered 429 is rate limited, as the token endpoint's 429 is.
func (*core) Classify(err error) broker.Class {
	var ce *ConsentRequiredError
	var nc *nonceChallengeError
	var ae *broker.APIError
	switch {
	case errors.As(err, &ce):
		return broker.ClassPermanent
	case errors.As(err, &nc):
		return broker.ClassRetryNow
	case errors.As(err, &ae) && ae.Code == "invalid_client":
		return broker.ClassCredential
	case errors.As(err, &ae) && ae.Code == "use_dpop_nonce":
		return broker.ClassTemporary
	}
	return broker.DefaultClass(err)
}
