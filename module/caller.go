package module

import (
	"context"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"os"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coreos/go-oidc/v3/oidc"
	gocache "github.com/patrickmn/go-cache"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// CallerPolicy makes callers prove who they are with a JWT (for example a
// Kubernetes service-account token or a workload identity) and says which
// merchants each may act for. Without a policy, any caller that can reach the
// sidecar acts for any merchant, which is why the default Caddyfile binds to
// 127.0.0.1 only.
//
// The issuer's keys are fetched at most once per RefreshInterval for tokens
// whose key id (kid) is known, at most once per 5 s for a kid not seen
// before (a key rotation), and again when they are 5 minutes old: a forged
// token costs the issuer nothing. A verified JWT is trusted until it
// expires, for at most 5 minutes, without being checked again: revoking
// it at the issuer is not seen before then.
type CallerPolicy struct {
	// Issuer is the JWT issuer (iss) to trust. Required.
	Issuer string `json:"issuer,omitempty"`

	// Audience is the audience (aud) the JWT must carry. Required.
	Audience string `json:"audience,omitempty"`

	// JWKSURL is where the issuer's signing keys are. Default: the
	// jwks_uri of the issuer's OpenID discovery document.
	JWKSURL string `json:"jwks_url,omitempty"`

	// JWKSFile is a file holding the issuer's public keys as a JWK set
	// (RFC 7517), read when the config is loaded: no discovery and no key
	// fetch ever happen; a key rotation needs a new file and a reload.
	// Excludes jwks_url and ca_file.
	JWKSFile string `json:"jwks_file,omitempty"`

	// CAFile is a PEM file of the CA certificates trusted for the
	// issuer's discovery document and key set. It replaces the system
	// roots for these two requests (include a public CA in the file if
	// jwks_uri is on a public host). Default: the system roots.
	CAFile string `json:"ca_file,omitempty"`

	// RefreshInterval is the shortest time between two fetches of the
	// issuer's key set caused by tokens whose kid is known. Default 30s.
	RefreshInterval caddy.Duration `json:"refresh_interval,omitempty"`

	// Header carries the caller's JWT, as "Bearer <jwt>": Authorization
	// (default) or Proxy-Authorization, the request headers Caddy's logs
	// redact. It is removed before the request goes upstream.
	Header string `json:"header,omitempty"`

	// Allow maps a caller's subject (sub) to the merchants it may act
	// for; "*" allows every merchant.
	Allow map[string][]string `json:"allow,omitempty"`

	header   string
	client   *http.Client
	keys     *keySet
	now      func() time.Time // tests move it
	mu       sync.Mutex
	verifier *oidc.IDTokenVerifier
	ctx      context.Context
	// verified remembers the subjects of JWTs already verified, by the
	// SHA-256 of the JWT, until they expire (at most 5 minutes): a caller
	// reusing its token costs a hash, not a signature check.
	verified *gocache.Cache
	retryAt  time.Time // no discovery before, after a failed one
}

// LogRedactedHeaders are the request headers that may carry a credential:
// Caddy's access logs redact them (unless should_log_credentials is set),
// and reverse_proxy's debug logs too. Any other header is logged in clear.
var LogRedactedHeaders = []string{"Authorization", "Proxy-Authorization"}

// IsLogRedactedHeader reports whether Caddy's logs redact the request
// header name (in any case).
func IsLogRedactedHeader(name string) bool {
	return slices.Contains(LogRedactedHeaders, textproto.CanonicalMIMEHeaderKey(name))
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

// provision checks the policy and prepares its verifier.
func (p *CallerPolicy) provision(ctx caddy.Context) error {
	if p.Issuer == "" || p.Audience == "" {
		return errors.New("token_broker callers: issuer and audience are required")
	}
	if len(p.Allow) == 0 {
		return errors.New("token_broker callers: no allow rule: every caller would be refused")
	}
	for sub, merchants := range p.Allow {
		if len(merchants) == 0 {
			return fmt.Errorf("token_broker callers: allow %q names no merchant", sub)
		}
	}
	if p.Header == "" {
		p.Header = "Authorization"
	}
	if !IsLogRedactedHeader(p.Header) {
		return fmt.Errorf("token_broker callers: header %q: the caller JWT can only be in Authorization or Proxy-Authorization, which Caddy's logs redact; another header would be logged in clear", p.Header)
	}
	if p.RefreshInterval < 0 {
		return fmt.Errorf("token_broker callers: refresh_interval %s must not be negative", time.Duration(p.RefreshInterval))
	}
	if p.JWKSFile != "" && (p.JWKSURL != "" || p.CAFile != "") {
		return errors.New("token_broker callers: jwks_file holds the keys: drop jwks_url and ca_file, which would not be used")
	}
	p.header = textproto.CanonicalMIMEHeaderKey(p.Header)
	if p.now == nil {
		p.now = time.Now
	}
	p.ctx = ctx
	p.verified = gocache.New(maxVerifiedTTL, time.Minute)
	interval := time.Duration(p.RefreshInterval)
	if interval == 0 {
		interval = DefaultKeysRefreshInterval
	}
	repl := caddy.NewReplacer()
	if p.JWKSFile != "" {
		path := repl.ReplaceKnown(p.JWKSFile, "")
		data, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("token_broker callers: jwks_file: %w", err)
		}
		keys, err := parseJWKS(data)
		if err != nil {
			return fmt.Errorf("token_broker callers: jwks_file %s: %w", path, err)
		}
		p.keys = &keySet{keys: keys, now: p.now}
		p.verifier = oidc.NewVerifier(p.Issuer, p.keys, p.config())
		return nil
	}
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.TLSClientConfig = &tls.Config{MinVersion: tls.VersionTLS12}
	if p.CAFile != "" {
		path := repl.ReplaceKnown(p.CAFile, "")
		pem, err := os.ReadFile(path)
		if err != nil {
			return fmt.Errorf("token_broker callers: ca_file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return fmt.Errorf("token_broker callers: ca_file %s: no PEM certificate in it", path)
		}
		tr.TLSClientConfig.RootCAs = pool
	}
	p.client = &http.Client{Transport: tr, Timeout: discoveryTimeout,
		// Discovery and keys are public: a redirect is not followed to
		// somewhere the operator did not name.
		CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	p.keys = &keySet{url: p.JWKSURL, client: p.client, interval: interval, now: p.now}
	if p.JWKSURL != "" {
		p.verifier = oidc.NewVerifier(p.Issuer, p.keys, p.config())
	}
	return nil
}

func (p *CallerPolicy) config() *oidc.Config {
	algs := make([]string, len(callerAlgs))
	for i, a := range callerAlgs {
		algs[i] = string(a)
	}
	return &oidc.Config{ClientID: p.Audience, SupportedSigningAlgs: algs, Now: p.now}
}

// verifierFor returns the verifier, discovering the issuer's key-set URL
// on first use; a failed discovery is tried again after discoveryRetry.
func (p *CallerPolicy) verifierFor(ctx context.Context) (*oidc.IDTokenVerifier, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.verifier != nil {
		return p.verifier, nil
	}
	if p.now().Before(p.retryAt) {
		return nil, fmt.Errorf("discovering the caller issuer %s: failed less than %s ago", p.Issuer, discoveryRetry)
	}
	// Bounded: requests wait on this (one at a time), so a slow issuer
	// must not hold them, and a failing one is not asked on every request.
	dctx, cancel := context.WithTimeout(oidc.ClientContext(p.ctx, p.client), discoveryTimeout)
	defer cancel()
	prov, err := oidc.NewProvider(dctx, p.Issuer)
	if err != nil {
		p.retryAt = p.now().Add(discoveryRetry)
		return nil, fmt.Errorf("discovering the caller issuer %s: %w", p.Issuer, err)
	}
	var meta struct {
		JWKSURI string `json:"jwks_uri"`
	}
	if err := prov.Claims(&meta); err != nil || meta.JWKSURI == "" {
		p.retryAt = p.now().Add(discoveryRetry)
		return nil, fmt.Errorf("discovering the caller issuer %s: no jwks_uri in its discovery document; set jwks_url", p.Issuer)
	}
	p.keys.url = meta.JWKSURI // before any use of p.keys: set under p.mu, read after
	p.verifier = oidc.NewVerifier(p.Issuer, p.keys, p.config())
	return p.verifier, nil
}

// callerError is a refused caller: CallerUnauthenticated (401) or
// CallerKeysUnavailable (503).
type callerError struct {
	code errcode.Code
	err  error
	// presented says the caller sent a Bearer token (that failed), so the
	// challenge carries error="invalid_token" (RFC 6750 §3.1).
	presented bool
}

// challenge is the WWW-Authenticate value of the refusal, "" for none. A
// request without a Bearer token gets the scheme and realm only, with no
// error code (RFC 6750 §3.1); a token that fails gets invalid_token.
func (e *callerError) challenge() string {
	switch {
	case e.code != errcode.CallerUnauthenticated:
		return ""
	case e.presented:
		return `Bearer realm="` + challengeRealm + `", error="invalid_token"`
	}
	return `Bearer realm="` + challengeRealm + `"`
}

// authenticate verifies the caller's JWT and returns its subject.
func (p *CallerPolicy) authenticate(r *http.Request) (string, *callerError) {
	raw := r.Header.Get(p.header)
	scheme, jwt, _ := strings.Cut(raw, " ")
	jwt = strings.TrimSpace(jwt)
	if !strings.EqualFold(scheme, "bearer") || jwt == "" {
		return "", &callerError{code: errcode.CallerUnauthenticated, err: errors.New("no Bearer JWT in " + p.header)}
	}
	sum := sha256.Sum256([]byte(jwt))
	key := string(sum[:])
	if sub, ok := p.verified.Get(key); ok {
		return sub.(string), nil
	}
	v, err := p.verifierFor(r.Context())
	if err != nil {
		return "", &callerError{code: errcode.CallerKeysUnavailable, err: err}
	}
	var unavailable bool
	tok, err := v.Verify(context.WithValue(r.Context(), keysUnavailableKey{}, &unavailable), jwt)
	if err != nil {
		if unavailable {
			return "", &callerError{code: errcode.CallerKeysUnavailable, err: err}
		}
		return "", &callerError{code: errcode.CallerUnauthenticated, err: err, presented: true}
	}
	if ttl := min(tok.Expiry.Sub(p.now()), maxVerifiedTTL); ttl > 0 {
		p.verified.Set(key, tok.Subject, ttl)
	}
	return tok.Subject, nil
}

// allows reports whether subject may act for merchant.
func (p *CallerPolicy) allows(subject, merchant string) bool {
	m := p.Allow[subject]
	return slices.Contains(m, merchant) || slices.Contains(m, "*")
}
