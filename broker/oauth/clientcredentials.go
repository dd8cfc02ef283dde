package oauth

import (
	"context"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// ClientCredentials is a broker.Source for the client credentials grant
// (RFC 6749 §4.4): grant_type=client_credentials, the request's scopes
// space-joined in scope, audience (the request's, else the configured one),
// resource and the configured extra parameters, with the configured client
// authentication. It is safe for concurrent use.
type ClientCredentials struct {
	*core
}

// NewClientCredentials returns a client credentials source.
func NewClientCredentials(cfg Config) (*ClientCredentials, error) {
	c, err := newCore(cfg)
	if err != nil {
		return nil, err
	}
	return &ClientCredentials{core: c}, nil
}

// Token requests a token for req.
func (s *ClientCredentials) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	t, _, err := s.exchange(ctx, req, nil)
	return t, err
}

var (
	_ broker.Source      = (*ClientCredentials)(nil)
	_ broker.Revoker     = (*ClientCredentials)(nil)
	_ broker.Classifier  = (*ClientCredentials)(nil)
	_ broker.DPoPBound   = (*ClientCredentials)(nil)
	_ broker.CallBounded = (*ClientCredentials)(nil)
)
