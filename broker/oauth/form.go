package oauth

import (
	"bytes"
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"mime"
	"net/http"
	"net/url"
	"strings"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/challenge"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// postForm sends form as a POST to endpoint through client, with the
// configured client authentication (clientAuth, the assertion's audience
// being audience), and reads the answer's body (at most MaxResponseBytes).
// It returns the secrets the request sent, to scrub from what the answer
// says. what names the endpoint in errors ("PAR endpoint"); they name its
// host, never its URL. A failure to send the request or to read its answer
// is a *transportError, except an answer whose status says the server
// failed or is busy (broker.TemporaryStatus) and whose body could not be
// read: that is returned with an empty body.
// An answer whose body is over MaxResponseBytes, of any status, is a
// *broker.APIError broker.CodeTooLarge of the answer's status and
// Retry-After (its cause a *httpclient.TooLargeError).
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
	body, tooLarge, err := httpclient.ReadBody(resp.Body)
	switch {
	case err != nil && broker.TemporaryStatus(resp.StatusCode):
		// A 408, 425, 429 or 5xx cut short is still that status, with its
		// Retry-After: its classification needs no error code. Any other
		// answer is classified by its error code (invalid_grant,
		// invalid_client, use_dpop_nonce), which a cut body lost: it is a
		// transport failure.
	case err != nil:
		return nil, nil, nil, &transportError{fmt.Errorf("%s %s: reading the response: %w", what, host, err)}
	case tooLarge:
		// Of any status: a 429 or 5xx keeps its class and Retry-After.
		ae := c.apiError(resp, broker.CodeTooLarge, what, nil)
		ae.Err = &httpclient.TooLargeError{Host: host}
		return nil, nil, nil, ae
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
// apiError from the error and error_description (RFC 6749 §5.2) that
// answerFields reads.
func (c *core) refusal(resp *http.Response, body []byte, secrets []string) *broker.APIError {
	get, _ := answerFields(resp, body)
	return c.apiError(resp, get("error"), get("error_description"), secrets)
}

// answerFields reads the parameters of an answer of the token, PAR or
// revocation endpoint (RFC 6749 §5): a JSON object whatever its
// Content-Type says, else form-encoded parameters when it is labelled so
// or text/plain; a byte order mark is skipped. get returns a parameter's
// value, "" when it is absent or not a string; raw holds them all, for
// oauth2.Token.WithExtra.
func answerFields(resp *http.Response, body []byte) (get func(name string) string, raw any) {
	body = bytes.TrimPrefix(body, []byte("\ufeff"))
	media, _, _ := mime.ParseMediaType(resp.Header.Get("Content-Type"))
	object := bytes.HasPrefix(bytes.TrimSpace(body), []byte("{"))
	if !object && (media == "application/x-www-form-urlencoded" || media == "text/plain") {
		vals, _ := url.ParseQuery(string(body))
		return vals.Get, vals
	}
	var fields map[string]any
	_ = json.Unmarshal(body, &fields)
	return func(name string) string { s, _ := fields[name].(string); return s }, fields
}

// apiError is the *broker.APIError of an error answer whose error code
// and description are code and description (when code is empty, the
// error and error_description of the first WWW-Authenticate challenge
// that has an error, where a server says why it answered 401, RFC 6749
// §5.2, when its body does not: RFC 6750 §3's spelling, which RFC 9449
// §7.1 shares, DPoP error="use_dpop_nonce"): both scrubbed of
// secrets, the status text when both are empty, and the wait the answer
// asks for (broker.ParseWait).
func (c *core) apiError(resp *http.Response, code, description string, secrets []string) *broker.APIError {
	if code == "" {
		ch, _ := challenge.Error(resp.Header)
		code, description = ch.Error, cmp.Or(description, ch.Description)
	}
	ae := &broker.APIError{Provider: ProviderName, StatusCode: resp.StatusCode,
		Code: scrub.Secrets(code, secrets...), Description: scrub.Secrets(description, secrets...),
		RetryAfter: broker.ParseWait(resp.StatusCode, resp.Header, c.cfg.Now())}
	if ae.Code == "" && ae.Description == "" {
		ae.Description = http.StatusText(resp.StatusCode)
	}
	return ae
}
