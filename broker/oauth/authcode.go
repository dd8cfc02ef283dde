package oauth

import (
	"bytes"
	"context"
	"crypto/subtle"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"time"

	"golang.org/x/oauth2"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// Consent defaults.
const (
	// DefaultLinkTTL is how long a consent link can be opened.
	DefaultLinkTTL = 10 * time.Minute
	// StateTTL is how long the merchant has, once the link is started, to
	// log in and consent at the provider.
	StateTTL = 15 * time.Minute
)

// Reasons of a *ConsentError, also the outcome sent to the return URL and
// the reason label of the consent metrics.
const (
	ReasonUnknownState    = "unknown_state"
	ReasonExpired         = "expired"
	ReasonWrongProvider   = "wrong_provider"
	ReasonWrongCallback   = "wrong_callback"
	ReasonWrongIssuer     = "wrong_issuer"
	ReasonDenied          = "denied"
	ReasonProviderError   = "provider_error"
	ReasonExchangeFailed  = "exchange_failed"
	ReasonNoRefreshToken  = "no_refresh_token"
	ReasonInvalidIDToken  = "invalid_id_token"
	ReasonReturnURL       = "return_url_not_allowed"
	ReasonProviderFailure = "provider_unavailable"
	ReasonStoreFailure    = "store_failed"
	// ReasonRetryCallback: the state is kept, and the same callback sent
	// again after ConsentError.RetryAfter completes the consent while its
	// code is valid (see Callback).
	ReasonRetryCallback = "retry_callback"
)

// DiscoveryRetry is how long after a failed discovery the consent flow
// discovers again, at least: a longer Retry-After of the failed answer,
// up to broker.MaxRetryAfterMemory, is waited out instead. Until then its
// steps fail at once.
const DiscoveryRetry = 5 * time.Second

// exchangeRetry is the least time after a failed code exchange that a
// callback kept for a retry exchanges its code again (see Callback).
const exchangeRetry = 5 * time.Second

// maxExchangeWait is the longest Retry-After for which a callback is kept
// to exchange its code again: an authorization code lives a minute at
// most (FAPI 2.0).
const maxExchangeWait = 30 * time.Second

// codeExchanges is how many callbacks of one state exchange its code at
// most (see Callback); each sends it once, or twice for a new DPoP nonce
// (nonceRetried).
const codeExchanges = 3

// ConsentError is a refused or failed step of the authorization-code
// flow. Its message names what was wrong and never contains a code, a token,
// a state or a verifier.
type ConsentError struct {
	// Reason is one of the Reason constants.
	Reason string
	// Provider is the provider's name.
	Provider string
	// Merchant is the merchant, when known.
	Merchant string
	// Code is the provider's error code of a ReasonProviderError
	// (invalid_request, unauthorized_client, ...), "unknown" when the
	// provider sent none or a malformed one.
	Code string
	// Err is the cause; for a ReasonProviderError it says what the
	// operator can change.
	Err error
	// RetryAfter is, for a ReasonRetryCallback, how long to wait before
	// the callback is sent again; for a ReasonProviderFailure of Start or
	// AuthorizationOrigin after a temporary discovery failure, the wait
	// before the provider is discovered again, or after a pushed request
	// answered with a Retry-After, that wait.
	RetryAfter time.Duration
}

// Error describes the failure.
func (e *ConsentError) Error() string {
	who := fmt.Sprintf("oauth2 provider %q", e.Provider)
	if e.Merchant != "" {
		who = fmt.Sprintf("merchant %q, %s", e.Merchant, who)
	}
	return fmt.Sprintf("consent refused (%s): %s: %v", e.Reason, who, e.Err)
}

// Unwrap returns the cause.
func (e *ConsentError) Unwrap() error { return e.Err }

// AuthCodeConfig configures the authorization-code flow (the merchant's
// consent) of a refresh-token provider.
type AuthCodeConfig struct {
	// RedirectURIs are the registered callback URLs, each ending in
	// "/callback"; the consent link of one ends in "/start" instead. At
	// least one.
	RedirectURIs []string
	// ReturnURLs is the allow-list of the app's return URLs (see
	// checkReturnURL).
	ReturnURLs []string
	// Scopes are the scopes of the authorization request. Default
	// "openid offline_access" (what OpenID providers want before issuing
	// a refresh token).
	Scopes []string
	// PAR pushes the authorization request (RFC 9126) also when the
	// discovery document does not require it.
	PAR bool
	// AuthorizationURL is the authorization endpoint. Default: from the
	// discovery document; required when the provider has a token_url and
	// no issuer.
	AuthorizationURL string
	// PARURL is the pushed authorization request endpoint. Default: from
	// the discovery document.
	PARURL string
	// LinkTTL is how long a consent link can be opened. Default
	// DefaultLinkTTL.
	LinkTTL time.Duration

	// The authorization request's own parameters. They are sent on the
	// authorization URL, or in the pushed request with PAR.

	// Prompt are the prompt values (OpenID Connect Core §3.1.2.1): login,
	// consent, select_account. consent is added when Scopes contain
	// offline_access (OpenID Connect Core §11: no refresh token
	// otherwise). Optional.
	Prompt []string
	// ACRValues are the requested authentication context classes
	// (acr_values), in order of preference. Optional.
	ACRValues []string
	// Claims is the claims parameter (OpenID Connect Core §5.5): a JSON
	// object. Optional.
	Claims string
	// AuthorizationDetails is the authorization_details parameter (RFC
	// 9396): a JSON array of objects, each with a string "type". Optional.
	AuthorizationDetails string
	// Resources are the resource indicators (RFC 8707) of the
	// authorization request, one resource parameter each. Default the
	// provider's Config.Resource, if any.
	Resources []string

	// Limits bound the links handed out (zero fields: defaults).
	Limits LinkLimits
}

// Prompt values accepted in AuthCodeConfig.Prompt.
var promptValues = []string{"login", "consent", "select_account"}

// authParams checks the authorization-request parameters of cfg and
// returns them as sent; resource is the provider's default resource.
func authParams(cfg AuthCodeConfig, resource string) (url.Values, error) {
	var errs []error
	v := url.Values{}
	prompt := slices.Clone(cfg.Prompt)
	for _, p := range cfg.Prompt {
		switch {
		case p == "none":
			errs = append(errs, errors.New("prompt none cannot ask for a consent, which needs the merchant: remove it"))
		case !slices.Contains(promptValues, p):
			errs = append(errs, fmt.Errorf("prompt %q is unknown (known: %s)", p, strings.Join(promptValues, ", ")))
		}
	}
	if slices.Contains(cfg.Scopes, "offline_access") && !slices.Contains(prompt, "consent") {
		prompt = append(prompt, "consent") // OpenID Connect Core §11
	}
	if len(prompt) > 0 {
		slices.Sort(prompt)
		v.Set("prompt", strings.Join(slices.Compact(prompt), " "))
	}
	for _, a := range cfg.ACRValues {
		if a == "" || strings.ContainsAny(a, " \t\r\n") {
			errs = append(errs, fmt.Errorf("acr_values entry %q must be one non-empty value without spaces", a))
		}
	}
	if len(cfg.ACRValues) > 0 {
		v.Set("acr_values", strings.Join(cfg.ACRValues, " "))
	}
	if cfg.Claims != "" {
		var obj map[string]json.RawMessage
		err := json.Unmarshal([]byte(cfg.Claims), &obj)
		if err == nil && obj == nil {
			err = errors.New("it is null")
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("claims must be a JSON object (OpenID Connect Core §5.5): %v", err))
		} else {
			v.Set("claims", compactJSON(cfg.Claims))
		}
	}
	if cfg.AuthorizationDetails != "" {
		var details []map[string]json.RawMessage
		err := json.Unmarshal([]byte(cfg.AuthorizationDetails), &details)
		if err == nil && details == nil {
			err = errors.New("it is null")
		}
		if err == nil {
			for i, d := range details {
				var typ string
				if json.Unmarshal(d["type"], &typ) != nil || typ == "" {
					err = fmt.Errorf("entry %d has no string \"type\"", i)
					break
				}
			}
		}
		if err != nil {
			errs = append(errs, fmt.Errorf("authorization_details must be a JSON array of objects, each with a string \"type\" (RFC 9396 §2): %v", err))
		} else if len(details) > 0 {
			v.Set("authorization_details", compactJSON(cfg.AuthorizationDetails))
		}
	}
	resources := cfg.Resources
	if len(resources) == 0 && resource != "" {
		resources = []string{resource}
	}
	for _, r := range resources {
		if err := CheckResource(r); err != nil {
			errs = append(errs, err)
		}
		v.Add("resource", r)
	}
	return v, errors.Join(errs...)
}

