package broker

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"strings"
	"time"
)

// Nuapay lifetime bounds for expiresIn, in seconds.
const (
	NuapayMinLifetime = 10 * time.Second
	NuapayMaxLifetime = 31556926 * time.Second
)

// NuapayConfig configures a Nuapay Gatekeeper token source.
type NuapayConfig struct {
	// BaseURL is the Gatekeeper API root, e.g. https://api.nuapay.com,
	// https://sandbox.nuapay.com, or a white-labelled partner domain.
	BaseURL string
	// APIKey is the partner API key, sent as the Basic user name with an
	// empty password.
	APIKey Secret
	// Lifetime is the expiresIn sent when a request does not set one.
	// Nuapay's own default is 10s; default here 1h.
	Lifetime time.Duration
	// OrganisationsPath is the path of the organisations list, default
	// "/organisations" (newer APIs: "/cust/organisations").
	OrganisationsPath string
	// Client makes the calls (timeouts, client certificate). Default: a
	// client from NewHTTPClient with a 10s timeout.
	Client *http.Client
	// Now is the clock used for Retry-After dates. Default time.Now.
	Now func() time.Time
}

// Nuapay is a Source for Nuapay Open Banking and E-Mandates partner tokens:
// POST /organisations/{encodedOrganisationId}/tokens with HTTP Basic auth
// (the partner API key and an empty password).
type Nuapay struct {
	cfg  NuapayConfig
	base *url.URL
	auth string
}

// NewNuapay returns a Nuapay source.
func NewNuapay(cfg NuapayConfig) (*Nuapay, error) {
	u, err := url.Parse(strings.TrimRight(cfg.BaseURL, "/"))
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return nil, fmt.Errorf("base_url %q is not an http(s) URL", cfg.BaseURL)
	}
	if u.RawQuery != "" || u.Fragment != "" || u.User != nil {
		return nil, fmt.Errorf("base_url %q must not carry a query, a fragment or credentials", cfg.BaseURL)
	}
	if cfg.APIKey == "" {
		return nil, errors.New("api_key is empty")
	}
	if cfg.Lifetime == 0 {
		cfg.Lifetime = time.Hour
	}
	if cfg.Lifetime < NuapayMinLifetime || cfg.Lifetime > NuapayMaxLifetime {
		return nil, fmt.Errorf("token lifetime %s is outside Nuapay's range 10s..%s", cfg.Lifetime, NuapayMaxLifetime)
	}
	if cfg.OrganisationsPath == "" {
		cfg.OrganisationsPath = "/organisations"
	}
	if cfg.Client == nil {
		cfg.Client, _ = NewHTTPClient(10*time.Second, TLSOptions{})
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	// Basic base64("<API_KEY>:"): the empty password and its colon matter.
	r := &http.Request{Header: http.Header{}}
	r.SetBasicAuth(cfg.APIKey.Reveal(), "")
	return &Nuapay{cfg: cfg, base: u, auth: r.Header.Get("Authorization")}, nil
}

// Type names the source type.
func (n *Nuapay) Type() string { return "nuapay" }

// orgURL returns base + /organisations/{org}{suffix} with org escaped as one
// path segment. An organisation id that is empty, "." or ".." is refused:
// escaping alone would leave those able to change the path.
func (n *Nuapay) orgURL(merchant, org, suffix string) (string, error) {
	if org == "" || org == "." || org == ".." {
		return "", &RequestError{Merchant: merchant, Field: "organisation", Reason: fmt.Sprintf("%q is not a valid encodedOrganisationId", org)}
	}
	u := *n.base
	esc := strings.ReplaceAll(url.PathEscape(org), ".", "%2E")
	u.RawPath = u.EscapedPath() + "/organisations/" + esc + suffix
	u.Path, _ = url.PathUnescape(u.RawPath)
	return u.String(), nil
}

type nuapayTokenRequest struct {
	Scopes    []string `json:"scopes"`
	ExpiresIn int64    `json:"expiresIn"`
}

// nuapayToken is the "data" of Gatekeeper's token envelope.
type nuapayToken struct {
	ID          string   `json:"id"`
	AccessToken string   `json:"accessToken"`
	TokenType   string   `json:"tokenType"`
	ExpiryTime  *int64   `json:"expiryTime"`
	Scopes      []string `json:"scopes"`
	Status      string   `json:"status"`
}

type nuapayEnvelope[T any] struct {
	Data *T `json:"data"`
}

