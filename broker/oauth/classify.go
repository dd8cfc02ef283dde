package oauth

import (
	"errors"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// classify is the oauth2 sources' broker.Classifier: invalid_client (RFC
// 6749 §5.2: client authentication failed) refuses the source's client
// credential, which every merchant of the source shares; a refused or
// missing refresh token (ConsentRequiredError) is one merchant's.
func classify(err error) broker.Class {
	var ce *ConsentRequiredError
	var ae *broker.APIError
	switch {
	case errors.As(err, &ce):
		return broker.ClassPermanent
	case errors.As(err, &ae) && ae.Code == "invalid_client":
		return broker.ClassCredential
	}
	return broker.DefaultClass(err)
}

// Classify implements broker.Classifier.
func (s *ClientCredentials) Classify(err error) broker.Class { return classify(err) }

// Classify implements broker.Classifier.
func (s *RefreshToken) Classify(err error) broker.Class { return classify(err) }

var (
	_ broker.Classifier = (*ClientCredentials)(nil)
	_ broker.Classifier = (*RefreshToken)(nil)
)