// CheckResource checks a resource indicator: an absolute URI without a
// fragment (RFC 8707 §2).
func CheckResource(r string) error {
	if u, err := url.Parse(r); err != nil || !u.IsAbs() || u.Fragment != "" || strings.ContainsAny(r, " \t\r\n") {
		return fmt.Errorf("resource %q is not an absolute URI without fragment (RFC 8707)", r)
	}
	return nil
}

// compactJSON returns valid JSON s without insignificant space.
func compactJSON(s string) string {
	var b bytes.Buffer
	if err := json.Compact(&b, []byte(s)); err != nil {
		return s
	}
	return b.String()
}

// AuthCode runs the authorization-code flow with PKCE (S256) for the
// merchants of a RefreshToken source, and stores the refresh token it
// gets with SetRefreshToken. It is safe for concurrent use.
type AuthCode struct {
	src    *RefreshToken
	cfg    AuthCodeConfig
	pend   *Pendings
	params url.Values // the authorization request's own parameters (authParams)
	limits *linkLimiter
	starts linkStarts

	mu      sync.Mutex
	retr    time.Time       // no discovery before, after a failed one
	retrErr *DiscoveryError // that failed discovery
}

// NewAuthCode returns the consent flow of src, keeping its links and
// states in pend.
func NewAuthCode(src *RefreshToken, cfg AuthCodeConfig, pend *Pendings) (*AuthCode, error) {
	name := src.cfg.Name
	var errs []error
	if len(cfg.RedirectURIs) == 0 {
		errs = append(errs, errors.New("no redirect_uris: set the callback URLs registered with the provider"))
	}
	for _, u := range cfg.RedirectURIs {
		if err := checkURL("redirect_uri", u); err != nil {
			errs = append(errs, err)
		} else if pu, _ := url.Parse(u); !strings.HasSuffix(pu.Path, "/callback") || pu.RawQuery != "" {
			errs = append(errs, fmt.Errorf("redirect_uri %q must end in /callback, without a query", u))
		}
	}
	for _, u := range cfg.ReturnURLs {
		if err := checkURL("return_url", u); err != nil {
			errs = append(errs, err)
		}
	}
	if cfg.AuthorizationURL == "" && src.cfg.Issuer == "" {
		errs = append(errs, errors.New("authorization_url is needed when the provider has a token_url instead of an issuer"))
	}
	for _, f := range []struct{ name, v string }{{"authorization_url", cfg.AuthorizationURL}, {"par_url", cfg.PARURL}} {
		if f.v != "" {
			if err := checkURL(f.name, f.v); err != nil {
				errs = append(errs, err)
			}
		}
	}
	if len(cfg.Scopes) == 0 {
		cfg.Scopes = []string{"openid", "offline_access"}
	}
	if slices.Contains(cfg.Scopes, "openid") && src.cfg.Issuer == "" {
		errs = append(errs, errors.New("scope openid needs an issuer (to verify the ID token)"))
	}
	if cfg.LinkTTL < 0 {
		errs = append(errs, errors.New("consent link TTL is negative"))
	}
	if cfg.LinkTTL == 0 {
		cfg.LinkTTL = DefaultLinkTTL
	}
	if l := cfg.Limits; l.MaxPending < 0 || l.MerchantPerMinute < 0 || l.PerMinute < 0 {
		errs = append(errs, errors.New("consent link limits must not be negative"))
	}
	if pend == nil || pend.Store == nil {
		errs = append(errs, errors.New("no store for the consents in progress"))
	}
	params, err := authParams(cfg, src.cfg.Resource)
	errs = append(errs, err)
	if err := errors.Join(errs...); err != nil {
		return nil, fmt.Errorf("oauth2 provider %s, consent: %w", name, err)
	}
	if pend.Now == nil {
		pend.Now = src.cfg.Now
	}
	starts := linkStarts{local: &memoryStarts{now: pend.Now}}
	starts.shared, _ = src.store.(StartCounter)
	return &AuthCode{src: src, cfg: cfg, pend: pend, params: params, limits: newLinkLimiter(cfg.Limits), starts: starts}, nil
}

