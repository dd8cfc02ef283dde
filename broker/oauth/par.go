package oauth

import (
	"context"
	"fmt"
	"net/http"
	"net/url"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// push sends a pushed authorization request (RFC 9126) with params to
// endpoint, with a proof of the DPoP key k when not nil, and returns the
// request_uri; a nonce challenge is answered with a second request.
func (a *AuthCode) push(ctx context.Context, endpoint string, k *dpop.Key, params url.Values) (string, error) {
	return nonceRetried(func() (string, error) {
		carried := a.src.tokenNonce(endpoint)
		uri, err := a.pushOnce(ctx, endpoint, k, params)
		return uri, a.src.nonceChallenged(err, endpoint, carried)
	})
}

// pushOnce builds and sends one pushed authorization request (push).
func (a *AuthCode) pushOnce(ctx context.Context, endpoint string, k *dpop.Key, params url.Values) (string, error) {
	form := url.Values{}
	for k, v := range params {
		form[k] = v
	}
	c := a.src.core
	resp, body, secrets, err := c.postForm(ctx, c.tokenClient(k), "PAR endpoint", endpoint, endpoint, form)
	if err != nil {
		return "", err
	}
	get, _ := answerFields(resp, body)
	if resp.StatusCode != http.StatusCreated && resp.StatusCode != http.StatusOK || get("error") != "" {
		// The state is scrubbed as well: a provider may quote it.
		return "", fmt.Errorf("PAR endpoint %s refused the request: %w", httpclient.Host(endpoint), c.refusal(resp, body, append(secrets, params.Get("state"))))
	}
	uri := get("request_uri")
	if uri == "" || len(uri) > 2048 {
		return "", fmt.Errorf("PAR endpoint %s: the answer has no usable request_uri", httpclient.Host(endpoint))
	}
	return uri, nil
}
