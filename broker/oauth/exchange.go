package oauth

import (
	"cmp"
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"math"
	"net/http"
	"net/url"
	"slices"
	"strconv"
	"strings"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// core is what both sources share: the configuration, the endpoints, the
// token and revocation requests and the classification of errors.
type core struct {
	cfg Config
	ep  *discovery
}

func newCore(cfg Config) (*core, error) {
	if err := cfg.check(); err != nil {
		return nil, fmt.Errorf("oauth2 provider %s: %w", cfg.Name, err)
	}
	c := &core{cfg: cfg}
	c.ep = newDiscovery(&c.cfg)
	return c, nil
}

// tokenClient returns the client of the token and PAR requests: cfg.Client
// with its transport as it is now (one set after the source was built
// applies), behind dpop.Transport when k (endpoints.dpop) is not nil.
func (c *core) tokenClient(k *dpop.Key) *http.Client {
	if k == nil {
		return c.cfg.Client
	}
	tc := *c.cfg.Client
	tc.Transport = dpop.Transport(tc.Transport, k)
	return &tc
}

// Type names the source type for the broker's errors and metrics.
func (*core) Type() string { return ProviderName }

// DPoPKey implements broker.DPoPBound: the key the source's tokens are
// bound to, nil for bearer tokens.
func (c *core) DPoPKey() *dpop.Key { return c.cfg.DPoP }

// CallTimeout implements broker.CallBounded: the HTTP client's timeout.
func (c *core) CallTimeout() time.Duration { return c.cfg.Client.Timeout }

// clientAuth returns the client's secret and the form parameters of the
// configured client authentication for a request to endpoint; the secret
// of client_secret_basic goes in the Basic header instead (postForm).
func (c *core) clientAuth(endpoint string) (secret string, params url.Values, err error) {
	if c.cfg.AuthMethod == ClientSecretBasic {
		return c.cfg.ClientSecret.Reveal(), url.Values{}, nil
	}
	params = url.Values{"client_id": {c.cfg.ClientID}}
	switch c.cfg.AuthMethod {
	case ClientSecretPost:
		params.Set("client_secret", c.cfg.ClientSecret.Reveal())
		return c.cfg.ClientSecret.Reveal(), params, nil
	case PrivateKeyJWT:
		a, err := c.cfg.Signer.Assertion(c.cfg.ClientID, cmp.Or(c.cfg.AssertionAudience, endpoint), c.cfg.Now())
		if err != nil {
			return "", nil, err
		}
		params.Set("client_assertion_type", ClientAssertionType)
		params.Set("client_assertion", a)
	}
	// tls_client_auth: the certificate is the credential.
	return "", params, nil
}

// exchange sends one token request with grant's parameters (none for
// client_credentials). It returns the parsed token and the raw one,
// whenever the provider issued one, also with an error that refuses its
// access token. A DPoP nonce challenge that brought a new nonce is a
// *nonceChallengeError.
func (c *core) exchange(ctx context.Context, req broker.Request, grant url.Values, secrets ...string) (broker.Token, *oauth2.Token, error) {
	ep, err := c.ep.get(ctx)
	if err != nil {
		return broker.Token{}, nil, err
	}
	carried := c.tokenNonce(ep.Token)
	t, raw, err := c.exchangeOnce(ctx, ep, req, grant, secrets...)
	return t, raw, c.nonceChallenged(err, ep.Token, carried)
}

// tokenNonce returns the DPoP nonce a request to endpoint now carries,
// "" without a key.
func (c *core) tokenNonce(endpoint string) string {
	if c.cfg.DPoP == nil {
		return ""
	}
	u, err := url.Parse(endpoint)
	if err != nil {
		return ""
	}
	return c.cfg.DPoP.Nonce(dpop.AuthorizationServer, u)
}

// nonceChallengeError is a use_dpop_nonce refusal (RFC 9449 §8) of a
// token or PAR request for which the key now holds a new nonce: the
// request is to be built again (a new assertion, a proof with the nonce)
// and sent at once.
type nonceChallengeError struct {
	err error // the server's refusal, a *broker.APIError with the code use_dpop_nonce
}

func (e *nonceChallengeError) Error() string { return e.err.Error() }
func (e *nonceChallengeError) Unwrap() error { return e.err }

// nonceChallenged returns err, of a token or PAR request to endpoint that
// carried the nonce carried, as a *nonceChallengeError when it is a
// use_dpop_nonce and the key now holds another nonce (from the answer, or
// a concurrent request), telling Config.OnDPoPNonce. Else err is returned
// as it is, with the *dpop.NonceError of a nonce the key refused.
func (c *core) nonceChallenged(err error, endpoint, carried string) error {
	var ae *broker.APIError
	if c.cfg.DPoP == nil || !errors.As(err, &ae) || ae.Code != "use_dpop_nonce" {
		return err
	}
	if c.tokenNonce(endpoint) == carried {
		if u, perr := url.Parse(endpoint); perr == nil {
			if refused := c.cfg.DPoP.RefusedNonce(dpop.AuthorizationServer, u); refused != nil {
				return fmt.Errorf("%w: %w", err, refused)
			}
		}
		return err
	}
	if c.cfg.OnDPoPNonce != nil {
		c.cfg.OnDPoPNonce()
	}
	return &nonceChallengeError{err: err}
}

// nonceRetried runs send, a request of the consent (PAR, the code
// exchange), once more when it answered a *nonceChallengeError.
func nonceRetried[T any](send func() (T, error)) (T, error) {
	v, err := send()
	if _, ok := errors.AsType[*nonceChallengeError](err); ok {
		v, err = send()
	}
	return v, err
}

// exchangeOnce builds and sends one token request to ep's token endpoint:
// the configured parameters, audience, resource, the request's scopes,
// then the grant's parameters.
func (c *core) exchangeOnce(ctx context.Context, ep *endpoints, req broker.Request, grant url.Values, secrets ...string) (broker.Token, *oauth2.Token, error) {
	form := url.Values{"grant_type": {"client_credentials"}}
	for k, v := range c.cfg.Params {
		form.Set(k, v)
	}
	if aud := cmp.Or(req.Audience, c.cfg.Audience); aud != "" {
		form.Set("audience", aud)
	}
	if c.cfg.Resource != "" {
		form.Set("resource", c.cfg.Resource)
	}
	if len(req.Scopes) > 0 {
		form.Set("scope", strings.Join(req.Scopes, " "))
	}
	for k, v := range grant {
		form[k] = v
	}
	sent := c.cfg.Now()
	resp, body, auth, err := c.postForm(httpclient.TokenRequest(ctx), c.tokenClient(ep.dpop), "oauth2 token endpoint", ep.Token, ep.Token, form)
	if err != nil {
		var te *transportError
		if errors.As(err, &te) && !errors.Is(err, context.Canceled) && !errors.Is(err, context.DeadlineExceeded) {
			c.ep.invalidate()
		}
		if ae, ok := errors.AsType[*broker.APIError](err); ok {
			// An answer too large: a 404 still says the endpoint moved.
			return broker.Token{}, nil, c.tokenError(ep, ae)
		}
		return broker.Token{}, nil, err
	}
	secrets = append(secrets, auth...)
	tok, err := c.tokenAnswer(ep, resp, body, secrets)
	if err != nil {
		return broker.Token{}, tok, err
	}
	secrets = append(secrets, tok.AccessToken, tok.RefreshToken)
	t, err := c.parse(ep, tok, req, sent)
	if ae, ok := errors.AsType[*broker.APIError](err); ok {
		ae.Description = scrub.Secrets(ae.Description, secrets...)
	}
	if err != nil {
		return broker.Token{}, tok, err
	}
	t.Status = resp.StatusCode
	return t, tok, nil
}

// tokenAnswer reads a token endpoint's answer (RFC 6749 §5). A non-2xx
// status or an error parameter is a refusal, without a token; a success
// without an access_token is malformed, returned with the token read (its
// refresh_token was issued).
func (c *core) tokenAnswer(ep *endpoints, resp *http.Response, body []byte, secrets []string) (*oauth2.Token, error) {
	get, raw := answerFields(resp, body)
	code, description := get("error"), get("error_description")
	tok := (&oauth2.Token{AccessToken: get("access_token"), TokenType: get("token_type"), RefreshToken: get("refresh_token")}).WithExtra(raw)
	if resp.StatusCode < 200 || resp.StatusCode > 299 || code != "" {
		return nil, c.tokenError(ep, c.apiError(resp, code, description, secrets))
	}
	if tok.AccessToken == "" {
		return tok, &broker.APIError{Provider: ProviderName, StatusCode: resp.StatusCode, Code: "malformed_response",
			Description: "the token response is not a JSON or form-encoded RFC 6749 §5.1 response with an access_token"}
	}
	return tok, nil
}

// tokenError completes the refusal of a token request: it invalidates
// discovered endpoints on 404, and adds what to check for a refused DPoP
// proof or client authentication.
func (c *core) tokenError(ep *endpoints, ae *broker.APIError) *broker.APIError {
	if ae.StatusCode == http.StatusNotFound {
		c.ep.invalidate()
	}
	if k := ep.dpop; ae.Code == "invalid_dpop_proof" && k != nil {
		ae.Description += fmt.Sprintf(" (the proofs are signed with %s by the key %s: check that the provider accepts %s for DPoP, its dpop_signing_alg_values_supported, and that the clocks agree; or give [providers.%s.dpop] a key of an algorithm it accepts)",
			k.Alg(), k.Thumbprint(), k.Alg(), c.cfg.Name)
	}
	if ae.Code == "invalid_dpop_proof" && c.cfg.DPoP == nil {
		ae.Description += fmt.Sprintf(" (the request had no DPoP proof: the provider wants the client's tokens bound to a key; give the provider one, [providers.%s.dpop] key = ...)", c.cfg.Name)
	}
	// zitadel refuses an assertion's aud with invalid_grant "audience is
	// not valid" (invalid_target is about the audience parameter).
	audienceRefused := clientAuthRefused(ae) ||
		slices.Contains([]string{"invalid_client", "unauthorized_client", "invalid_grant"}, ae.Code) && strings.Contains(strings.ToLower(ae.Description), "audience")
	if audienceRefused && c.cfg.AuthMethod == PrivateKeyJWT && c.cfg.AssertionAudience == "" {
		ae.Description += c.audienceHint(ep.Token)
	}
	if clientAuthRefused(ae) && !ep.supports(c.cfg.AuthMethod) {
		ae.Description += fmt.Sprintf(" (the provider's discovery document lists token_endpoint_auth_methods_supported %q, without %s)", ep.AuthMethods, c.cfg.AuthMethod)
	}
	if s := c.cfg.Signer; clientAuthRefused(ae) && s != nil && len(ep.AssertionAlgs) > 0 && !slices.Contains(ep.AssertionAlgs, s.Alg()) {
		ae.Description += fmt.Sprintf(" (the assertions are signed with %s; the provider's discovery document lists token_endpoint_auth_signing_alg_values_supported %q: set signing_alg in [providers.%s] to one of them, with a key that fits it)",
			s.Alg(), ep.AssertionAlgs, c.cfg.Name)
	}
	return ae
}

// clientAuthRefused reports whether a token endpoint's refusal ae names
// the client's authentication: invalid_client (RFC 6749 §5.2), or
// unauthorized_client with 401 (Keycloak's answer to a wrong secret or
// assertion).
func clientAuthRefused(ae *broker.APIError) bool {
	return ae.Code == "invalid_client" || ae.Code == "unauthorized_client" && ae.StatusCode == http.StatusUnauthorized
}

// audienceHint is tokenError's hint for a refused private_key_jwt with
// the default assertion audience aud, the token endpoint: a server that
// wants its issuer identifier (FAPI 2.0, zitadel) needs assertion_audience.
func (c *core) audienceHint(aud string) string {
	want := fmt.Sprintf("assertion_audience set to the authorization server's issuer identifier in [providers.%s]", c.cfg.Name)
	if c.cfg.Issuer != "" {
		want = fmt.Sprintf("assertion_audience = %q in [providers.%s]", c.cfg.Issuer, c.cfg.Name)
	}
	return fmt.Sprintf(" (the client assertion's aud was the token endpoint, %q: a server that wants its issuer identifier as the audience (FAPI 2.0, zitadel) needs %s)", httpclient.Endpoint(aud), want)
}

// parse checks a successful response of the token endpoint of ep and
// computes the token's expiry.
func (c *core) parse(ep *endpoints, tok *oauth2.Token, req broker.Request, sent time.Time) (broker.Token, error) {
	typ, err := c.tokenType(tok.TokenType, ep.dpop)
	if err != nil {
		return broker.Token{}, err
	}
	if !broker.ValidTokenValue(tok.AccessToken) {
		return broker.Token{}, &broker.APIError{Provider: ProviderName, StatusCode: http.StatusOK, Code: "invalid_token_value",
			Description: "the access token is empty, too long or contains characters not allowed in an HTTP header"}
	}
	expiry := c.expiry(tok, sent)
	if req.Lifetime > 0 && sent.Add(req.Lifetime).Before(expiry) {
		expiry = sent.Add(req.Lifetime)
	}
	t := broker.Token{Value: broker.Secret(tok.AccessToken), Type: typ, Expiry: expiry}
	if s, ok := tok.Extra("scope").(string); ok {
		t.Scopes = strings.Fields(s)
	}
	return t, nil
}

// tokenType checks a response's token_type against what was asked for:
// DPoP with k, the key of the request's proof (RFC 9449 §5: a Bearer
// answer did not bind the token), else Bearer or none. It returns the
// type as the broker caches it.
func (c *core) tokenType(typ string, k *dpop.Key) (string, error) {
	shown := scrub.Truncate(typ, scrub.MaxText)
	switch {
	case k != nil && strings.EqualFold(typ, broker.DPoPType):
		return broker.DPoPType, nil
	case k != nil:
		return "", &broker.APIError{Provider: ProviderName, StatusCode: http.StatusOK, Code: "unsupported_token_type",
			Description: fmt.Sprintf("provider %s answered token_type %q to a request with a DPoP proof, not DPoP: the token is not bound to the key (%s). "+
				"Check that the server supports DPoP (dpop_signing_alg_values_supported lists %s) and that the client is registered for DPoP-bound tokens; "+
				"or remove [providers.%s.dpop] to use bearer tokens", c.cfg.Name, shown, k.Thumbprint(), k.Alg(), c.cfg.Name)}
	case typ == "" || httpclient.IsBearer(typ):
		return "Bearer", nil
	case strings.EqualFold(typ, broker.DPoPType):
		return "", &broker.APIError{Provider: ProviderName, StatusCode: http.StatusOK, Code: "unsupported_token_type",
			Description: fmt.Sprintf("provider %s answered token_type %q to a request without a DPoP proof: give the provider a DPoP key, [providers.%s.dpop] key = ..., or register the client for bearer tokens", c.cfg.Name, shown, c.cfg.Name)}
	}
	return "", &broker.APIError{Provider: ProviderName, StatusCode: http.StatusOK, Code: "unsupported_token_type",
		Description: fmt.Sprintf("provider %s answered token_type %q: the broker sends Bearer and DPoP tokens only", c.cfg.Name, shown)}
}

// expiry is sent + expires_in; failing that the exp of a JWT access token
// when it is at most maxExpiresIn after sent (one further away, as in
// milliseconds, is not credible); failing that sent + the default
// lifetime.
func (c *core) expiry(tok *oauth2.Token, sent time.Time) time.Time {
	if secs, ok := expiresIn(tok.Extra("expires_in")); ok && secs > 0 {
		return sent.Add(time.Duration(secs) * time.Second)
	}
	if exp, ok := jwtExpiry(tok.AccessToken); ok && !exp.After(sent.Add(maxExpiresIn*time.Second)) {
		return exp
	}
	return sent.Add(c.cfg.DefaultLifetime)
}

// maxExpiresIn bounds expires_in (ten years) so that the duration cannot
// overflow, and is the furthest exp of a JWT access token that is believed.
const maxExpiresIn = 10 * 366 * 24 * 3600

// expiresIn reads expires_in as Token.Extra gives it (float64, int64 or a
// string of a number): a fraction of a second is dropped, a positive one
// under a second is one second; NaN and infinity are none.
func expiresIn(v any) (int64, bool) {
	var f float64
	switch x := v.(type) {
	case float64:
		f = x
	case int64:
		f = float64(x)
	case string:
		var err error
		if f, err = strconv.ParseFloat(strings.TrimSpace(x), 64); err != nil {
			return 0, false
		}
	default:
		return 0, false
	}
	if math.IsNaN(f) || math.IsInf(f, 0) {
		return 0, false
	}
	if f > 0 && f < 1 {
		return 1, true
	}
	return int64(max(min(f, maxExpiresIn), -1)), true
}

// sent lists the secrets a request sends, for scrub.Secrets: the client
// secret, its Basic credential and any assertion.
func (c *core) sent(secret, assertion string) []string {
	out := []string{secret, assertion}
	if secret != "" {
		out = append(out, base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(c.cfg.ClientID)+":"+url.QueryEscape(secret))))
	}
	return out
}