// Provider returns the provider's name.
func (a *AuthCode) Provider() string { return a.src.cfg.Name }

// RedirectURIs returns the registered callback URLs.
func (a *AuthCode) RedirectURIs() []string { return slices.Clone(a.cfg.RedirectURIs) }

func (a *AuthCode) fail(reason, merchant string, err error) *ConsentError {
	return &ConsentError{Reason: reason, Provider: a.Provider(), Merchant: merchant, Err: err}
}

// unavailable is the ReasonProviderFailure of a step that could not learn
// the provider's endpoints; after a temporary discovery failure, its
// RetryAfter is the wait left before the next discovery.
func (a *AuthCode) unavailable(merchant string, err error) *ConsentError {
	ce := a.fail(ReasonProviderFailure, merchant, err)
	if de, ok := errors.AsType[*DiscoveryError](err); ok && de.Transient() {
		ce.RetryAfter = a.discoveryWait()
	}
	return ce
}

// Link is a consent link handed to the app.
type Link struct {
	// URL is the URL the merchant's browser opens: it shows the start
	// page, and stays usable until a consent started from it completes
	// or it expires.
	URL string
	// Expires is when it stops being accepted.
	Expires time.Time
}

// NewLink creates a consent link for merchant, usable until a consent
// started from it completes or it expires, on the registered callback URL
// whose host is callbackHost (default the first). returnURL, optional,
// must be on the allow-list. A refusal by LinkLimits is a *ConsentError
// wrapping a *LinkLimitError.
func (a *AuthCode) NewLink(ctx context.Context, merchant, returnURL, callbackHost string) (Link, error) {
	if returnURL != "" {
		if err := checkReturnURL(a.cfg.ReturnURLs, returnURL); err != nil {
			return Link{}, a.fail(ReasonReturnURL, merchant, fmt.Errorf("return URL %q refused: %w", scrub.Truncate(returnURL, 200), err))
		}
	}
	redirect := a.cfg.RedirectURIs[0]
	if callbackHost != "" {
		i := slices.IndexFunc(a.cfg.RedirectURIs, func(u string) bool { pu, _ := url.Parse(u); return strings.EqualFold(pu.Host, callbackHost) })
		if i < 0 {
			hosts := make([]string, 0, len(a.cfg.RedirectURIs))
			for _, u := range a.cfg.RedirectURIs {
				pu, _ := url.Parse(u)
				hosts = append(hosts, pu.Host)
			}
			return Link{}, a.fail(ReasonWrongCallback, merchant, fmt.Errorf("no redirect_uri on host %q: callback_host must be one of %s, or left out for the first",
				scrub.Truncate(callbackHost, 200), strings.Join(hosts, ", ")))
		}
		redirect = a.cfg.RedirectURIs[i]
	}
	now := a.pend.Now()
	undo, lerr := a.limits.admit(merchant, now)
	if lerr != nil {
		return Link{}, a.fail(lerr.Reason, merchant, lerr)
	}
	id := randomString(32)
	exp := now.Add(a.cfg.LinkTTL)
	rec := Pending{Provider: a.Provider(), Merchant: merchant, ReturnURL: returnURL, RedirectURI: redirect, Expires: exp}
	if err := a.pend.putUntil(ctx, kindLink, id, rec, exp.Add(linkKept)); err != nil {
		undo() // not handed out: it spends no limit
		return Link{}, a.fail(ReasonStoreFailure, merchant, err)
	}
	a.limits.created(merchant, a.pend.storeKey(kindLink, id), exp)
	start := strings.TrimSuffix(redirect, "callback") + "start?" + url.Values{"link": {id}}.Encode()
	return Link{URL: start, Expires: exp}, nil
}

// StepOption qualifies a Start or a Callback: a Browser binds the
// authorization state to the browser, a Serves refuses the merchants the
// broker no longer serves.
type StepOption interface {
	applyStep(*stepOptions)
}

// stepOptions are the StepOptions of one Start or Callback.
type stepOptions struct {
	browser Browser
	serves  Serves
}

// newStepOptions collects opts.
func newStepOptions(opts []StepOption) stepOptions {
	var o stepOptions
	for _, opt := range opts {
		opt.applyStep(&o)
	}
	return o
}

// applyStep makes b the browser of the step.
func (b Browser) applyStep(o *stepOptions) { o.browser = b }

// Serves reports whether the broker still serves a merchant at the
// flow's provider (a reload may have removed it). As a StepOption, Start
// and Callback refuse another merchant with ReasonUnknownMerchant before
// the provider is asked.
type Serves func(merchant string) bool

