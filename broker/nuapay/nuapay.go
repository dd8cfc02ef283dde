// Package nuapay is the token source of Nuapay Gatekeeper (Open Banking and
// E-Mandates partner tokens): POST /organisations/{encodedOrganisationId}/tokens
// with the partner API key as HTTP Basic user name and an empty password.
// The Nuapay envelope is not RFC 6749, so this client is its own. The
// Source also lists the organisations the partner may act for
// (EachOrganisation, within ListLimits) and revokes a token (RevokeToken).
package nuapay

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// Nuapay lifetime bounds for expiresIn, in seconds.
const (
	MinLifetime = 10 * time.Second
	MaxLifetime = 31556926 * time.Second
)

// Config configures a Nuapay Gatekeeper token source.
type Config struct {
	// BaseURL is the Gatekeeper API root, e.g. https://api.nuapay.com,
	// https://sandbox.nuapay.com, or a white-labelled partner domain.
	BaseURL string
	// APIKey is the partner API key, sent as the Basic user name with an
	// empty password.
	APIKey broker.Secret
	// Lifetime is the expiresIn sent when a request does not set one.
	// Nuapay's own default is 10s; default here 1h.
	Lifetime time.Duration
	// OrganisationsPath is the path of the organisations list, default
	// "/organisations" (newer APIs: "/cust/organisations").
	OrganisationsPath string
	// Client makes the calls (timeouts, client certificate). Default: a
	// client from httpclient.New with a 10s timeout.
	Client *http.Client
	// Now is the clock used for Retry-After dates and rate-limit resets
	// given as Unix times (broker.ParseWait). Default time.Now.
	Now func() time.Time
}

// Source is the broker.Source of Nuapay Gatekeeper (see the package doc).
// It is safe for concurrent use.
type Source struct {
	cfg     Config
	base    *url.URL
	auth    string
	listURL url.URL // base + OrganisationsPath, escaped, without query
}

// New returns a Nuapay source.
func New(cfg Config) (*Source, error) {
	if err := httpclient.CheckURL(cfg.BaseURL, false); err != nil {
		return nil, fmt.Errorf("base_url: %w", err)
	}
	u, _ := url.Parse(strings.TrimRight(cfg.BaseURL, "/"))
	if cfg.APIKey == "" {
		return nil, errors.New("api_key is empty")
	}
	if cfg.Lifetime == 0 {
		cfg.Lifetime = time.Hour
	}
	if cfg.Lifetime < MinLifetime || cfg.Lifetime > MaxLifetime {
		return nil, fmt.Errorf("token lifetime %s is outside Nuapay's range 10s..%s", cfg.Lifetime, MaxLifetime)
	}
	if cfg.OrganisationsPath == "" {
		cfg.OrganisationsPath = "/organisations"
	}
	if cfg.Client == nil {
		cfg.Client, _ = httpclient.New(10*time.Second, httpclient.TLSOptions{})
	}
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	// Basic base64("<API_KEY>:"): the empty password and its colon matter.
	r := &http.Request{Header: http.Header{}}
	r.SetBasicAuth(cfg.APIKey.Reveal(), "")
	s := &Source{cfg: cfg, base: u, auth: r.Header.Get("Authorization")}
	s.listURL = s.at((&url.URL{Path: cfg.OrganisationsPath}).EscapedPath())
	return s, nil
}

// Type names the source type.
func (s *Source) Type() string { return "nuapay" }

// CallTimeout implements broker.CallBounded: the HTTP client's timeout.
func (s *Source) CallTimeout() time.Duration { return s.cfg.Client.Timeout }

// Classify implements broker.Classifier: Gatekeeper's 401 refuses the API
// key, which every organisation of the source shares; its other refusals
// (403, 404, 422) can be about one organisation.
func (s *Source) Classify(err error) broker.Class {
	var ae *broker.APIError
	if errors.As(err, &ae) && ae.StatusCode == http.StatusUnauthorized {
		return broker.ClassCredential
	}
	return broker.DefaultClass(err)
}