// Token requests a token for req.Organisation with req.Scopes, asking for
// req.Lifetime (or the configured lifetime).
func (n *Nuapay) Token(ctx context.Context, req Request) (Token, error) {
	if len(req.Scopes) == 0 {
		return Token{}, &RequestError{Merchant: req.Merchant, Field: "scopes", Reason: "Nuapay needs at least one scope"}
	}
	life := req.Lifetime
	if life == 0 {
		life = n.cfg.Lifetime
	}
	if life < NuapayMinLifetime || life > NuapayMaxLifetime {
		return Token{}, &RequestError{Merchant: req.Merchant, Field: "token_lifetime", Reason: fmt.Sprintf("%s is outside Nuapay's range 10s..%s", life, NuapayMaxLifetime)}
	}
	target, err := n.orgURL(req.Merchant, req.Organisation, "/tokens")
	if err != nil {
		return Token{}, err
	}
	body, _ := json.Marshal(nuapayTokenRequest{Scopes: req.Scopes, ExpiresIn: int64(life / time.Second)})
	sent := n.cfg.Now()
	data, err := n.call(ctx, http.MethodPost, target, body, http.StatusCreated)
	if err != nil {
		return Token{}, err
	}
	return ParseNuapayToken(data, sent, life)
}

// ParseNuapayToken parses a Gatekeeper token response body (the 201
// envelope). sent is when the request was sent and life the lifetime asked
// for; they give the expiry when the response has no expiryTime.
func ParseNuapayToken(body []byte, sent time.Time, life time.Duration) (Token, error) {
	var env nuapayEnvelope[nuapayToken]
	if err := json.Unmarshal(body, &env); err != nil {
		return Token{}, &APIError{Provider: "nuapay", StatusCode: http.StatusCreated, Code: "malformed_response", Err: errors.New("token response is not the JSON envelope")}
	}
	d := env.Data
	if d == nil || d.AccessToken == "" {
		return Token{}, &APIError{Provider: "nuapay", StatusCode: http.StatusCreated, Code: "malformed_response", Description: "token response has no data.accessToken"}
	}
	if d.TokenType != "" && !isBearer(d.TokenType) {
		return Token{}, &APIError{Provider: "nuapay", StatusCode: http.StatusCreated, Code: "unsupported_token_type", Description: fmt.Sprintf("tokenType %q is not BEARER", d.TokenType)}
	}
	if d.Status != "" && !strings.EqualFold(d.Status, "ACTIVE") {
		return Token{}, &APIError{Provider: "nuapay", StatusCode: http.StatusCreated, Code: "inactive_token", Description: fmt.Sprintf("token status is %q", d.Status)}
	}
	expiry := sent.Add(life)
	if d.ExpiryTime != nil {
		// Never trust the provider for longer than asked: a clock skew or
		// an absurd value would otherwise keep a dead token cached.
		if e := time.UnixMilli(*d.ExpiryTime); e.Before(expiry) {
			expiry = e
		}
	}
	return Token{Value: Secret(d.AccessToken), Type: "Bearer", Expiry: expiry, ID: d.ID, Scopes: d.Scopes}, nil
}

// Revoke revokes one long-lived token of an organisation.
func (n *Nuapay) Revoke(ctx context.Context, org, tokenID string) error {
	if tokenID == "" {
		return errors.New("nuapay revoke: the token has no id")
	}
	target, err := n.orgURL("", org, "/tokens/"+strings.ReplaceAll(url.PathEscape(tokenID), ".", "%2E")+"/revoke")
	if err != nil {
		return err
	}
	_, err = n.call(ctx, http.MethodPost, target, nil, http.StatusOK)
	return err
}

// RevokeToken implements Revoker: it revokes the token by its id, or every
// token of the organisation when the token has no id.
func (n *Nuapay) RevokeToken(ctx context.Context, req Request, tok Token) error {
	if tok.ID == "" {
		_, err := n.RevokeAll(ctx, req.Organisation)
		return err
	}
	return n.Revoke(ctx, req.Organisation, tok.ID)
}

// RevokeAll revokes every token of an organisation and returns how many
// the provider revoked.
func (n *Nuapay) RevokeAll(ctx context.Context, org string) (int, error) {
	target, err := n.orgURL("", org, "/tokens/revoke")
	if err != nil {
		return 0, err
	}
	body, err := n.call(ctx, http.MethodPost, target, nil, http.StatusOK)
	if err != nil {
		return 0, err
	}
	var env nuapayEnvelope[struct {
		Count int `json:"revokedTokensCount"`
	}]
	if err := json.Unmarshal(body, &env); err != nil || env.Data == nil {
		return 0, &APIError{Provider: "nuapay", StatusCode: http.StatusOK, Code: "malformed_response", Description: "revoke response has no data"}
	}
	return env.Data.Count, nil
}