// applyStep makes s the check of the step's merchant.
func (s Serves) applyStep(o *stepOptions) { o.serves = s }

// ReasonUnknownMerchant is the refusal of a consent link or an
// authorization state whose merchant the broker no longer serves.
const ReasonUnknownMerchant = "unknown_merchant"

// checkServed refuses rec's merchant when serves says the broker no
// longer serves it.
func (a *AuthCode) checkServed(serves Serves, rec Pending, what string) error {
	if serves == nil || serves(rec.Merchant) {
		return nil
	}
	return a.fail(ReasonUnknownMerchant, rec.Merchant, fmt.Errorf("the %s is for a merchant that provider %q no longer has in the registry (removed or moved by a reload): nothing is stored for it; if it should consent, add it back and ask the app for a new consent link", what, a.Provider()))
}

// CheckLink makes Start's checks of a consent link (arriving at the
// callback URL's host host) and returns whose consent it is, storing and
// sending nothing: a page can show the link before the merchant starts.
func (a *AuthCode) CheckLink(ctx context.Context, linkID, host string, opts ...StepOption) (Pending, error) {
	return a.openLink(ctx, linkID, host, newStepOptions(opts))
}

// openLink reads the link linkID, leaving it stored, and checks its
// provider, callback host, redirect URI and merchant.
func (a *AuthCode) openLink(ctx context.Context, linkID, host string, o stepOptions) (Pending, error) {
	rec, err := a.pend.get(ctx, kindLink, linkID)
	if err != nil {
		return rec, a.pendingError(rec, err, "consent link")
	}
	if rec.Provider != a.Provider() {
		return rec, a.fail(ReasonWrongProvider, rec.Merchant, fmt.Errorf("the consent link is for provider %q", rec.Provider))
	}
	if pu, _ := url.Parse(rec.RedirectURI); host != "" && !strings.EqualFold(pu.Host, host) {
		return rec, a.fail(ReasonWrongCallback, rec.Merchant, fmt.Errorf("the consent link is for %s, not %s", pu.Host, host))
	}
	if !slices.Contains(a.cfg.RedirectURIs, rec.RedirectURI) {
		return rec, a.fail(ReasonWrongCallback, rec.Merchant, fmt.Errorf("the consent link is for redirect URI %s, which the provider's redirect_uris no longer have (a reload changed them): ask the app for a new consent link", rec.RedirectURI))
	}
	if err := a.checkServed(o.serves, rec, "consent link"); err != nil {
		return rec, err
	}
	return rec, nil
}

// AuthorizationOrigin returns the origin (scheme://host[:port]) of the
// provider's authorization endpoint, where Start sends the browser.
func (a *AuthCode) AuthorizationOrigin(ctx context.Context) (string, error) {
	ep, err := a.authEndpoints(ctx)
	if err != nil {
		return "", a.unavailable("", err)
	}
	u, _ := url.Parse(ep.auth) // checked by authEndpoints
	return u.Scheme + "://" + u.Host, nil
}

// Start starts the authorization request of a consent link (arriving at
// the callback URL's host host) and returns the provider's authorization
// URL for the browser, after pushing the request when PAR is on, and
// whose consent it is. Each Start of a link (at most MaxStartsPerLink)
// gets its own state, PKCE verifier and nonce; the first of their
// callbacks to get a code consumes the link. A Browser option binds the
// state to the browser.
func (a *AuthCode) Start(ctx context.Context, linkID, host string, opts ...StepOption) (string, Pending, error) {
	o := newStepOptions(opts)
	rec, err := a.openLink(ctx, linkID, host, o)
	if err != nil {
		return "", rec, err
	}
	// A start refused for want of the provider's endpoints is not counted.
	ep, err := a.authEndpoints(ctx)
	if err != nil {
		return "", rec, a.unavailable(rec.Merchant, err)
	}
	key := a.pend.storeKey(kindLink, linkID)
	a.limits.used(rec.Merchant, key)
	if ok, where := a.starts.start(ctx, key, rec.Expires.Add(linkKept)); !ok {
		return "", rec, a.fail(ReasonTooManyStarts, rec.Merchant, fmt.Errorf("the consent link was started %d times %s, the most one link may be: ask the app for a new consent link", MaxStartsPerLink, where))
	}
	rec.ReturnURL = a.allowedReturn(rec.ReturnURL)
	state := randomString(32)
	rec.Verifier = oauth2.GenerateVerifier()
	if slices.Contains(a.cfg.Scopes, "openid") {
		rec.Nonce = randomString(16)
	}
	rec.Expires = a.pend.Now().Add(StateTTL)
	rec.Browser = o.browser.hash()
	rec.Link = linkID
	params := url.Values{
		"response_type":         {"code"},
		"client_id":             {a.src.cfg.ClientID},
		"redirect_uri":          {rec.RedirectURI},
		"scope":                 {strings.Join(a.cfg.Scopes, " ")},
		"state":                 {state},
		"code_challenge":        {oauth2.S256ChallengeFromVerifier(rec.Verifier)},
		"code_challenge_method": {"S256"},
	}
	if rec.Nonce != "" {
		params.Set("nonce", rec.Nonce)
	}
	if k := a.src.cfg.DPoP; k != nil {
		// RFC 9449 §10: the code is bound to the key, so only a token
		// request with its proofs can redeem it.
		params.Set("dpop_jkt", k.Thumbprint())
	}
	for k, v := range a.params {
		params[k] = slices.Clone(v)
	}
	if err := a.pend.put(ctx, kindState, state, rec); err != nil {
		return "", rec, a.fail(ReasonStoreFailure, rec.Merchant, err)
	}
	if a.usesPAR(ep) {
		if ep.par == "" {
			return "", rec, a.fail(ReasonProviderFailure, rec.Merchant, errors.New("PAR is on but the provider has no pushed_authorization_request_endpoint: set par_url"))
		}
		uri, err := a.push(ctx, ep.par, ep.dpop, params)
		var ae *broker.APIError
		if errors.As(err, &ae) && ae.StatusCode >= 400 && ae.StatusCode < 500 && ae.StatusCode != http.StatusTooManyRequests {
			ce := a.fail(ReasonProviderError, rec.Merchant, fmt.Errorf("%w; %s", err, a.providerHint(ae.Code, true)))
			ce.Code = errorCode(ae.Code)
			if ae.Code == broker.CodeTooLarge {
				ce.Code = errorCode("") // the broker's code: the provider's was in the body not read
			}
			return "", rec, ce
		}
		if err != nil {
			ce := a.fail(ReasonProviderFailure, rec.Merchant, err)
			ce.RetryAfter = askedWait(err)
			return "", rec, ce
		}
		params = url.Values{"client_id": {a.src.cfg.ClientID}, "request_uri": {uri}}
	}
	return httpclient.WithQuery(ep.auth, params), rec, nil
}

