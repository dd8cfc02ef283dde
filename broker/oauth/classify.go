package oauth

import (
	"errors"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// Classify implements broker.Classifier for both sources. invalid_client
// (RFC 6749 §5.2) refuses the client credential every merchant of the
// source shares; a ConsentRequiredError is one merchant's. A
// use_dpop_nonce that brought a new nonce is sent again at once; one
// without (nothing new to send) is temporary. Anything else goes by
// broker.DefaultClass, where a *DiscoveryError is temporary whatever
// DiscoveryError.Transient says, and one answered 429 is rate limited.
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
