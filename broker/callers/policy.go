// Package callers decides who may use the sidecar, in plain net/http: the
// caller policy (Policy: a JWT from a trusted issuer, verified against the
// issuer's key set, and the merchants each caller may act for) and the
// site guard (Site: a loopback or allowed Host, no cross-site browser
// request). It has no Caddy import; each refusal carries its error code
// (errcode), which package admission answers.
package callers

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"os"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	gocache "github.com/patrickmn/go-cache"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// Config is a caller policy's settings. The file paths are read as given
// (placeholders already replaced).
type Config struct {
	// Issuer is the JWT issuer (iss) to trust. Required.
	Issuer string
	// Audience is the audience (aud) the JWT must carry. Required.
	Audience string
	// JWKSURL is where the issuer's signing keys are. Default: the
	// jwks_uri of the issuer's OpenID discovery document.
	JWKSURL string
	// JWKSFile is a file holding the issuer's public keys as a JWK set
	// (RFC 7517), read by New: no discovery and no key fetch ever
	// happen. Excludes JWKSURL and CAFile.
	JWKSFile string
	// CAFile is a PEM file of the CA certificates trusted for the
	// issuer's discovery document and key set, in place of the system
	// roots.
	CAFile string
	// RefreshInterval is the shortest time between two fetches of the
	// issuer's key set caused by tokens whose kid is known. Default
	// DefaultKeysRefreshInterval.
	RefreshInterval time.Duration
	// Header carries the caller's JWT, as "Bearer <jwt>": Authorization
	// (default) or Proxy-Authorization (IsCredentialHeader).
	Header string
	// Allow maps a caller's subject (sub) to the merchants it may act
	// for; "*" allows every merchant.
	Allow map[string][]string
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

// Policy makes callers prove who they are with a JWT (a Kubernetes
// service-account token, a workload identity) and says which merchants
// each may act for.
//
// The issuer's keys are fetched at most once per RefreshInterval for a
// known kid, at most once per 5 s for an unknown one, and again when 5
// minutes old. A verified JWT is trusted until it expires, for at most 5
// minutes (a revocation at the issuer is not seen before then), unless it
// was verified with keys being fetched again for their age: it is then
// checked again on its next use. Safe for concurrent use.
type Policy struct {
	issuer   string
	audience string
	allow    map[string][]string
	header   string
	client   *http.Client
	keys     *keySet
	now      func() time.Time
	// verifier is nil until the issuer's key-set URL is known.
	verifier atomic.Pointer[oidc.IDTokenVerifier]
	// discovery is a semaphore of one, held while finding the key-set URL;
	// others wait for it as long as their context allows.
	discovery chan struct{}
	ctx       context.Context
	// verified maps the SHA-256 of a verified JWT to its subject until it
	// expires (at most maxVerifiedTTL).
	verified *gocache.Cache
	retryAt  time.Time // no discovery before, after a failed one; guarded by discovery
}

// IsCredentialHeader reports whether name (in any case) may carry the
// caller's JWT: Authorization or Proxy-Authorization, which Caddy's logs
// redact; any other header is logged in clear.
func IsCredentialHeader(name string) bool {
	switch textproto.CanonicalMIMEHeaderKey(name) {
	case "Authorization", "Proxy-Authorization":
		return true
	}
	return false
}

// discoveryTimeout bounds one discovery or key-set request.
const discoveryTimeout = 10 * time.Second

// discoveryRetry is how long a failed discovery of the caller issuer is
// remembered.
const discoveryRetry = 5 * time.Second

// maxVerifiedTTL bounds how long a verified caller JWT is trusted without
// checking it again.
const maxVerifiedTTL = 5 * time.Minute

// challengeRealm is the realm of the WWW-Authenticate challenge.
const challengeRealm = "token_broker"

// New checks c and returns its policy. ctx bounds the policy's discovery
// and key-set requests (the configuration's lifetime: it ends when the
// policy is unloaded).
func New(ctx context.Context, c Config) (*Policy, error) {
	if c.Issuer == "" || c.Audience == "" {
		return nil, errors.New("token_broker callers: issuer and audience are required")
	}
	if len(c.Allow) == 0 {
		return nil, errors.New("token_broker callers: no allow rule: every caller would be refused")
	}
	for sub, merchants := range c.Allow {
		if len(merchants) == 0 {
			return nil, fmt.Errorf("token_broker callers: allow %q names no merchant", sub)
		}
	}
	if c.Header == "" {
		c.Header = "Authorization"
	}
	if !IsCredentialHeader(c.Header) {
		return nil, fmt.Errorf("token_broker callers: header %q: the caller JWT can only be in Authorization or Proxy-Authorization, which Caddy's logs redact; another header would be logged in clear", c.Header)
	}
	if c.RefreshInterval < 0 {
		return nil, fmt.Errorf("token_broker callers: refresh_interval %s must not be negative", c.RefreshInterval)
	}
	if c.JWKSFile != "" && (c.JWKSURL != "" || c.CAFile != "") {
		return nil, errors.New("token_broker callers: jwks_file holds the keys: drop jwks_url and ca_file, which would not be used")
	}
	p := &Policy{issuer: c.Issuer, audience: c.Audience, allow: c.Allow, now: c.Now, ctx: ctx, discovery: make(chan struct{}, 1),
		header: textproto.CanonicalMIMEHeaderKey(c.Header), verified: gocache.New(maxVerifiedTTL, time.Minute)}
	if p.now == nil {
		p.now = time.Now
	}
	interval := c.RefreshInterval
	if interval == 0 {
		interval = DefaultKeysRefreshInterval
	}
	if c.JWKSFile != "" {
		data, err := os.ReadFile(c.JWKSFile)
		if err != nil {
			return nil, fmt.Errorf("token_broker callers: jwks_file: %w", err)
		}
		keys, err := parseJWKS(data)
		if err != nil {
			return nil, fmt.Errorf("token_broker callers: jwks_file %s: %w", c.JWKSFile, err)
		}
		p.keys = &keySet{keys: keys, now: p.now}
		p.verifier.Store(oidc.NewVerifier(p.issuer, p.keys, p.config()))
		return p, nil
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if c.CAFile != "" {
		pool, err := httpclient.CertPool(c.CAFile)
		if err != nil {
			return nil, fmt.Errorf("token_broker callers: ca_file: %w", err)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	// The body cap: go-oidc reads the discovery answer whole.
	p.client = &http.Client{Transport: httpclient.LimitBody(tr), Timeout: discoveryTimeout,
		// Discovery and keys are public: a redirect is not followed to
		// somewhere the operator did not name.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	p.keys = &keySet{ctx: ctx, url: c.JWKSURL, client: p.client, interval: interval, now: p.now}
	if c.JWKSURL != "" {
		p.verifier.Store(oidc.NewVerifier(p.issuer, p.keys, p.config()))
	}
	return p, nil
}

func (p *Policy) config() *oidc.Config {
	algs := make([]string, len(callerAlgs))
	for i, a := range callerAlgs {
		algs[i] = string(a)
	}
	return &oidc.Config{ClientID: p.audience, SupportedSigningAlgs: algs, Now: p.now}
}

// Header is the canonical name of the header that carries the caller's
// JWT; "" for a nil policy.
func (p *Policy) Header() string {
	if p == nil {
		return ""
	}
	return p.header
}

// verifierFor returns the verifier, discovering the issuer's key-set URL
// on first use; a failed discovery is tried again after discoveryRetry. A
// request that waits for another's discovery gives up when ctx ends.
func (p *Policy) verifierFor(ctx context.Context) (*oidc.IDTokenVerifier, error) {
	if v := p.verifier.Load(); v != nil {
		return v, nil
	}
	select {
	case p.discovery <- struct{}{}:
		defer func() { <-p.discovery }()
	case <-ctx.Done():
		return nil, fmt.Errorf("the request ended before the caller issuer %s was discovered: %w", p.issuer, ctx.Err())
	}
	if v := p.verifier.Load(); v != nil {
		return v, nil
	}
	if p.now().Before(p.retryAt) {
		return nil, fmt.Errorf("discovering the caller issuer %s: failed less than %s ago", p.issuer, discoveryRetry)
	}
	dctx, cancel := context.WithTimeout(oidc.ClientContext(p.ctx, p.client), discoveryTimeout)
	defer cancel()
	prov, err := oidc.NewProvider(dctx, p.issuer)
	if err != nil {
		p.retryAt = p.now().Add(discoveryRetry)
		// go-oidc quotes the whole body of a failed discovery answer.
		return nil, fmt.Errorf("discovering the caller issuer %s: %s", p.issuer, scrub.Truncate(err.Error(), 300))
	}
	var meta struct {
		JWKSURI string `json:"jwks_uri"`
	}
	if err := prov.Claims(&meta); err != nil || meta.JWKSURI == "" {
		p.retryAt = p.now().Add(discoveryRetry)
		return nil, fmt.Errorf("discovering the caller issuer %s: no jwks_uri in its discovery document; set jwks_url", p.issuer)
	}
	p.keys.url = meta.JWKSURI // before any use of p.keys: the verifier's store publishes it
	v := oidc.NewVerifier(p.issuer, p.keys, p.config())
	p.verifier.Store(v)
	return v, nil
}

// Error is a refused caller: errcode.CallerUnauthenticated (401) or
// errcode.CallerKeysUnavailable (503).
type Error struct {
	// Code is the refusal's error code.
	Code errcode.Code
	// Err says why, for the log.
	Err error
	// presented says the caller sent a Bearer token (that failed), so the
	// challenge carries error="invalid_token" (RFC 6750 §3.1).
	presented bool
}

// Error returns the reason of the refusal.
func (e *Error) Error() string { return e.Err.Error() }

// Unwrap returns the reason of the refusal.
func (e *Error) Unwrap() error { return e.Err }

// SetChallenge sets the WWW-Authenticate header of h to the challenge of
// an errcode.CallerUnauthenticated refusal (RFC 6750 §3): the Bearer
// scheme and realm, with error="invalid_token" when a token was presented
// (§3.1). It leaves h alone for another refusal.
func (e *Error) SetChallenge(h http.Header) {
	if e.Code != errcode.CallerUnauthenticated {
		return
	}
	c := `Bearer realm="` + challengeRealm + `"`
	if e.presented {
		c += `, error="invalid_token"`
	}
	h.Set("WWW-Authenticate", c)
}

// Authenticate verifies the caller's JWT and returns its subject. A nil
// policy admits every caller, with subject "".
func (p *Policy) Authenticate(r *http.Request) (string, *Error) {
	if p == nil {
		return "", nil
	}
	raw := r.Header.Get(p.header)
	scheme, jwt, _ := strings.Cut(raw, " ")
	jwt = strings.TrimSpace(jwt)
	if !strings.EqualFold(scheme, "bearer") || jwt == "" {
		return "", &Error{Code: errcode.CallerUnauthenticated, Err: errors.New("no Bearer JWT in " + p.header)}
	}
	sum := sha256.Sum256([]byte(jwt))
	key := string(sum[:])
	if sub, ok := p.verified.Get(key); ok {
		return sub.(string), nil
	}
	v, err := p.verifierFor(r.Context())
	if err != nil {
		return "", &Error{Code: errcode.CallerKeysUnavailable, Err: err}
	}
	var unavailable, aged bool
	ctx := context.WithValue(context.WithValue(r.Context(), keysUnavailableKey{}, &unavailable), keysAgedKey{}, &aged)
	tok, err := v.Verify(ctx, jwt)
	if err != nil {
		if unavailable {
			return "", &Error{Code: errcode.CallerKeysUnavailable, Err: err}
		}
		return "", &Error{Code: errcode.CallerUnauthenticated, Err: err, presented: true}
	}
	if ttl := min(tok.Expiry.Sub(p.now()), maxVerifiedTTL); ttl > 0 && !aged {
		p.verified.Set(key, tok.Subject, ttl)
	}
	return tok.Subject, nil
}

// Allows reports whether subject may act for merchant. A nil policy
// allows every subject for every merchant.
func (p *Policy) Allows(subject, merchant string) bool {
	if p == nil {
		return true
	}
	m := p.allow[subject]
	return slices.Contains(m, merchant) || slices.Contains(m, "*")
}
