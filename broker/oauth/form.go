package oauth

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// postForm sends form as a POST to endpoint through client, with the
// configured client authentication (clientAuth, the assertion's audience
// being audience), and reads the answer's body (at most MaxResponseBytes;
// nil when larger). It returns the secrets the request sent, to scrub from
// what the answer says. what names the endpoint in errors ("PAR
// endpoint"); they name its host, never its URL. A failure to send the
// request or to read the answer is a *transportError.
func (c *core) postForm(ctx context.Context, client *http.Client, what, endpoint, audience string, form url.Values) (*http.Response, []byte, []string, error) {
	secret, style, auth, err := c.clientAuth(audience)
	if err != nil {
		return nil, nil, nil, err
	}
	for k, v := range auth {
		form[k] = v
	}
	if style == oauth2.AuthStyleInParams {
		form.Set("client_id", c.cfg.ClientID)
		if secret != "" {
			form.Set("client_secret", secret)
		}
	}
	host := httpclient.Host(endpoint)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%s %s: building the request: %w", what, host, httpclient.RedactURLError(err))
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if style == oauth2.AuthStyleInHeader {
		// RFC 6749 §2.3.1: the id and the secret form-url-encoded, then Basic.
		req.SetBasicAuth(url.QueryEscape(c.cfg.ClientID), url.QueryEscape(secret))
	}
	secrets := c.sent(secret, auth.Get("client_assertion"))
	resp, err := client.Do(req)
	if err != nil {
		return nil, nil, nil, &transportError{fmt.Errorf("%s %s: %w", what, host, httpclient.RedactURLError(err))}
	}
	defer resp.Body.Close()
	body, _, err := httpclient.ReadBody(resp.Body)
	if err != nil {
		return nil, nil, nil, &transportError{fmt.Errorf("%s %s: reading the response: %w", what, host, err)}
	}
	return resp, body, secrets, nil
}

// transportError is a postForm request that was not sent or whose answer
// was not read: unlike a failed client authentication, the endpoint may
// have moved.
type transportError struct{ err error }

func (e *transportError) Error() string { return e.err.Error() }

func (e *transportError) Unwrap() error { return e.err }

// refusal is the *broker.APIError of an endpoint's error answer, made by
// apiError from the error and error_description (RFC 6749 §5.2) of its
// JSON body.
func (c *core) refusal(resp *http.Response, body []byte, secrets []string) *broker.APIError {
	var e struct {
		Error       string `json:"error"`
		Description string `json:"error_description"`
	}
	if json.Unmarshal(body, &e) != nil {
		e.Error, e.Description = "", ""
	}
	return c.apiError(resp, e.Error, e.Description, secrets)
}

// apiError is the *broker.APIError of an error answer whose error code
// and description are code and description: both scrubbed of secrets, the
// status text when both are empty, and the answer's Retry-After.
func (c *core) apiError(resp *http.Response, code, description string, secrets []string) *broker.APIError {
	ae := &broker.APIError{Provider: ProviderName, StatusCode: resp.StatusCode,
		Code: scrub.Secrets(code, secrets...), Description: scrub.Secrets(description, secrets...),
		RetryAfter: broker.ParseRetryAfter(resp.Header.Get("Retry-After"), c.cfg.Now())}
	if ae.Code == "" && ae.Description == "" {
		ae.Description = http.StatusText(resp.StatusCode)
	}
	return ae
}
