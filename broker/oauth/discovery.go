package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	"golang.org/x/sync/singleflight"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// endpoints are a provider's endpoints, configured or discovered.
type endpoints struct {
	// Token is the token endpoint used (its mTLS alias, see usesMTLS).
	Token string
	// Revocation is the RFC 7009 revocation endpoint, empty when the
	// provider has none.
	Revocation string
	// AuthMethods are the provider's token_endpoint_auth_methods_supported,
	// when discovered.
	AuthMethods []string
	// AssertionAlgs are the provider's
	// token_endpoint_auth_signing_alg_values_supported, when discovered.
	AssertionAlgs []string

	// What the consent flow (AuthCode) reads from the discovery document.

	auth string // authorization_endpoint
	par  string // pushed_authorization_request_endpoint (its mTLS alias)
	// authErr and parErr are checkURL's refusals of auth (also of none)
	// and par, which only the consent flow refuses (authEndpoints).
	authErr, parErr error
	// requirePAR is require_pushed_authorization_requests.
	requirePAR bool
	// issResponse is authorization_response_iss_parameter_supported.
	issResponse bool
	// dpop is the DPoP key as it signs the proofs to the server
	// (dpop.Key.ForServer), nil without a key.
	dpop *dpop.Key
	// verifier checks the ID tokens of the issuer.
	verifier *oidc.IDTokenVerifier
}

// DiscoveryError is a failed discovery of the provider's endpoints. The
// next Token call discovers again.
type DiscoveryError struct {
	// Issuer is the issuer whose discovery document was wanted.
	Issuer string
	// Err is the cause.
	Err error

	transient bool // see Transient
	// answer is the server's answer of a temporary status with the wait
	// it asks for, so that the failure policy holds the provider as for
	// the same answer of its token endpoint; nil for none.
	answer *broker.APIError
}

// Transient reports whether the authorization server did not answer or
// answered a temporary status (broker.TemporaryStatus): the same discovery
// may succeed later. It is false for an answer that the configuration or
// the server has to change (another issuer, no token_endpoint, no
// document). The consent callback keeps its state for a reload after a
// transient one; Classify does not go by it.
func (e *DiscoveryError) Transient() bool { return e.transient }

// Error describes the failure.
func (e *DiscoveryError) Error() string {
	return fmt.Sprintf("oauth2 discovery of issuer %s failed: %v", e.Issuer, e.Err)
}

// Unwrap returns the cause, and the server's answer when it said it
// failed or is busy.
func (e *DiscoveryError) Unwrap() []error {
	if e.answer != nil {
		return []error{e.Err, e.answer}
	}
	return []error{e.Err}
}

// discovery resolves and caches the provider's endpoints.
type discovery struct {
	cfg *Config
	sf  singleflight.Group

	mu  sync.Mutex
	cur *endpoints // nil until discovered, and again after invalidate
}

func newDiscovery(cfg *Config) *discovery {
	e := &discovery{cfg: cfg}
	if cfg.TokenURL != "" {
		e.cur = &endpoints{Token: cfg.TokenURL, Revocation: cfg.RevocationURL, dpop: cfg.DPoP}
	}
	return e
}