// orgURL returns base + /organisations/{org}{suffix} with org escaped as one
// path segment. An organisation id that is empty, "." or ".." is refused:
// escaping alone would leave those able to change the path.
func (s *Source) orgURL(merchant, org, suffix string) (string, error) {
	if org == "" || org == "." || org == ".." {
		return "", &broker.RequestError{Merchant: merchant, Field: "organisation", Reason: fmt.Sprintf("%q is not a valid encodedOrganisationId", org)}
	}
	u := s.at("/organisations/" + segment(org) + suffix)
	return u.String(), nil
}

// at returns the base URL with escaped, an escaped path, appended; the
// base's path keeps the escaping it was given.
func (s *Source) at(escaped string) url.URL {
	u := *s.base
	u.RawPath = u.EscapedPath() + escaped
	u.Path, _ = url.PathUnescape(u.RawPath)
	return u
}

// segment escapes s as one path segment (url.PathEscape). Dots are
// unreserved characters, sent as they are (RFC 3986 §2.3), except in an s
// made of dots only or holding a slash or a backslash: there they are
// escaped too, so that no segment is "." or "..", even at a server that
// decodes %2F or %5C before it resolves dot segments.
func segment(s string) string {
	escaped := url.PathEscape(s)
	if strings.Trim(s, ".") == "" || strings.ContainsAny(s, `/\`) {
		return strings.ReplaceAll(escaped, ".", "%2E")
	}
	return escaped
}

type nuapayTokenRequest struct {
	Scopes    []string `json:"scopes"`
	ExpiresIn int64    `json:"expiresIn"`
}

// nuapayToken is the "data" of Gatekeeper's token envelope. Only
// accessToken must be of its JSON type.
type nuapayToken struct {
	ID          tokenID     `json:"id"`
	AccessToken string      `json:"accessToken"`
	TokenType   text        `json:"tokenType"`
	ExpiryTime  epochMillis `json:"expiryTime"`
	Scopes      scopeList   `json:"scopes"`
	Status      text        `json:"status"`
}

// epochMillis is the expiryTime of a token answer, in milliseconds since
// the epoch: a JSON number, or a string holding one. Any other value, or a
// number that is not finite as a float64, is not read (set is false).
type epochMillis struct {
	ms  float64
	set bool
}

// UnmarshalJSON implements json.Unmarshaler.
func (e *epochMillis) UnmarshalJSON(b []byte) error {
	var t text
	_ = t.UnmarshalJSON(b)
	ms, err := strconv.ParseFloat(string(t), 64)
	*e = epochMillis{ms: ms, set: err == nil && !math.IsNaN(ms) && !math.IsInf(ms, 0)}
	return nil
}

// tokenID is the id of a token answer, which revokes the token: a string,
// or a number as its JSON text. Any other JSON value is no id (""): the
// token is then not revocable.
type tokenID string

// UnmarshalJSON implements json.Unmarshaler.
func (id *tokenID) UnmarshalJSON(b []byte) error {
	var t text
	_ = t.UnmarshalJSON(b)
	var flag bool
	if json.Unmarshal(b, &flag) == nil {
		t = "" // a boolean is no id
	}
	*id = tokenID(t)
	return nil
}

// scopeList is the scopes of a token answer: an array of strings, or one
// space-separated string; nil for any other JSON value.
type scopeList []string

// UnmarshalJSON implements json.Unmarshaler.
func (l *scopeList) UnmarshalJSON(b []byte) error {
	var list []string
	var one string
	switch {
	case json.Unmarshal(b, &list) == nil:
		*l = list
	case json.Unmarshal(b, &one) == nil:
		*l = strings.Fields(one)
	default:
		*l = nil
	}
	return nil
}

// Token requests a token for req.Organisation with req.Scopes, asking for
// req.Lifetime (or the configured lifetime). A 404 answer with Nuapay's
// error envelope wraps broker.ErrUnknownOrganisation.
func (s *Source) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	if len(req.Scopes) == 0 {
		return broker.Token{}, &broker.RequestError{Merchant: req.Merchant, Field: "scopes", Reason: "Nuapay needs at least one scope"}
	}
	life := req.Lifetime
	if life == 0 {
		life = s.cfg.Lifetime
	}
	if life < MinLifetime || life > MaxLifetime {
		return broker.Token{}, &broker.RequestError{Merchant: req.Merchant, Field: "token_lifetime", Reason: fmt.Sprintf("%s is outside Nuapay's range 10s..%s", life, MaxLifetime)}
	}
	target, err := s.orgURL(req.Merchant, req.Organisation, "/tokens")
	if err != nil {
		return broker.Token{}, err
	}
	life = life.Truncate(time.Second) // expiresIn is whole seconds
	body, _ := json.Marshal(nuapayTokenRequest{Scopes: req.Scopes, ExpiresIn: int64(life / time.Second)})
	sent := s.cfg.Now()
	status, data, err := s.call(httpclient.TokenRequest(ctx), http.MethodPost, target, body)
	if err != nil {
		var ae *broker.APIError
		if errors.As(err, &ae) && ae.StatusCode == http.StatusNotFound && ae.Err == nil {
			ae.Err = s.notFound(data)
		}
		return broker.Token{}, err
	}
	tok, err := ParseToken(status, data, sent, life)
	if ae := (*broker.APIError)(nil); errors.As(err, &ae) {
		s.scrub(ae)
	}
	return tok, err
}

// notFound is the cause of a 404 answer with body to a token request:
// with Gatekeeper's error envelope, the organisation is unknown; without
// it (a web server's or a proxy's page), the base URL does not lead to
// Gatekeeper.
func (s *Source) notFound(body []byte) error {
	if hasEnvelope(body) {
		return broker.ErrUnknownOrganisation
	}
	return fmt.Errorf("the answer is not Nuapay's error body, so %s does not lead to Gatekeeper's token endpoint: check base_url of the provider", s.base.Redacted())
}

// ParseToken parses a Gatekeeper token answer's body (the 201 envelope)
// of success status status. The expiry is at most sent (when the request
// was sent) plus life (the lifetime asked for). A body that is Nuapay's
// error envelope gives its error (ParseError).
func ParseToken(status int, body []byte, sent time.Time, life time.Duration) (broker.Token, error) {
	var env struct {
		Data *nuapayToken `json:"data"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: status, Code: "malformed_response", Err: errors.New("token response is not the JSON envelope")}
	}
	d := env.Data
	if (d == nil || d.AccessToken == "") && hasEnvelope(body) {
		return broker.Token{}, ParseError(status, nil, body, sent)
	}
	if d == nil || d.AccessToken == "" {
		return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: status, Code: "malformed_response", Description: "token response has no data.accessToken"}
	}
	if d.TokenType != "" && !httpclient.IsBearer(string(d.TokenType)) {
		return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: status, Code: "unsupported_token_type", Description: fmt.Sprintf("tokenType %q is not BEARER", scrub.Secrets(string(d.TokenType), d.AccessToken))}
	}
	if d.Status != "" && !strings.EqualFold(string(d.Status), "ACTIVE") {
		return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: status, Code: "inactive_token", Description: fmt.Sprintf("token status is %q", scrub.Secrets(string(d.Status), d.AccessToken))}
	}
	expiry := sent.Add(life) // never longer: a clock skew or an absurd expiryTime would keep a dead token cached
	if d.ExpiryTime.set && d.ExpiryTime.ms < float64(expiry.UnixMilli()) {
		expiry = time.UnixMilli(int64(max(d.ExpiryTime.ms, 0)))
	}
	return broker.Token{Value: broker.Secret(d.AccessToken), Type: "Bearer", Expiry: expiry, ID: string(d.ID), Scopes: d.Scopes, Status: status}, nil
}

