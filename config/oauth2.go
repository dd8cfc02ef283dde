package config

import (
	"cmp"
	"crypto/x509"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// Grants of oauth2 providers.
const (
	GrantClientCredentials = "client_credentials"
	GrantRefreshToken      = "refresh_token"
)

// maxOAuthLifetime bounds default_lifetime and the token_lifetime of an
// oauth2 merchant.
const maxOAuthLifetime = 8760 * time.Hour

// maxKeyFile bounds a private_key file.
const maxKeyFile = 64 << 10

// buildOAuth2 returns an OAuth 2.0 source: client credentials, or refresh
// token with the store of the parser's Options.
func buildOAuth2(e *entry, raw *providerTOML, p *Provider, fp *fingerprint) broker.Source {
	cfg := oauth.Config{Name: p.Name, StoreNamespace: e.p.registry, Client: p.client, Logger: e.p.opts.Logger}

	grant := raw.Grant
	switch grant {
	case "":
		grant = GrantClientCredentials
	case GrantClientCredentials:
	case GrantRefreshToken:
		if e.p.opts.RefreshStore == nil {
			e.errf("grant", "%q needs a durable refresh-token store, which this program does not provide: run the broker in Caddy (it keeps refresh tokens in Caddy's storage)", grant)
		}
	default:
		e.errf("grant", "unknown grant %q (known: %s, %s)", grant, GrantClientCredentials, GrantRefreshToken)
	}
	fp.add("grant", grant)

	tokenSet, issuerSet := raw.TokenURL != "", raw.Issuer != ""
	switch {
	case tokenSet && issuerSet:
		e.errf("issuer", "set token_url or issuer, not both")
	case !tokenSet && !issuerSet:
		e.errf("token_url", "missing: set the token endpoint URL, or issuer to discover it")
	case tokenSet:
		cfg.TokenURL = e.httpURL("token_url", raw.TokenURL, true, "the token endpoint URL")
	default:
		cfg.Issuer = e.httpURL("issuer", raw.Issuer, false, "the issuer URL")
	}
	if raw.RevocationURL != "" {
		cfg.RevocationURL = e.httpURL("revocation_url", raw.RevocationURL, true, "the revocation endpoint URL")
	}
	fp.add("token_url", cfg.TokenURL)
	fp.add("issuer", cfg.Issuer)
	fp.add("revocation_url", cfg.RevocationURL)
	p.Endpoint = cmp.Or(cfg.TokenURL, cfg.Issuer)

	cfg.ClientID = e.plain("client_id", raw.ClientID)
	if raw.ClientID == "" {
		e.errf("client_id", "missing: set the client identifier the provider issued")
	}
	fp.add("client_id", cfg.ClientID)
	p.Account = budget.Account(cfg.ClientID)

	cfg.AuthMethod = oauth.AuthMethod(raw.AuthMethod)
	if cfg.AuthMethod == "" {
		switch {
		case raw.ClientSecret != "":
			cfg.AuthMethod = oauth.ClientSecretBasic
		case raw.PrivateKey != "":
			cfg.AuthMethod = oauth.PrivateKeyJWT
		case p.certFile != "":
			cfg.AuthMethod = oauth.TLSClientAuth
		default:
			e.errf("auth_method", "missing: set client_secret, private_key or tls.client_cert, or auth_method (one of %s)", oauth.AuthMethodNames())
		}
	} else if !slices.Contains(oauth.AuthMethods, cfg.AuthMethod) {
		e.errf("auth_method", "unknown method %q (known: %s)", cfg.AuthMethod, oauth.AuthMethodNames())
	}
	fp.add("auth_method", cfg.AuthMethod)

	usesSecret := cfg.AuthMethod == oauth.ClientSecretBasic || cfg.AuthMethod == oauth.ClientSecretPost
	usesKey := cfg.AuthMethod == oauth.PrivateKeyJWT
	switch {
	case usesSecret:
		cfg.ClientSecret = e.secret("client_secret", raw.ClientSecret)
	case raw.ClientSecret != "" && cfg.AuthMethod != "":
		e.errf("client_secret", "not used by auth_method %s: remove it", cfg.AuthMethod)
	}
	for _, f := range []struct{ field, value string }{
		{"private_key", raw.PrivateKey}, {"key_id", raw.KeyID}, {"signing_alg", raw.SigningAlg}, {"assertion_audience", raw.AssertionAudience},
	} {
		if f.value != "" && !usesKey && cfg.AuthMethod != "" {
			e.errf(f.field, "only used by auth_method private_key_jwt (this provider uses %s)", cfg.AuthMethod)
		}
	}
	if usesKey {
		cfg.Signer = e.signer(raw, fp)
		cfg.AssertionAudience = e.plain("assertion_audience", raw.AssertionAudience)
		fp.add("assertion_audience", cfg.AssertionAudience)
	}
	if cfg.AuthMethod == oauth.TLSClientAuth && p.certFile == "" {
		e.errf("tls.client_cert", "missing: auth_method tls_client_auth authenticates with the TLS client certificate: set [providers.%s.tls] client_cert and client_key", p.Name)
	}

	cfg.Audience = e.plain("audience", raw.Audience)
	cfg.Resource = e.plain("resource", raw.Resource)
	fp.add("audience", cfg.Audience)
	fp.add("resource", cfg.Resource)
	if cfg.Resource != "" {
		if err := oauth.CheckResource(cfg.Resource); err != nil {
			e.errf("resource", "%v", err)
		}
	}
	if len(raw.Params) > 0 {
		cfg.Params = map[string]string{}
		for _, k := range slices.Sorted(maps.Keys(raw.Params)) {
			field := "params." + k
			switch {
			case oauth.ReservedParam(k):
				e.errf(field, "the broker sets %s itself: it cannot be configured", k)
			case k == "" || hasControl(k):
				e.errf(field, "invalid parameter name")
			}
			cfg.Params[k] = e.plain(field, raw.Params[k])
			fp.add(field, cfg.Params[k])
		}
	}
	cfg.DefaultLifetime = e.duration("default_lifetime", raw.DefaultLifetime, oauth.DefaultLifetime, time.Second, maxOAuthLifetime)
	fp.add("default_lifetime", cfg.DefaultLifetime)

	if raw.DPoP != nil {
		p.DPoP = e.dpopKey(raw.DPoP, fp)
		cfg.DPoP = p.DPoP
		if told, name := e.p.opts.OnDPoPNonce, p.Name; told != nil {
			cfg.OnDPoPNonce = func() { told(name) }
		}
	}

	if raw.Consent != nil && grant != GrantRefreshToken {
		e.errf("consent", "only providers with grant %q take a consent table (this one uses %s)", GrantRefreshToken, grant)
	}
	if e.bad {
		return nil
	}
	var src broker.Source
	var err error
	if grant == GrantRefreshToken {
		var rt *oauth.RefreshToken
		if rt, err = oauth.NewRefreshToken(cfg, e.p.opts.RefreshStore); err == nil {
			src = rt
			e.consent(raw.Consent, p, rt)
		}
	} else {
		src, err = oauth.NewClientCredentials(cfg)
	}
	if err != nil {
		e.errf("", "%v", err)
		return nil
	}
	return src
}

// signer reads private_key and returns the assertion signer.
func (e *entry) signer(raw *providerTOML, fp *fingerprint) *oauth.Signer {
	path, shown, ok := e.pemPath("private_key", raw.PrivateKey, "")
	kid := e.plain("key_id", raw.KeyID)
	fp.add("key_id", kid)
	fp.add("signing_alg", raw.SigningAlg)
	switch raw.SigningAlg {
	case "", oauth.PS256, oauth.ES256, oauth.RS256:
	default:
		e.errf("signing_alg", "unknown algorithm %q (known: PS256, ES256, RS256)", raw.SigningAlg)
		return nil
	}
	if !ok {
		return nil
	}
	if path == "" {
		e.errf("private_key", "missing: auth_method private_key_jwt needs the path of the PEM private key")
		return nil
	}
	b, ok := e.readPEM("private_key", path, shown, maxKeyFile)
	if !ok {
		return nil
	}
	key, err := oauth.ParsePrivateKey(b)
	if err != nil {
		e.errf("private_key", "%s: %v", shown, err)
		return nil
	}
	// The public key stands for the private one in the ID.
	pub, err := x509.MarshalPKIXPublicKey(key.Public())
	if err != nil {
		e.errf("private_key", "%s: %v", shown, err)
		return nil
	}
	fp.add("private_key.public", string(pub))
	s, err := oauth.NewSigner(key, raw.SigningAlg, kid)
	if err != nil {
		e.errf("signing_alg", "%v", err)
		return nil
	}
	return s
}

// dpopKey reads the [providers.NAME.dpop] key: a whole {file.PATH} or
// {env.NAME} reference is a secret (the PEM itself), anything else a path
// like private_key. The key's thumbprint and algorithm go into the
// provider ID (public; the key never does).
func (e *entry) dpopKey(raw *dpopTOML, fp *fingerprint) *dpop.Key {
	const field = "dpop.key"
	var pemBytes []byte
	src := raw.Key // where the key was read: the reference, or the file as messages name it
	switch ref := raw.Key; {
	case ref == "":
		e.errf(field, "missing: set the PEM private key the tokens are bound to: {file.PATH}, {env.NAME} or a path")
		return nil
	case wholeRef(ref):
		v := e.secret(field, ref)
		if v == "" {
			return nil
		}
		pemBytes = []byte(v.Reveal())
	default:
		path, shown, ok := e.pemPath(field, ref, " ({file.PATH} or a path), or keep it in an environment variable ({env.NAME})")
		if !ok {
			return nil
		}
		src = shown
		if pemBytes, ok = e.readPEM(field, path, shown, maxKeyFile); !ok {
			return nil
		}
	}
	k, err := dpop.ParseKey(pemBytes, "")
	if err != nil {
		e.errf(field, "the key in %s: %v", src, err)
		return nil
	}
	if raw.Alg != "" {
		// The key is good: what is wrong now is alg.
		if k, err = dpop.ParseKey(pemBytes, raw.Alg); err != nil {
			e.errf("dpop.alg", "%v", err)
			return nil
		}
	}
	fp.add("dpop.jkt", k.Thumbprint())
	fp.add("dpop.alg", k.Alg())
	return k
}

// wholeRef reports whether s is exactly one {env.NAME} or {file.PATH}
// reference.
func wholeRef(s string) bool {
	for _, prefix := range []string{"{env.", "{file."} {
		if inner, ok := cut(s, prefix, "}"); ok && !strings.ContainsAny(inner, "{}") {
			return true
		}
	}
	return false
}

// plain expands a non-secret value and refuses control characters.
func (e *entry) plain(field, s string) string {
	v, ok := e.expand(field, s)
	if ok && hasControl(v) {
		e.errf(field, "%q holds control characters", v)
	}
	return v
}

// httpURL expands and checks an http(s) URL with the one endpoint URL
// validator (no credentials, no fragment, no query unless query is true);
// what names the value in the "missing" message.
func (e *entry) httpURL(field, raw string, query bool, what string) string {
	v, ok := e.expand(field, raw)
	if !ok {
		return v
	}
	if v == "" {
		e.errf(field, "missing: set %s", what)
	} else if err := httpclient.CheckURL(v, query); err != nil {
		e.errf(field, "%v", err)
	}
	return v
}