// Organisation is one entry of Gatekeeper's organisations list.
type Organisation struct {
	// ID is the encodedOrganisationId to use in token requests.
	ID string `json:"id"`
	// Name is the organisation's name.
	Name string `json:"name"`
	// Code is the organisation's code.
	Code string `json:"code"`
	// Status is ACTIVE or another Nuapay status.
	Status string `json:"status"`
}

// Organisations returns every organisation linked to the partner, reading
// all pages.
func (n *Nuapay) Organisations(ctx context.Context) ([]Organisation, error) {
	var out []Organisation
	for page := 1; ; page++ {
		u := *n.base
		u.Path += n.cfg.OrganisationsPath
		u.RawPath = ""
		u.RawQuery = url.Values{"pagenumber": {fmt.Sprint(page)}, "pagesize": {"100"}}.Encode()
		body, err := n.call(ctx, http.MethodGet, u.String(), nil, http.StatusOK)
		if err != nil {
			return nil, err
		}
		var env struct {
			Data []Organisation `json:"data"`
			Page struct {
				TotalPages int `json:"totalPages"`
			} `json:"page"`
		}
		if err := json.Unmarshal(body, &env); err != nil {
			return nil, &APIError{Provider: "nuapay", StatusCode: http.StatusOK, Code: "malformed_response", Err: err}
		}
		out = append(out, env.Data...)
		if page >= env.Page.TotalPages || len(env.Data) == 0 || page >= 10000 {
			return out, nil
		}
	}
}

// call sends one Gatekeeper request and returns the body of an answer with
// the wanted status (200 is accepted where 201 is documented); any other
// answer becomes an *APIError built from Nuapay's error envelope.
func (n *Nuapay) call(ctx context.Context, method, target string, body []byte, want int) ([]byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	hr, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return nil, fmt.Errorf("nuapay: building request: %w", err)
	}
	hr.Header.Set("Authorization", n.auth)
	hr.Header.Set("Accept", "application/json")
	if body != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	resp, err := n.cfg.Client.Do(hr)
	if err != nil {
		return nil, fmt.Errorf("nuapay token API %s: %w", n.base.Host, RedactURLError(err))
	}
	defer resp.Body.Close()
	data, err := readBody("nuapay", resp)
	if err != nil {
		return nil, err
	}
	if resp.StatusCode == want || (resp.StatusCode >= 200 && resp.StatusCode < 300) {
		return data, nil
	}
	ae := ParseNuapayError(resp.StatusCode, resp.Header.Get("Retry-After"), data, n.cfg.Now())
	// A provider that echoes what it was sent must not put the key in our
	// logs: scrub it, plain and as the Basic credential.
	scrub := strings.NewReplacer(n.cfg.APIKey.Reveal(), Redacted, strings.TrimPrefix(n.auth, "Basic "), Redacted)
	ae.Code, ae.Description = scrub.Replace(ae.Code), scrub.Replace(ae.Description)
	for i := range ae.Details {
		d := &ae.Details[i]
		d.Code, d.Description, d.Field = scrub.Replace(d.Code), scrub.Replace(d.Description), scrub.Replace(d.Field)
	}
	return nil, ae
}

// ParseNuapayError turns a non-2xx Gatekeeper answer into an *APIError,
// reading Nuapay's error envelope when there is one. "details" may be an
// array or a single object; any field may be null.
func ParseNuapayError(status int, retryAfter string, body []byte, now time.Time) *APIError {
	ae := &APIError{Provider: "nuapay", StatusCode: status, RetryAfter: ParseRetryAfter(retryAfter, now)}
	var env struct {
		ReturnCode        *string         `json:"returnCode"`
		ReturnDescription *string         `json:"returnDescription"`
		Details           json.RawMessage `json:"details"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		ae.Description = http.StatusText(status)
		return ae
	}
	if env.ReturnCode != nil {
		ae.Code = *env.ReturnCode
	}
	if env.ReturnDescription != nil {
		ae.Description = *env.ReturnDescription
	}
	var one ErrorDetail
	switch d := bytes.TrimSpace(env.Details); {
	case len(d) > 0 && d[0] == '[':
		_ = json.Unmarshal(d, &ae.Details)
	case len(d) > 0 && d[0] == '{':
		if json.Unmarshal(d, &one) == nil {
			ae.Details = []ErrorDetail{one}
		}
	}
	if ae.Description == "" {
		ae.Description = http.StatusText(status)
	}
	return ae
}

// RedactURLError drops the URL (and so any query) from a *url.Error: a
// token API's URL can carry an organisation id or a query that has no
// place in a log line that already names the merchant and the host.
func RedactURLError(err error) error {
	var ue *url.Error
	if errors.As(err, &ue) {
		return ue.Err
	}
	return err
}

// Interface guards.
var (
	_ Source  = (*Nuapay)(nil)
	_ Revoker = (*Nuapay)(nil)
)
