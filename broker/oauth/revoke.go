package oauth

import (
	"context"
	"errors"
	"net/url"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// ErrNoRevocationEndpoint is returned by Revoke when the provider has no
// revocation endpoint (none configured, none discovered).
var ErrNoRevocationEndpoint = errors.New("the oauth2 provider has no revocation endpoint: set revocation_url")

// RevokeToken implements broker.Revoker: it revokes an access token the
// source issued, not the merchant's refresh token.
func (c *core) RevokeToken(ctx context.Context, _ broker.Request, tok broker.Token) error {
	return c.Revoke(ctx, tok.Value, "access_token")
}

// Revoke sends an RFC 7009 revocation request of token with
// token_type_hint hint ("access_token", "refresh_token" or empty). Any 2xx
// is success (RFC 7009 §2.2 reads the status only), whatever the body.
func (c *core) Revoke(ctx context.Context, token broker.Secret, hint string) error {
	if token == "" {
		return errors.New("oauth2 revoke: the token is empty")
	}
	ep, err := c.ep.get(ctx)
	if err != nil {
		return err
	}
	if ep.Revocation == "" {
		return ErrNoRevocationEndpoint
	}
	// The assertion audience is the token endpoint (RFC 7523 §3).
	form := url.Values{"token": {token.Reveal()}}
	if hint != "" {
		form.Set("token_type_hint", hint)
	}
	resp, body, secrets, err := c.postForm(ctx, c.cfg.Client, "oauth2 revocation endpoint", ep.Revocation, ep.Token, form)
	if ae, ok := errors.AsType[*broker.APIError](err); ok && ae.Code == broker.CodeTooLarge && ae.StatusCode >= 200 && ae.StatusCode < 300 {
		return nil
	}
	if err != nil {
		return err
	}
	if resp.StatusCode >= 200 && resp.StatusCode < 300 {
		return nil
	}
	ae := c.refusal(resp, body, append(secrets, token.Reveal()))
	ae.Description = "revocation: " + ae.Description
	return ae
}
