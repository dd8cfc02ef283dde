package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// ErrNoRevocationEndpoint is returned by Revoke when the provider has no
// revocation endpoint (none configured, none discovered).
var ErrNoRevocationEndpoint = errors.New("the oauth2 provider has no revocation endpoint: set revocation_url")

// RevokeToken implements broker.Revoker: it revokes an access token the
// source issued (token_type_hint=access_token). A merchant's refresh token
// is left alone.
func (c *core) RevokeToken(ctx context.Context, _ broker.Request, tok broker.Token) error {
	return c.Revoke(ctx, tok.Value, "access_token")
}

// Revoke sends an RFC 7009 revocation request: a form POST of token and
// token_type_hint ("access_token", "refresh_token" or empty) with the
// configured client authentication. 200 is success, even for a token the
// provider does not know. It fails with ErrNoRevocationEndpoint when the
// provider has none.
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
	// The assertion audience stays the token endpoint: it names the
	// authorization server (RFC 7523 §3), whichever endpoint is called.
	secret, style, form, err := c.clientAuth(ep.Token)
	if err != nil {
		return err
	}
	form.Set("token", token.Reveal())
	if hint != "" {
		form.Set("token_type_hint", hint)
	}
	if style == oauth2.AuthStyleInParams {
		form.Set("client_id", c.cfg.ClientID)
		if secret != "" {
			form.Set("client_secret", secret)
		}
	}
	hr, err := http.NewRequestWithContext(ctx, http.MethodPost, ep.Revocation, strings.NewReader(form.Encode()))
	if err != nil {
		return fmt.Errorf("oauth2 revoke: building the request: %w", httpclient.RedactURLError(err))
	}
	if style == oauth2.AuthStyleInHeader {
		// RFC 6749 §2.3.1, as x/oauth2 does for the token request.
		hr.SetBasicAuth(url.QueryEscape(c.cfg.ClientID), url.QueryEscape(secret))
	}
	hr.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	hr.Header.Set("Accept", "application/json")
	resp, err := c.cfg.Client.Do(hr)
	if err != nil {
		return fmt.Errorf("oauth2 revocation endpoint %s: %w", httpclient.Host(ep.Revocation), httpclient.RedactURLError(err))
	}
	defer resp.Body.Close()
	data, _, err := httpclient.ReadBody(resp.Body)
	if err != nil {
		return fmt.Errorf("oauth2 revocation endpoint %s: reading the response: %w", httpclient.Host(ep.Revocation), err)
	}
	if resp.StatusCode == http.StatusOK {
		return nil
	}
	ae := &broker.APIError{Provider: ProviderName, StatusCode: resp.StatusCode,
		RetryAfter: broker.ParseRetryAfter(resp.Header.Get("Retry-After"), c.cfg.Now())}
	var e struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	if json.Unmarshal(data, &e) == nil {
		secrets := append(c.sent(secret, form.Get("client_assertion")), token.Reveal())
		ae.Code = scrub.Secrets(e.Error, secrets...)
		ae.Description = scrub.Secrets(e.Description, secrets...)
	}
	if ae.Code == "" && ae.Description == "" {
		ae.Description = http.StatusText(resp.StatusCode)
	}
	ae.Description = "revocation: " + ae.Description
	return ae
}
