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

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/challenge"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// postForm sends form as a POST to endpoint through client, with the
// client authentication (an assertion's audience being audience), and
// reads the answer. It returns the secrets the request sent, to scrub from
// the answer. what names the endpoint in errors, which name its host, never
// its URL. A failure to send or to read is a *transportError, but for an
// answer of a temporary status, returned with an empty body.
// A body over MaxResponseBytes is a *broker.APIError broker.CodeTooLarge
// of the answer's status and Retry-After.
func (c *core) postForm(ctx context.Context, client *http.Client, what, endpoint, audience string, form url.Values) (*http.Response, []byte, []string, error) {
	secret, auth, err := c.clientAuth(audience)
	if err != nil {
		return nil, nil, nil, err
	}
	for k, v := range auth {
		form[k] = v
	}
	host := httpclient.Host(endpoint)
	req, err := http.NewRequestWithContext(ctx, http.MethodPost, endpoint, strings.NewReader(form.Encode()))
	if err != nil {
		return nil, nil, nil, fmt.Errorf("%s %s: building the request: %w", what, host, httpclient.RedactURLError(err))
	}
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.Header.Set("Accept", "application/json")
	if c.cfg.AuthMethod == ClientSecretBasic {
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
		// Its status classifies it; any other answer needs the error
		// code that a cut body lost.
	case err != nil:
		return nil, nil, nil, &transportError{fmt.Errorf("%s %s: reading the response: %w", what, host, err)}
	case tooLarge:
		ae := c.apiError(resp, broker.CodeTooLarge, what, nil)
		ae.Err = &httpclient.TooLargeError{Host: host}
		return nil, nil, nil, ae
	}
	return resp, body, secrets, nil
}

// transportError is a postForm request that was not sent or whose answer
// was not read: the endpoint may have moved.
type transportError struct{ err error }

func (e *transportError) Error() string { return e.err.Error() }

func (e *transportError) Unwrap() error { return e.err }

// refusal is the *broker.APIError of an endpoint's error answer.
func (c *core) refusal(resp *http.Response, body []byte, secrets []string) *broker.APIError {
	get, _ := answerFields(resp, body)
	return c.apiError(resp, get("error"), get("error_description"), secrets)
}

// answerFields reads the parameters of an endpoint's answer (RFC 6749
// §5): a JSON object whatever the Content-Type, else form-encoded when
// labelled so or text/plain; a byte order mark is skipped. get returns a
// parameter's string value or ""; raw holds them all, for
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

// apiError is the *broker.APIError of an error answer with code and
// description, scrubbed of secrets (with no code, those of the first
// WWW-Authenticate challenge with an error, RFC 6750 §3 and RFC 9449 §7.1:
// DPoP error="use_dpop_nonce"; with neither, the status text), and the
// wait the answer asks for.
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
