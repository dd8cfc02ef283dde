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
	c *core
}

// NewClientCredentials returns a client credentials source.
func NewClientCredentials(cfg Config) (*ClientCredentials, error) {
	c, err := newCore(cfg)
	if err != nil {
		return nil, err
	}
	return &ClientCredentials{c: c}, nil
}

// Type names the source type for the broker's errors and metrics.
func (s *ClientCredentials) Type() string { return ProviderName }

// Token requests a token for req.
func (s *ClientCredentials) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	t, _, err := s.c.exchange(ctx, req, nil)
	return t, err
}

// Endpoints returns the provider's endpoints, discovering them if needed.
func (s *ClientCredentials) Endpoints(ctx context.Context) (Endpoints, error) {
	ep, err := s.c.ep.get(ctx)
	if err != nil {
		return Endpoints{}, err
	}
	return *ep, nil
}

// Revoke revokes a token at the provider's revocation endpoint (RFC 7009).
// hint is the token_type_hint ("access_token", "refresh_token") or empty.
// It fails with ErrNoRevocationEndpoint when the provider has none.
func (s *ClientCredentials) Revoke(ctx context.Context, token broker.Secret, hint string) error {
	return s.c.revoke(ctx, token, hint)
}

// RevokeToken implements broker.Revoker: it revokes an access token the
// source issued (token_type_hint=access_token).
func (s *ClientCredentials) RevokeToken(ctx context.Context, _ broker.Request, tok broker.Token) error {
	return s.c.revoke(ctx, tok.Value, "access_token")
}

var (
	_ broker.Source  = (*ClientCredentials)(nil)
	_ broker.Revoker = (*ClientCredentials)(nil)
)