// allowedReturn returns u while the allow-list still has it, else "".
func (a *AuthCode) allowedReturn(u string) string {
	if u == "" || checkReturnURL(a.cfg.ReturnURLs, u) != nil {
		return ""
	}
	return u
}

// errorCode returns a provider's error code as it may be shown and sent on:
// lower-case letters, digits and "_.-", at most 64 bytes; "unknown"
// otherwise.
func errorCode(code string) string {
	if code == "" || len(code) > 64 || strings.ContainsFunc(code, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '_' || r == '.' || r == '-')
	}) {
		return "unknown"
	}
	return code
}

// errorDescription returns the error_description of the authorization
// response q as a message may quote it: cut short, the state redacted.
func errorDescription(q url.Values) string {
	return scrub.Secrets(q.Get("error_description"), q.Get("state"))
}

// providerHint tells the operator what to check when the provider
// refuses the authorization request with code; pushed says whether it
// went through PAR.
func (a *AuthCode) providerHint(code string, pushed bool) string {
	table := fmt.Sprintf("[providers.%s.consent]", a.Provider())
	switch code {
	case "invalid_request":
		if !pushed {
			return "if the provider requires pushed authorization requests (PAR) for this client, which its discovery document need not say, set par = true in " + table +
				"; otherwise check the request parameters there (prompt, acr_values, claims, authorization_details, resources)"
		}
		return "check the request parameters in " + table + " (prompt, acr_values, claims, authorization_details, resources) against what the provider accepts"
	case "invalid_client", "unauthorized_client":
		return "check the client's registration at the provider: client authentication, the authorization_code grant and the redirect_uris"
	case "invalid_scope":
		return "check scopes in " + table + " against the scopes the client may ask for"
	case "unsupported_response_type":
		return "the client must be registered for response_type code"
	case "invalid_request_uri", "invalid_request_object":
		return "the provider refused the pushed request: check its PAR endpoint (par_url) and the client's registration"
	case "server_error", "temporarily_unavailable":
		return "the provider failed: the merchant can try again later with a new consent link"
	case "consent_required", "interaction_required", "login_required":
		return "the provider wants the merchant's interaction: check prompt in " + table
	case broker.CodeTooLarge:
		return fmt.Sprintf("its answer was not read, being over %d bytes: check that par_url (or the discovery document's pushed_authorization_request_endpoint) is the provider's PAR endpoint",
			httpclient.MaxResponseBytes)
	}
	return "check the client's registration at the provider and " + table
}

// pendingError turns a failed take into a *ConsentError.
func (a *AuthCode) pendingError(rec Pending, err error, what string) *ConsentError {
	switch {
	case errors.Is(err, errWrongBrowser):
		return a.fail(ReasonWrongBrowser, rec.Merchant, fmt.Errorf("the %s was started in another browser (its consent cookie is missing or differs): it is left for that browser", what))
	case errors.Is(err, errExpired):
		return a.fail(ReasonExpired, rec.Merchant, fmt.Errorf("the %s has expired: ask the app for a new consent link", what))
	case errors.Is(err, ErrUnknownPending):
		return a.fail(ReasonUnknownState, "", fmt.Errorf("the %s is unknown or already used: ask the app for a new consent link", what))
	}
	return a.fail(ReasonStoreFailure, "", fmt.Errorf("reading the %s: %w", what, err))
}

// Result is the outcome of a callback, as far as it is known.
type Result struct {
	// Merchant who consented.
	Merchant string
	// ReturnURL to send the browser to, if any.
	ReturnURL string
	// Fingerprint of the stored refresh token.
	Fingerprint string
}

