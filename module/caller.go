package module

import (
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/broker/callers"
)

// CallerPolicy makes callers prove who they are with a JWT (for example a
// Kubernetes service-account token or a workload identity) and says which
// merchants each may act for (package callers decides). Without a policy,
// any caller that can reach the sidecar acts for any merchant, which is why
// the default Caddyfile binds to 127.0.0.1 only.
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
}

// provision checks the policy and returns its verifier; the file paths
// may hold placeholders such as {env.X}.
func (p *CallerPolicy) provision(ctx caddy.Context) (*callers.Policy, error) {
	repl := caddy.NewReplacer()
	return callers.New(ctx, callers.Config{
		Issuer:          p.Issuer,
		Audience:        p.Audience,
		JWKSURL:         p.JWKSURL,
		JWKSFile:        repl.ReplaceKnown(p.JWKSFile, ""),
		CAFile:          repl.ReplaceKnown(p.CAFile, ""),
		RefreshInterval: time.Duration(p.RefreshInterval),
		Header:          p.Header,
		Allow:           p.Allow,
	})
}
