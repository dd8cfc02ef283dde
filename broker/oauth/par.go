package oauth

import (
	"context"
	"encoding/json"
	"fmt"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
	"io"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// push sends a pushed authorization request (RFC 9126) with params,
// authenticated as the token requests are, and returns the request_uri. A
// DPoP nonce challenge is answered as the token requests' are
// (nonceRetry).
func (a *AuthCode) push(ctx context.Context, endpoint string, params url.Values) (string, error) {
	uri, err := a.pushOnce(ctx, endpoint, params)
	if a.src.nonceRetry(err) {
		uri, err = a.pushOnce(ctx, endpoint, params)
	}
	return uri, err
}

// pushOnce builds and sends one pushed authorization request (push).
func (a *AuthCode) pushOnce(ctx context.Context, endpoint string, params url.Values) (string, error) {
	c := a.src.core
	secret, style, auth, err := c.clientAuth(endpoint)
	if err != nil {
		return "", err
	}
	form := url.Values{}
	for k, v := range params {
		form[k] = v
	}
	for k, v := range auth {
		form[k] = v
	}
	form.Set("client_id", c.cfg.ClientID)
	if secret != "" && style == oauth2.AuthStyleInParams {
		form.Set("client_secret", secret)
	}
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return "", fmt.Errorf("PAR endpoint %s: %w", httpclient.Host(endpoint), err)
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if secret != "" && style == oauth2.AuthStyleInHeader {
		req.SetBasicAuth(url.QueryEscape(c.cfg.ClientID), url.QueryEscape(secret))
	}
	secrets := c.sent(secret, auth.Get("client_assertion"))
	resp, err := c.tokenClient.Do(req)
	if err != nil {
		return "", fmt.Errorf("PAR endpoint %s: %w", httpclient.Host(endpoint), broker.RedactURLError(err))
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, broker.MaxResponseBytes))
	if err != nil {
		return "", fmt.Errorf("PAR endpoint %s: reading the answer: %w", httpclient.Host(endpoint), err)
	}
	var out struct {
		RequestURI  string `json:"request_uri"`
		ExpiresIn   any    `json:"expires_in"`
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	_ = json.Unmarshal(body, &out)
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK || out.Error != "" {
		ae := &broker.APIError{Provider: ProviderName, StatusCode: resp.StatusCode, Code: scrub.Secrets(out.Error, secrets...),
			Description: scrub.Secrets(out.Description, secrets...)}
		if ae.Code == "" && ae.Description == "" {
			ae.Description = http.StatusText(resp.StatusCode)
		}
		return "", fmt.Errorf("PAR endpoint %s refused the request: %w", httpclient.Host(endpoint), ae)
	}
	if out.RequestURI == "" || len(out.RequestURI) > 2048 {
		return "", fmt.Errorf("PAR endpoint %s: the answer has no usable request_uri", httpclient.Host(endpoint))
	}
	return out.RequestURI, nil
}