// Callback handles the provider's redirect to the callback URL (on host
// host, with query q) and stores the merchant's refresh token:
//   - The state is read first: an unknown, used or expired one, or one
//     Start bound to another Browser (left stored for that browser), is
//     refused without asking the provider.
//   - The endpoints are read before the state is spent: while they cannot
//     be discovered now (a transient *DiscoveryError) or ctx ends first,
//     the callback fails with ReasonRetryCallback and the time until the
//     flow discovers again (discoveryWait), the state kept; a failure
//     that trying again does not mend (permanent), or a wait over
//     maxExchangeWait, spends it.
//   - The state is taken, so that of concurrent callbacks one goes on;
//     the rest is detached from ctx's cancellation, bounded by
//     SaveTimeout, and so is each put-back after a failure.
//   - After the checks of the provider, host, Serves option, issuer (RFC
//     9207) and the provider's error, the consent link is claimed
//     (claimLink), the code exchanged with the PKCE verifier, the ID token
//     verified and the refresh token saved; when one of these fails, the
//     link is put back as it was (unclaimLink).
//
// A code exchange the provider very likely did not process (unredeemed)
// is tried again: the state is put back bound to that code, and the
// callback fails with ReasonRetryCallback; the same callback, reloaded at
// least exchangeRetry (or a longer Retry-After) after the failure,
// exchanges the code again, and sooner fails so again without asking the
// provider. A Retry-After over maxExchangeWait, a retry due only once the
// state has expired, or codeExchanges failed callbacks spend the state,
// as any other failure does. Should the provider have redeemed the code
// after all, it refuses the code sent again (invalid_grant) and the
// merchant starts the link again. A reload with another code is refused.
//
// The Result is filled as far as the state is known, also on errors, so
// that the browser can be sent back.
func (a *AuthCode) Callback(ctx context.Context, host string, q url.Values, opts ...StepOption) (Result, error) {
	o := newStepOptions(opts) // without a Browser: refused for a state bound to a browser
	state := q.Get("state")
	rec, err := a.pend.getFrom(ctx, kindState, state, o.browser)
	var ep *endpoints
	var epErr error
	if err == nil {
		if ep, epErr = a.authEndpoints(ctx); epErr != nil && !permanent(epErr) {
			wait := a.discoveryWait()
			if wait <= maxExchangeWait {
				ce := a.fail(ReasonRetryCallback, rec.Merchant, fmt.Errorf("%w; the authorization state is kept: the callback, reloaded, completes the consent once the provider answers", epErr))
				ce.RetryAfter = wait
				return Result{}, ce
			}
			epErr = fmt.Errorf("%w; not tried again: the provider asks to wait %s, over %s, longer than its code lives", epErr, wait, maxExchangeWait)
		}
	}
	if err == nil || errors.Is(err, errExpired) {
		rec, err = a.pend.take(ctx, kindState, state)
	}
	res := Result{Merchant: rec.Merchant, ReturnURL: a.allowedReturn(rec.ReturnURL)}
	if err != nil {
		if !errors.Is(err, errExpired) {
			res = Result{}
		}
		ce := a.pendingError(rec, err, "authorization state")
		if code := q.Get("error"); code != "" {
			ce.Err = fmt.Errorf("%w; the redirect carries error=%s: %s", ce.Err, errorCode(code), errorDescription(q))
		}
		return res, ce
	}
	// The state is spent: losing what follows would lose the consent.
	ctx, cancel := detached(ctx)
	defer cancel()
	if rec.Provider != a.Provider() {
		return Result{}, a.fail(ReasonWrongProvider, rec.Merchant, fmt.Errorf("the authorization state was issued for provider %q", rec.Provider))
	}
	if pu, _ := url.Parse(rec.RedirectURI); !strings.EqualFold(pu.Host, host) {
		return res, a.fail(ReasonWrongCallback, rec.Merchant, fmt.Errorf("the callback arrived at %s, the request named %s", host, pu.Host))
	}
	if err := a.checkServed(o.serves, rec, "authorization state"); err != nil {
		return res, err
	}
	if epErr != nil {
		return res, a.fail(ReasonProviderFailure, rec.Merchant, epErr)
	}
	if iss, ok := q["iss"]; ok || ep.issResponse {
		shown := scrub.Truncate(strings.Join(iss, ","), scrub.MaxText)
		switch issuer := a.src.cfg.Issuer; {
		case issuer == "":
			return res, a.fail(ReasonWrongIssuer, rec.Merchant, fmt.Errorf("the authorization response carries iss %q (RFC 9207), which the broker cannot check: the provider has a token_url, no issuer; set issuer in [providers.%s] to the provider's issuer identifier (its OpenID discovery document or RFC 8414 metadata then gives the endpoints) instead of token_url", shown, a.Provider()))
		case len(iss) != 1 || iss[0] != issuer:
			return res, a.fail(ReasonWrongIssuer, rec.Merchant, fmt.Errorf("the authorization response's iss %q is not the provider's issuer %q (RFC 9207: a mix-up attack or a misconfigured issuer)", shown, issuer))
		}
	}
	if code := q.Get("error"); code != "" {
		desc := errorDescription(q)
		if code == "access_denied" { // the merchant said no (RFC 6749 §4.1.2.1)
			return res, a.fail(ReasonDenied, rec.Merchant, fmt.Errorf("the provider answered access_denied: %s", desc))
		}
		code = errorCode(code)
		ce := a.fail(ReasonProviderError, rec.Merchant, fmt.Errorf("the provider refused the authorization request with %s: %s; %s",
			code, desc, a.providerHint(code, a.usesPAR(ep))))
		ce.Code = code
		return res, ce
	}
	code := q.Get("code")
	if code == "" {
		return res, a.fail(ReasonExchangeFailed, rec.Merchant, errors.New("the callback has neither code nor error"))
	}
	if rec.Code != "" && subtle.ConstantTimeCompare([]byte(rec.Code), []byte(digest("code", code))) != 1 {
		return res, a.fail(ReasonExchangeFailed, rec.Merchant, errors.New("the callback carries another code than the one whose exchange failed and is to be tried again: it is not exchanged, and the authorization state is spent; ask the app for a new consent link"))
	}
	if a.pend.Now().Before(rec.Retry) {
		return a.retryLater(ctx, state, rec, res, a.fail(ReasonExchangeFailed, rec.Merchant, errors.New("the code exchange failed a moment ago")))
	}
	link, err := a.claimLink(ctx, rec)
	if err != nil {
		return res, err
	}
	grant := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {rec.RedirectURI}, "code_verifier": {rec.Verifier}}
	raw, err := nonceRetried(func() (*oauth2.Token, error) {
		_, raw, err := a.src.exchange(ctx, broker.Request{Merchant: rec.Merchant}, grant, code, rec.Verifier)
		return raw, err
	})
	if err != nil {
		ce, back := a.unclaimLink(ctx, rec, link, a.fail(ReasonExchangeFailed, rec.Merchant, fmt.Errorf("exchanging the code: %w", err)))
		if !unredeemed(err) || !back { // the reload would find no link to claim
			return res, ce
		}
		wait := max(exchangeRetry, broker.RetryAfterOf(err))
		rec.Code, rec.Tries, rec.Retry = digest("code", code), rec.Tries+1, a.pend.Now().Add(wait)
		switch {
		case rec.Tries >= codeExchanges:
			ce.Err = fmt.Errorf("%w; not tried again: %d callbacks failed to exchange the code", ce.Err, rec.Tries)
		case wait > maxExchangeWait:
			ce.Err = fmt.Errorf("%w; not tried again: the provider asks to wait %s, over %s, longer than its code lives", ce.Err, wait, maxExchangeWait)
		case !rec.Retry.Before(rec.Expires):
			ce.Err = fmt.Errorf("%w; not tried again: the authorization state expires first, within the %s to wait before the code is exchanged again", ce.Err, wait)
		default:
			return a.retryLater(ctx, state, rec, res, ce)
		}
		return res, ce
	}
	// An ID token is verified when openid was asked, or when one came
	// back and the provider has an issuer to verify it with; else it is
	// ignored (RFC 6749 §5.1).
	idToken := raw.Extra("id_token") // nil or "" when absent, also from a form-encoded answer
	if rec.Nonce != "" || idToken != nil && idToken != "" && ep.verifier != nil {
		if err := a.verifyIDToken(ctx, ep, idToken, rec.Nonce); err != nil {
			ce, _ := a.unclaimLink(ctx, rec, link, a.fail(ReasonInvalidIDToken, rec.Merchant, err))
			return res, ce
		}
	}
	rt := broker.Secret(raw.RefreshToken)
	if rt == "" {
		ce, _ := a.unclaimLink(ctx, rec, link, a.fail(ReasonNoRefreshToken, rec.Merchant, errors.New("the token response has no refresh_token: ask for the scope the provider wants for one (offline_access) and check that the client may use the refresh_token grant")))
		return res, ce
	}
	if err := a.src.SetRefreshToken(ctx, rec.Merchant, rt); err != nil {
		ce, _ := a.unclaimLink(ctx, rec, link, a.fail(ReasonStoreFailure, rec.Merchant, err))
		return res, ce
	}
	res.Fingerprint = rt.Fingerprint()
	return res, nil
}