// get returns the endpoints, discovering them when they are not cached.
// Concurrent callers share one discovery; a failure is not cached.
func (e *discovery) get(ctx context.Context) (*endpoints, error) {
	if cur := e.cached(); cur != nil {
		return cur, nil
	}
	ch := e.sf.DoChan("", func() (any, error) {
		// Discovery outlives a cancelled caller (others may wait on it),
		// bounded by the client's timeout.
		ep, err := e.discover(context.WithoutCancel(ctx))
		if err != nil {
			return nil, err
		}
		e.mu.Lock()
		e.cur = ep
		e.mu.Unlock()
		return ep, nil
	})
	select {
	case r := <-ch:
		if r.Err != nil {
			return nil, r.Err
		}
		return r.Val.(*endpoints), nil
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}

// cached returns the endpoints when they are known, else nil.
func (e *discovery) cached() *endpoints {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.cur
}

// invalidate forgets discovered endpoints so that the next call discovers
// again. Configured endpoints are kept.
func (e *discovery) invalidate() {
	if e.cfg.Issuer == "" {
		return
	}
	e.mu.Lock()
	e.cur = nil
	e.mu.Unlock()
}

// discoveryDoc has the discovery fields that go-oidc does not expose.
type discoveryDoc struct {
	RevocationEndpoint string   `json:"revocation_endpoint"`
	AuthMethods        []string `json:"token_endpoint_auth_methods_supported"`
	AssertionAlgs      []string `json:"token_endpoint_auth_signing_alg_values_supported"`
	PAR                string   `json:"pushed_authorization_request_endpoint"`
	RequirePAR         bool     `json:"require_pushed_authorization_requests"`
	IssResponse        bool     `json:"authorization_response_iss_parameter_supported"`
	DPoPAlgs           []string `json:"dpop_signing_alg_values_supported"`
	MTLSAliases        struct {
		TokenEndpoint      string `json:"token_endpoint"`
		RevocationEndpoint string `json:"revocation_endpoint"`
		PAR                string `json:"pushed_authorization_request_endpoint"`
	} `json:"mtls_endpoint_aliases"`
}

// Names of the documents discover reads, for its errors.
const (
	oidcDocument    = "OpenID discovery document"
	rfc8414Document = "RFC 8414 metadata"
)

// discover reads {issuer}/.well-known/openid-configuration with go-oidc,
// which checks the issuer, or on 404 (only then) the RFC 8414 metadata.
// The ID token verifier fetches the keys with the client only, not ctx:
// it outlives the request that discovered.
func (e *discovery) discover(ctx context.Context) (*endpoints, error) {
	fail := func(err error) (*endpoints, error) {
		return nil, e.failed(err, false)
	}
	client := *e.cfg.Client
	// go-oidc's error has the answer's status in its text only.
	var status atomic.Int32
	var wait atomic.Int64
	client.Transport = lastStatus{rt: httpclient.LimitBody(client.Transport), status: &status, wait: &wait, now: e.cfg.Now}
	ctx = oidc.ClientContext(ctx, &client)
	p, err := oidc.NewProvider(ctx, e.cfg.Issuer)
	var doc discoveryDoc
	read := oidcDocument
	var mismatch *oidc.IssuerMismatchError
	switch {
	case errors.As(err, &mismatch):
		return fail(issuerMismatch(mismatch.Discovered, read))
	case err != nil && status.Load() == http.StatusNotFound:
		read = rfc8414Document
		if p, err = e.oauthMetadata(ctx, &client, &doc); err != nil {
			return nil, err
		}
	case err != nil && status.Load() == 0:
		// No answer: the authorization server cannot be reached now.
		return nil, e.failed(errors.New(scrub.Truncate(err.Error(), 300)), true)
	case err != nil && broker.TemporaryStatus(int(status.Load())):
		// go-oidc quotes the whole body of a failed discovery response.
		return nil, e.busy(int(status.Load()), time.Duration(wait.Load()), fmt.Errorf("%s answered %d to the %s request (/.well-known/openid-configuration): the authorization server failed or is busy; the next call tries again (%s)",
			httpclient.Host(e.cfg.Issuer), status.Load(), oidcDocument, scrub.Truncate(err.Error(), 300)))
	case err != nil:
		return fail(errors.New(scrub.Truncate(err.Error(), 300)))
	default:
		if err := p.Claims(&doc); err != nil {
			return fail(fmt.Errorf("reading the %s: %w", oidcDocument, err))
		}
	}
	ep := &endpoints{Token: p.Endpoint().TokenURL, Revocation: doc.RevocationEndpoint, AuthMethods: doc.AuthMethods, AssertionAlgs: doc.AssertionAlgs,
		auth: p.Endpoint().AuthURL, par: doc.PAR, requirePAR: doc.RequirePAR, issResponse: doc.IssResponse, dpop: e.cfg.DPoP.ForServer(doc.DPoPAlgs),
		verifier: p.Verifier(&oidc.Config{ClientID: e.cfg.ClientID, Now: e.cfg.Now})}
	if usesMTLS(e.cfg) {
		if a := doc.MTLSAliases.TokenEndpoint; a != "" {
			ep.Token = a
		}
		if a := doc.MTLSAliases.RevocationEndpoint; a != "" {
			ep.Revocation = a
		}
		if a := doc.MTLSAliases.PAR; a != "" {
			ep.par = a
		}
	}
	if e.cfg.RevocationURL != "" {
		ep.Revocation = e.cfg.RevocationURL
	}
	if ep.Token == "" {
		return fail(fmt.Errorf("the %s has no token_endpoint: check the issuer, or set token_url instead", read))
	}
	if err := checkURL("token_endpoint", ep.Token); err != nil {
		return fail(err)
	}
	if ep.Revocation != "" {
		if err := checkURL("revocation_endpoint", ep.Revocation); err != nil {
			return fail(err)
		}
	}
	ep.authErr = checkURL("authorization_endpoint", ep.auth)
	if ep.par != "" {
		ep.parErr = checkURL("pushed_authorization_request_endpoint", ep.par)
	}
	return ep, nil
}

// failed is the DiscoveryError of cause err, transient or not.
func (e *discovery) failed(err error, transient bool) *DiscoveryError {
	return &DiscoveryError{Issuer: e.cfg.Issuer, Err: err, transient: transient}
}

// busy is the transient DiscoveryError of cause err, an answer of a
// temporary status asking to wait wait, with that answer.
func (e *discovery) busy(status int, wait time.Duration, err error) *DiscoveryError {
	de := e.failed(err, true)
	de.answer = &broker.APIError{Provider: ProviderName, StatusCode: status, Description: http.StatusText(status), RetryAfter: wait}
	return de
}

// issuerMismatch is the refusal of the document what that names another
// issuer: issuers compare as strings (OpenID Connect Discovery §4.3, RFC
// 8414 §3.3), a trailing slash included.
func issuerMismatch(discovered, what string) error {
	return fmt.Errorf("the %s names issuer %q, not the configured one: set issuer to exactly the issuer the authorization server names (a trailing slash included), or check that the URL is the authorization server's",
		what, scrub.Truncate(discovered, scrub.MaxText))
}

// oauthMetadata reads the issuer's RFC 8414 metadata, at
// /.well-known/oauth-authorization-server inserted between the issuer's
// host and path (§3.1), into doc; it must name the issuer (§3.3). It
// returns a go-oidc provider of its endpoints, or a *DiscoveryError.
func (e *discovery) oauthMetadata(ctx context.Context, client *http.Client, doc *discoveryDoc) (*oidc.Provider, error) {
	u, _ := url.Parse(e.cfg.Issuer) // checked by Config.check
	u.Path = "/.well-known/oauth-authorization-server" + strings.TrimSuffix(u.Path, "/")
	u.RawPath = ""
	where := httpclient.Host(e.cfg.Issuer)
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, u.String(), nil)
	if err != nil {
		return nil, e.failed(err, false)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := client.Do(req)
	if err != nil {
		return nil, e.failed(fmt.Errorf("no OpenID discovery document (404), and fetching the RFC 8414 metadata failed: %w", httpclient.RedactURLError(err)), true)
	}
	defer resp.Body.Close()
	body, tooLarge, err := httpclient.ReadBody(resp.Body)
	switch {
	case err != nil:
		return nil, e.failed(fmt.Errorf("no OpenID discovery document (404), and reading the RFC 8414 metadata failed: %w", err), true)
	case tooLarge:
		return nil, e.failed(&httpclient.TooLargeError{Host: where, Status: resp.StatusCode}, broker.TemporaryStatus(resp.StatusCode))
	case broker.TemporaryStatus(resp.StatusCode):
		return nil, e.busy(resp.StatusCode, broker.ParseWait(resp.StatusCode, resp.Header, e.cfg.Now()), fmt.Errorf("%s has no OpenID discovery document (/.well-known/openid-configuration answered 404), and answered %d to the %s request (/.well-known/oauth-authorization-server): the authorization server failed or is busy; the next call tries again",
			where, resp.StatusCode, rfc8414Document))
	case resp.StatusCode != http.StatusOK:
		return nil, e.failed(fmt.Errorf("%s has neither an OpenID discovery document (/.well-known/openid-configuration answered 404) nor RFC 8414 metadata (/.well-known/oauth-authorization-server answered %d): check the issuer, or set token_url instead",
			where, resp.StatusCode), false)
	}
	var m struct {
		discoveryDoc
		Issuer   string   `json:"issuer"`
		Auth     string   `json:"authorization_endpoint"`
		Token    string   `json:"token_endpoint"`
		JWKS     string   `json:"jwks_uri"`
		IDTokens []string `json:"id_token_signing_alg_values_supported"`
	}
	if err := json.Unmarshal(body, &m); err != nil {
		return nil, e.failed(fmt.Errorf("reading the %s of %s: %w", rfc8414Document, where, err), false)
	}
	*doc = m.discoveryDoc
	if m.Issuer != e.cfg.Issuer {
		return nil, e.failed(issuerMismatch(m.Issuer, rfc8414Document), false)
	}
	pc := oidc.ProviderConfig{IssuerURL: m.Issuer, AuthURL: m.Auth, TokenURL: m.Token, JWKSURL: m.JWKS, Algorithms: m.IDTokens}
	return pc.NewProvider(ctx), nil
}

// lastStatus is a transport that notes the status of the last answer
// through it and the wait it asks for (broker.ParseWait).
type lastStatus struct {
	rt     http.RoundTripper
	status *atomic.Int32
	wait   *atomic.Int64 // a time.Duration
	now    func() time.Time
}

// RoundTrip implements http.RoundTripper.
func (l lastStatus) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := l.rt.RoundTrip(r)
	if err == nil {
		l.status.Store(int32(resp.StatusCode))
		l.wait.Store(int64(broker.ParseWait(resp.StatusCode, resp.Header, l.now())))
	}
	return resp, err
}

// supports reports whether the provider accepts method, as far as its
// discovery document says (true when it says nothing).
func (ep *endpoints) supports(method AuthMethod) bool {
	return len(ep.AuthMethods) == 0 || slices.Contains(ep.AuthMethods, string(method))
}

// usesMTLS reports whether requests of cfg go out with a TLS client
// certificate: they then use the mtls_endpoint_aliases whatever the client
// authentication, so that tokens are certificate-bound (RFC 8705 §5).
func usesMTLS(cfg *Config) bool {
	has, _ := httpclient.HasClientCert(cfg.Client)
	return has || cfg.AuthMethod == TLSClientAuth
}
