package module

import (
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"net/http"
	"net/textproto"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/coreos/go-oidc/v3/oidc"
	gocache "github.com/patrickmn/go-cache"
)

// CallerPolicy makes callers prove who they are with a JWT (for example a
// Kubernetes service-account token or a workload identity) and says which
// merchants each may act for. Without a policy, any caller that can reach the
// sidecar acts for any merchant, which is why the default Caddyfile binds to
// 127.0.0.1 only.
type CallerPolicy struct {
	// Issuer is the JWT issuer (iss) to trust. Required.
	Issuer string `json:"issuer,omitempty"`

	// Audience is the audience (aud) the JWT must carry. Required.
	Audience string `json:"audience,omitempty"`

	// JWKSURL is where the issuer's signing keys are. Default: the
	// jwks_uri of the issuer's OpenID discovery document.
	JWKSURL string `json:"jwks_url,omitempty"`

	// Header carries the caller's JWT, as "Bearer <jwt>". Default
	// Authorization. It is removed before the request goes upstream.
	Header string `json:"header,omitempty"`

	// Allow maps a caller's subject (sub) to the merchants it may act
	// for; "*" allows every merchant.
	Allow map[string][]string `json:"allow,omitempty"`

	header   string
	mu       sync.Mutex
	verifier *oidc.IDTokenVerifier
	ctx      context.Context
	// verified remembers the subjects of JWTs already verified, by the
	// SHA-256 of the JWT, until they expire (at most 5 minutes): a caller
	// reusing its token costs a hash, not a signature check.
	verified *gocache.Cache
	retryAt  time.Time // no discovery before, after a failed one
}

// discoveryClient fetches the caller issuer's discovery document and keys.
var discoveryClient = &http.Client{Timeout: 10 * time.Second}

// discoveryRetry is how long a failed discovery of the caller issuer is
// remembered.
const discoveryRetry = 5 * time.Second

// maxVerifiedTTL bounds how long a verified caller JWT is trusted without
// checking it again.
const maxVerifiedTTL = 5 * time.Minute

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
	p.header = textproto.CanonicalMIMEHeaderKey(p.Header)
	p.ctx = ctx
	p.verified = gocache.New(maxVerifiedTTL, time.Minute)
	if p.JWKSURL != "" {
		p.verifier = oidc.NewVerifier(p.Issuer, oidc.NewRemoteKeySet(oidc.ClientContext(ctx, discoveryClient), p.JWKSURL), p.config())
	}
	return nil
}

func (p *CallerPolicy) config() *oidc.Config {
	return &oidc.Config{ClientID: p.Audience,
		SupportedSigningAlgs: []string{oidc.RS256, oidc.RS384, oidc.RS512, oidc.ES256, oidc.ES384, oidc.ES512, oidc.PS256, oidc.PS384, oidc.PS512, oidc.EdDSA}}
}

// verifierFor returns the verifier, discovering the issuer's keys on first
// use; a failed discovery is tried again on the next request.
func (p *CallerPolicy) verifierFor(ctx context.Context) (*oidc.IDTokenVerifier, error) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.verifier != nil {
		return p.verifier, nil
	}
	if time.Now().Before(p.retryAt) {
		return nil, fmt.Errorf("discovering the caller issuer %s: failed less than %s ago", p.Issuer, discoveryRetry)
	}
	// Bounded: requests wait on this (one at a time), so a slow issuer
	// must not hold them, and a failing one is not asked on every request.
	dctx, cancel := context.WithTimeout(oidc.ClientContext(p.ctx, discoveryClient), 10*time.Second)
	defer cancel()
	prov, err := oidc.NewProvider(dctx, p.Issuer)
	if err != nil {
		p.retryAt = time.Now().Add(discoveryRetry)
		return nil, fmt.Errorf("discovering the caller issuer %s: %w", p.Issuer, err)
	}
	p.verifier = prov.Verifier(p.config())
	return p.verifier, nil
}

// callerError is a refused caller: status 401 or 403 and an error code.
type callerError struct {
	status int
	code   string
	err    error
}

// authenticate verifies the caller's JWT and returns its subject.
func (p *CallerPolicy) authenticate(r *http.Request) (string, *callerError) {
	raw := r.Header.Get(p.header)
	scheme, jwt, ok := strings.Cut(raw, " ")
	if !ok || !strings.EqualFold(scheme, "bearer") || jwt == "" {
		return "", &callerError{http.StatusUnauthorized, "caller_unauthenticated", errors.New("no Bearer JWT in " + p.header)}
	}
	sum := sha256.Sum256([]byte(jwt))
	key := string(sum[:])
	if sub, ok := p.verified.Get(key); ok {
		return sub.(string), nil
	}
	v, err := p.verifierFor(r.Context())
	if err != nil {
		return "", &callerError{http.StatusServiceUnavailable, "caller_keys_unavailable", err}
	}
	tok, err := v.Verify(r.Context(), jwt)
	if err != nil {
		return "", &callerError{http.StatusUnauthorized, "caller_unauthenticated", err}
	}
	if ttl := min(time.Until(tok.Expiry), maxVerifiedTTL); ttl > 0 {
		p.verified.Set(key, tok.Subject, ttl)
	}
	return tok.Subject, nil
}

// allows reports whether subject may act for merchant.
func (p *CallerPolicy) allows(subject, merchant string) bool {
	m := p.Allow[subject]
	return slices.Contains(m, merchant) || slices.Contains(m, "*")
}