// linkKept is how long a consent link stays stored past its expiry, so
// that a state started from it just before then finds it at its callback;
// the extra minute is for clock skew and stores that keep whole seconds.
const linkKept = StateTTL + time.Minute

// claimLink consumes the consent link the state rec was started from,
// expired or not, and returns its record for unclaimLink. Of the states
// started from one link only the first to claim it goes on; the others
// get ReasonUnknownState. A state without a link claims nothing.
func (a *AuthCode) claimLink(ctx context.Context, rec Pending) (Pending, error) {
	if rec.Link == "" {
		return Pending{}, nil
	}
	link, err := a.pend.take(ctx, kindLink, rec.Link)
	switch {
	case err == nil, errors.Is(err, errExpired):
		return link, nil
	case errors.Is(err, ErrUnknownPending):
		return Pending{}, a.fail(ReasonUnknownState, rec.Merchant, errors.New("the consent link of this authorization state was already used by another authorization started from it, or it is unknown: this code is not exchanged; if no consent completed, ask the app for a new consent link"))
	}
	return Pending{}, a.fail(ReasonStoreFailure, rec.Merchant, fmt.Errorf("consuming the consent link: %w", err))
}

// unclaimLink puts back the consent link link, claimed by the state rec
// whose consent then failed, as it was (once expired, it is refused as
// expired rather than used). It returns ce, with a note when the link
// cannot be put back, and whether the link is stored (back).
func (a *AuthCode) unclaimLink(ctx context.Context, rec, link Pending, ce *ConsentError) (_ *ConsentError, back bool) {
	if link.Provider == "" { // no link claimed
		return ce, true
	}
	ctx, cancel := detached(ctx) // the exchange may have spent ctx's time
	defer cancel()
	if err := a.pend.putUntil(ctx, kindLink, rec.Link, link, link.Expires.Add(linkKept)); err != nil {
		ce.Err = fmt.Errorf("%w; the consent link could not be put back (%v): ask the app for a new consent link", ce.Err, err)
		return ce, false
	}
	return ce, true
}

// unredeemed reports whether err, a code exchange's failure, says that
// the provider very likely did not process the request, so that the code
// may be sent again: a dial error, a transient *DiscoveryError (nothing
// was sent), an answer 408, 425, 429 or 503 (a temporary status, but for
// the 5xx a server sends after reading the request), or a use_dpop_nonce
// that brought a new nonce. A use_dpop_nonce without one would be refused
// again; a timeout or a cut once the request was sent, 500, 502 or 504
// may follow a redemption.
func unredeemed(err error) bool {
	if _, ok := errors.AsType[*nonceChallengeError](err); ok {
		return true
	}
	if de, ok := errors.AsType[*DiscoveryError](err); ok {
		return de.Transient()
	}
	if ae, ok := errors.AsType[*broker.APIError](err); ok {
		s := ae.StatusCode // a temporary status, but for a 5xx sent after the request was read
		return broker.TemporaryStatus(s) && (s < 500 || s == http.StatusServiceUnavailable) && ae.Code != "use_dpop_nonce"
	}
	oe, ok := errors.AsType[*net.OpError](err)
	return ok && oe.Op == "dial"
}