// ErrNoTokenID is returned by RevokeToken for a token without an id: it is
// not revoked. Revoking it would take revoking every token of the
// organisation, other instances' and other partners' tools' included.
var ErrNoTokenID = errors.New("nuapay revoke: the token has no id, so it cannot be revoked alone; it was left to expire (revoking all the organisation's tokens would revoke other instances' too)")

// RevokeToken implements broker.Revoker: it revokes the token by its id.
// A token without an id is never revoked (ErrNoTokenID, no call): the
// broker revokes its own tokens only, never the organisation's others. A
// 2xx answer that is Nuapay's error envelope, or whose token status is
// not REVOKED, is an *broker.APIError: the token was not revoked.
func (s *Source) RevokeToken(ctx context.Context, req broker.Request, tok broker.Token) error {
	if tok.ID == "" {
		return ErrNoTokenID
	}
	target, err := s.orgURL(req.Merchant, req.Organisation, "/tokens/"+segment(tok.ID)+"/revoke")
	if err != nil {
		return err
	}
	status, data, err := s.call(ctx, http.MethodPost, target, nil)
	if err != nil {
		return err
	}
	var env struct {
		Data *struct {
			Status text `json:"status"`
		} `json:"data"`
	}
	_ = json.Unmarshal(data, &env) // any other body: revoked, as the status said
	switch {
	case env.Data == nil && hasEnvelope(data):
		ae := ParseError(status, nil, data, s.cfg.Now())
		s.scrub(ae)
		return ae
	case env.Data != nil && env.Data.Status != "" && !strings.EqualFold(string(env.Data.Status), "REVOKED"):
		return &broker.APIError{Provider: "nuapay", StatusCode: status, Code: "not_revoked",
			Description: fmt.Sprintf("token status is %q after the revocation", scrub.Secrets(string(env.Data.Status), tok.Value.Reveal()))}
	}
	return nil
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

// Bounds of one reading of the organisations list, all pages together
// (ListLimits).
const (
	// DefaultMaxOrganisations is the most organisations a list may contain
	// unless ListLimits says otherwise.
	DefaultMaxOrganisations = 100_000
	// ListBytesPerOrganisation is the default byte budget of a reading
	// per organisation allowed: an entry is about 150 bytes, so the
	// budget is reached only by a list padded far beyond its count.
	ListBytesPerOrganisation = 1 << 10
	// MaxListPages is the most pages one reading asks for.
	MaxListPages = 10_000
)

// ListLimits bound one reading of the organisations list, over all its
// pages: past them the reading ends with a *ListTooLargeError.
type ListLimits struct {
	// Organisations is the most organisations the list may contain. Default
	// DefaultMaxOrganisations.
	Organisations int
	// Bytes is the most response bytes read over all pages. Default
	// Organisations × ListBytesPerOrganisation.
	Bytes int64
}

func (l ListLimits) withDefaults() ListLimits {
	if l.Organisations <= 0 {
		l.Organisations = DefaultMaxOrganisations
	}
	if l.Bytes <= 0 {
		l.Bytes = int64(l.Organisations) * ListBytesPerOrganisation
	}
	return l
}

// Pages is the most calls a reading within l makes: every organisation
// at the smallest page size Gatekeeper serves (legacyPageSize), the first
// page asked again at that size, and an empty last page; at most
// MaxListPages.
func (l ListLimits) Pages() int {
	l = l.withDefaults()
	return min(l.Organisations/legacyPageSize+2, MaxListPages)
}

// ListTooLargeError is returned when the organisations list goes past its
// ListLimits: nothing of the reading is to be used.
type ListTooLargeError struct {
	// Limit is what was exceeded: "organisations", "bytes" or "pages".
	Limit string
	// Max is the limit passed, in organisations, bytes or pages.
	Max int64
	// Pages is the number of pages read when the limit was passed.
	Pages int
}

// Error says which limit the list passed and what to change.
func (e *ListTooLargeError) Error() string {
	switch e.Limit {
	case "pages":
		return fmt.Sprintf("nuapay organisations list: more than %d pages; not used (the provider keeps announcing more pages)", e.Max)
	case "bytes":
		return fmt.Sprintf("nuapay organisations list: its answers passed %d bytes after %d pages; not used (the limit is max_organisations × %d bytes: raise max_organisations if the partner has that many organisations)", e.Max, e.Pages, ListBytesPerOrganisation)
	}
	return fmt.Sprintf("nuapay organisations list: more than %d organisations after %d pages; not used (raise max_organisations in the wildcard entry if the partner has that many)", e.Max, e.Pages)
}

// Page sizes of the organisations list: the newer API serves up to
// listPageSize organisations a page; the older one documents
// legacyPageSize, and a provider that refuses the first page at
// listPageSize (400 or 422) is asked again at legacyPageSize.
const (
	listPageSize   = 100
	legacyPageSize = 20
)

// EachOrganisation reads every page of the organisations linked to the
// partner and calls visit with each. Past lim (zero fields: the
// defaults) it stops with a *ListTooLargeError; what visit saw then must
// not be used.
func (s *Source) EachOrganisation(ctx context.Context, lim ListLimits, visit func(Organisation)) error {
	lim = lim.withDefaults()
	var bytes int64
	count := 0
	size := listPageSize
	for page := 1; ; page++ {
		u := s.listURL
		u.RawQuery = url.Values{"pagenumber": {fmt.Sprint(page)}, "pagesize": {fmt.Sprint(size)}}.Encode()
		status, body, err := s.call(ctx, http.MethodGet, u.String(), nil)
		var ae *broker.APIError
		if page == 1 && size > legacyPageSize && errors.As(err, &ae) && (ae.StatusCode == http.StatusBadRequest || ae.StatusCode == http.StatusUnprocessableEntity) {
			size, page = legacyPageSize, 0 // the first page again, smaller
			continue
		}
		if err != nil {
			return err
		}
		if bytes += int64(len(body)); bytes > lim.Bytes {
			return &ListTooLargeError{Limit: "bytes", Max: lim.Bytes, Pages: page}
		}
		var env struct {
			Data []Organisation `json:"data"`
			Page struct {
				TotalPages int `json:"totalPages"`
			} `json:"page"`
		}
		if err := json.Unmarshal(body, &env); err != nil {
			return &broker.APIError{Provider: "nuapay", StatusCode: status, Code: "malformed_response", Err: err}
		}
		if count += len(env.Data); count > lim.Organisations {
			return &ListTooLargeError{Limit: "organisations", Max: int64(lim.Organisations), Pages: page}
		}
		for _, o := range env.Data {
			visit(o)
		}
		if page >= env.Page.TotalPages || len(env.Data) == 0 {
			return nil
		}
		if page >= MaxListPages {
			return &ListTooLargeError{Limit: "pages", Max: MaxListPages, Pages: page}
		}
	}
}

// call sends one Gatekeeper request and returns the status and body of a
// 2xx answer (200 is accepted where 201 is documented); any other answer
// becomes an *broker.APIError built from Nuapay's error envelope, returned
// with the answer's status and body.
func (s *Source) call(ctx context.Context, method, target string, body []byte) (int, []byte, error) {
	var rd io.Reader
	if body != nil {
		rd = bytes.NewReader(body)
	}
	hr, err := http.NewRequestWithContext(ctx, method, target, rd)
	if err != nil {
		return 0, nil, fmt.Errorf("nuapay: building request: %w", err)
	}
	hr.Header.Set("Authorization", s.auth)
	hr.Header.Set("Accept", "application/json")
	if body != nil {
		hr.Header.Set("Content-Type", "application/json")
	}
	resp, err := s.cfg.Client.Do(hr)
	if err != nil {
		return 0, nil, fmt.Errorf("nuapay token API %s: %w", s.base.Host, httpclient.RedactURLError(err))
	}
	defer resp.Body.Close()
	data, tooLarge, err := httpclient.ReadBody(resp.Body) // an error status cut short keeps its status and wait
	ok := resp.StatusCode >= 200 && resp.StatusCode < 300
	if err != nil && ok {
		return 0, nil, fmt.Errorf("nuapay token API %s: reading the response: %w", s.base.Host, err)
	}
	if tooLarge {
		return 0, nil, &broker.APIError{Provider: "nuapay", StatusCode: resp.StatusCode, Code: broker.CodeTooLarge,
			RetryAfter: broker.ParseWait(resp.StatusCode, resp.Header, s.cfg.Now()), Err: &httpclient.TooLargeError{Host: s.base.Host}}
	}
	if ok {
		return resp.StatusCode, data, nil
	}
	ae := ParseError(resp.StatusCode, resp.Header, data, s.cfg.Now())
	s.scrub(ae)
	return resp.StatusCode, data, ae
}

// scrub takes the API key out of the provider's texts in ae: a provider
// that echoes what it was sent must not put the key in our logs, plain
// or as the Basic credential.
func (s *Source) scrub(ae *broker.APIError) {
	secrets := []string{s.cfg.APIKey.Reveal(), strings.TrimPrefix(s.auth, "Basic ")}
	ae.Code, ae.Description = scrub.Secrets(ae.Code, secrets...), scrub.Secrets(ae.Description, secrets...)
	for i := range ae.Details {
		d := &ae.Details[i]
		d.Code, d.Description, d.Field = scrub.Secrets(d.Code, secrets...), scrub.Secrets(d.Description, secrets...), scrub.Secrets(d.Field, secrets...)
	}
}

// hasEnvelope reports whether body is a JSON object with a key of
// Nuapay's error envelope (returnCode, returnDescription, details), even
// a null one: Gatekeeper's answer, not a web server's page or another
// framework's error.
func hasEnvelope(body []byte) bool {
	var keys map[string]json.RawMessage
	if json.Unmarshal(body, &keys) != nil {
		return false
	}
	for _, k := range []string{"returnCode", "returnDescription", "details"} {
		if _, ok := keys[k]; ok {
			return true
		}
	}
	return false
}

// maxDetails is the most error details an error keeps: an answer with
// more says how many it left out.
const maxDetails = 10

// ParseError turns a non-2xx Gatekeeper answer into an *broker.APIError,
// reading Nuapay's error envelope when there is one. "details" may be an
// array or a single object; any field may be null, and a code a number.
// Past maxDetails, a last detail says how many were left out. The wait
// the answer asks for is read from its headers h at now (broker.ParseWait).
func ParseError(status int, h http.Header, body []byte, now time.Time) *broker.APIError {
	ae := &broker.APIError{Provider: "nuapay", StatusCode: status, RetryAfter: broker.ParseWait(status, h, now)}
	var env struct {
		ReturnCode        *text           `json:"returnCode"`
		ReturnDescription *text           `json:"returnDescription"`
		Details           json.RawMessage `json:"details"`
	}
	if err := json.Unmarshal(body, &env); err != nil {
		ae.Description = http.StatusText(status)
		return ae
	}
	if env.ReturnCode != nil {
		ae.Code = string(*env.ReturnCode)
	}
	if env.ReturnDescription != nil {
		ae.Description = string(*env.ReturnDescription)
	}
	var details []errorDetail
	var one errorDetail
	switch d := bytes.TrimSpace(env.Details); {
	case len(d) > 0 && d[0] == '[':
		_ = json.Unmarshal(d, &details)
	case len(d) > 0 && d[0] == '{':
		if json.Unmarshal(d, &one) == nil {
			details = []errorDetail{one}
		}
	}
	for _, d := range details[:min(len(details), maxDetails)] {
		ae.Details = append(ae.Details, broker.ErrorDetail{Code: string(d.Code), Description: string(d.Description), Field: string(d.Field)})
	}
	if n := len(details) - maxDetails; n > 0 {
		ae.Details = append(ae.Details, broker.ErrorDetail{Description: fmt.Sprintf("%d more details left out", n)})
	}
	if ae.Description == "" {
		ae.Description = http.StatusText(status)
	}
	return ae
}

// errorDetail is one entry of the "details" of Nuapay's error envelope.
type errorDetail struct {
	Code        text `json:"code"`
	Description text `json:"description"`
	Field       text `json:"field"`
}

// text is a string of a Nuapay answer that a look-alike may send as
// another JSON scalar (a code as a number): a string is taken as it is, a
// number as its JSON text, a boolean as "true" or "false". Null, an object
// and an array are "": their JSON text could hold a secret in an escaped
// form that scrubbing does not recognise.
type text string

// UnmarshalJSON implements json.Unmarshaler.
func (t *text) UnmarshalJSON(b []byte) error {
	var s string
	var n json.Number
	var flag bool
	switch {
	case json.Unmarshal(b, &s) == nil:
	case json.Unmarshal(b, &n) == nil:
		s = n.String()
	case json.Unmarshal(b, &flag) == nil:
		s = strconv.FormatBool(flag)
	default:
		s = ""
	}
	*t = text(s)
	return nil
}

// Interface guards.
var (
	_ broker.Source      = (*Source)(nil)
	_ broker.Revoker     = (*Source)(nil)
	_ broker.CallBounded = (*Source)(nil)
)