// retryLater puts back the state rec of a callback refused with ce, so
// that the same callback, reloaded, exchanges its code again: no Result
// and ReasonRetryCallback, with the time left until rec.Retry. When rec
// cannot be put back, it returns res and ce, with a note.
func (a *AuthCode) retryLater(ctx context.Context, state string, rec Pending, res Result, ce *ConsentError) (Result, error) {
	ctx, cancel := detached(ctx) // the exchange may have spent ctx's time
	defer cancel()
	if err := a.pend.put(ctx, kindState, state, rec); err != nil {
		ce.Err = fmt.Errorf("%w; the authorization state could not be kept to try again (%v): ask the app for a new consent link", ce.Err, err)
		return res, ce
	}
	ce = a.fail(ReasonRetryCallback, rec.Merchant, fmt.Errorf("%w; the authorization state is kept: the callback, reloaded from %s on, exchanges the code again",
		ce.Err, rec.Retry.UTC().Format(time.RFC3339)))
	ce.RetryAfter = rec.Retry.Sub(a.pend.Now())
	return Result{}, ce
}

// verifyIDToken checks the token response's id_token v, a string, with
// go-oidc (signature, issuer, audience, expiry) and its nonce.
func (a *AuthCode) verifyIDToken(ctx context.Context, ep *endpoints, v any, nonce string) error {
	s, isString := v.(string)
	if v == nil || v == "" {
		return errors.New("the token response has no id_token although openid was asked for")
	}
	if !isString {
		return errors.New("the token response's id_token is not a string, so not an ID token (a JWT)")
	}
	if ep.verifier == nil {
		return errors.New("an id_token came back but the provider has no issuer to verify it with")
	}
	tok, err := ep.verifier.Verify(ctx, s)
	if err != nil {
		return fmt.Errorf("the ID token does not verify: %w", err)
	}
	if tok.Nonce != nonce {
		return errors.New("the ID token's nonce is not the one sent")
	}
	return nil
}

// permanent reports whether err, a failure to read the provider's
// endpoints, is one that trying again does not mend: a discovery that is
// not transient, or an endpoint that is not a usable URL.
func permanent(err error) bool {
	var de *DiscoveryError
	var ue *endpointURLError
	return errors.As(err, &de) && !de.Transient() || errors.As(err, &ue)
}

// authEndpoints returns the source's endpoints with the configured
// authorization and PAR endpoints, or the refusal of a discovered one the
// flow uses that is not a usable URL. After a failed discovery it fails
// as that discovery did, without discovering, for DiscoveryRetry or the
// failed answer's longer Retry-After (at most broker.MaxRetryAfterMemory).
func (a *AuthCode) authEndpoints(ctx context.Context) (*endpoints, error) {
	cfg := a.src.cfg
	d := a.src.ep.cached()
	if d == nil {
		a.mu.Lock()
		retr, last := a.retr, a.retrErr
		a.mu.Unlock()
		if last != nil && cfg.Now().Before(retr) {
			return nil, &DiscoveryError{Issuer: cfg.Issuer, Err: fmt.Errorf("not tried again before %s: %w", retr.UTC().Format(time.RFC3339), last.Err), transient: last.transient}
		}
		var err error
		if d, err = a.src.ep.get(ctx); err != nil {
			if de := (*DiscoveryError)(nil); errors.As(err, &de) {
				wait := max(DiscoveryRetry, askedWait(de))
				a.mu.Lock()
				a.retr, a.retrErr = cfg.Now().Add(wait), de // from the failure, not the start
				a.mu.Unlock()
			}
			return nil, err
		}
	}
	ep := *d
	if a.cfg.AuthorizationURL != "" {
		ep.auth, ep.authErr = a.cfg.AuthorizationURL, nil
	}
	if a.cfg.PARURL != "" {
		ep.par, ep.parErr = a.cfg.PARURL, nil
	}
	if ep.authErr != nil {
		return nil, ep.authErr
	}
	if ep.parErr != nil && a.usesPAR(&ep) {
		return nil, ep.parErr
	}
	return &ep, nil
}

// discoveryWait returns how long from now the flow does not discover
// again after a failed discovery (see authEndpoints), DiscoveryRetry when
// that time has passed.
func (a *AuthCode) discoveryWait() time.Duration {
	a.mu.Lock()
	defer a.mu.Unlock()
	if left := a.retr.Sub(a.src.cfg.Now()); left > 0 {
		return left
	}
	return DiscoveryRetry
}

// askedWait is the wait a provider's answer in err asked for (its
// Retry-After), at most broker.MaxRetryAfterMemory; zero when it asked
// none.
func askedWait(err error) time.Duration {
	return min(broker.RetryAfterOf(err), broker.MaxRetryAfterMemory)
}

// usesPAR reports whether the authorization requests to ep are pushed:
// configured so, or required by the discovery document.
func (a *AuthCode) usesPAR(ep *endpoints) bool { return a.cfg.PAR || ep.requirePAR }

// ConsentStatus is what this process knows of a merchant's consent.
type ConsentStatus struct {
	// LastRefresh is the last successful refresh, zero if none yet.
	LastRefresh time.Time
	// ConsentRequiredSince is when a refresh first found the refresh token
	// refused or missing, zero once a refresh worked or one was stored.
	ConsentRequiredSince time.Time
}

// note records the outcome of a refresh for the merchant's ConsentStatus.
func (s *RefreshToken) note(merchant string, err error) {
	var cr *ConsentRequiredError
	s.mu.Lock()
	defer s.mu.Unlock()
	st := s.status[merchant]
	switch {
	case err == nil:
		st.LastRefresh, st.ConsentRequiredSince = s.cfg.Now(), time.Time{}
	case errors.As(err, &cr):
		if st.ConsentRequiredSince.IsZero() {
			st.ConsentRequiredSince = s.cfg.Now()
		}
	default:
		return
	}
	s.status[merchant] = st
}

// ConsentStatus returns what this process knows of merchant's consent.
func (s *RefreshToken) ConsentStatus(merchant string) ConsentStatus {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.status[merchant]
}
