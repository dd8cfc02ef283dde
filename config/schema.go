package config

import (
	"fmt"
	"maps"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
)

// document is the whole TOML file. Entries are decoded one by one (as
// toml.Primitive) so that a type error in one does not hide the problems of
// the others.
type document struct {
	// Providers are the token APIs, by provider name: [providers.NAME].
	Providers map[string]toml.Primitive `toml:"providers"`
	// Merchants are the merchants, by merchant id: [merchants.ID].
	Merchants map[string]toml.Primitive `toml:"merchants"`
}

// providerTOML is one [providers.NAME] table: the keys common to all
// provider types, and the keys of each type (providerType.keys), which a
// provider of another type may not set.
type providerTOML struct {
	commonProviderTOML
	nuapayTOML
	oauth2TOML
}

// commonProviderTOML are the keys every provider type takes.
type commonProviderTOML struct {
	// Type is the kind of token API: "nuapay" or "oauth2". Required.
	Type string `toml:"type"`
	// Timeout bounds each token-API call. Default 10s, at most 5m.
	Timeout *Duration `toml:"timeout"`
	// TLS configures mutual TLS and the trusted CAs. Optional; required
	// (with client_cert) for oauth2's tls_client_auth.
	TLS *tlsTOML `toml:"tls"`
	// RateLimit is the provider's token-request budget: how many token
	// requests (mints, refreshes, refresh-token grants) the token API
	// accepts from this client, "20/s", "1200/m", "72000/h" or a count
	// per Go duration ("5/10s"). Every
	// profile of the provider spends it; a fleet sharing Redis spends it
	// together, else each sidecar its share (the app's fleet_size).
	// Optional: no budget when unset.
	RateLimit string `toml:"rate_limit"`
	// RateBurst is how many token requests of the budget may go at once
	// after a quiet spell; only with rate_limit. From 1 to one second's
	// worth of rate_limit (at least 1), which is also its default.
	RateBurst *int `toml:"rate_burst"`
}

// nuapayTOML are the keys of nuapay providers.
type nuapayTOML struct {
	// BaseURL (nuapay) is the token API root, an http(s) URL without
	// query, fragment or credentials, e.g. "https://sandbox.nuapay.com".
	// Required. {env.NAME} references are expanded.
	BaseURL string `toml:"base_url"`
	// APIKey (nuapay) is the partner API key: a secret reference,
	// "{env.NAME}" or "{file.PATH}". Required.
	APIKey string `toml:"api_key"`
	// TokenLifetime (nuapay) is the token lifetime asked for when a
	// merchant sets none. Default 1h; Nuapay accepts 10s..31556926s.
	TokenLifetime *Duration `toml:"token_lifetime"`
	// OrganisationsPath (nuapay) is the path of Nuapay's organisations
	// list, default "/organisations". {env.NAME} references are expanded.
	OrganisationsPath string `toml:"organisations_path"`
}

// oauth2TOML are the keys of oauth2 providers.
type oauth2TOML struct {
	// Grant (oauth2) is the grant used: "client_credentials" (default) or
	// "refresh_token" (merchants who consented through the
	// authorization-code flow; their refresh tokens live in the refresh
	// store, never in this file).
	Grant string `toml:"grant"`
	// TokenURL (oauth2) is the token endpoint, e.g.
	// "https://api.oneid.uk/v1/token". Exactly one of token_url and
	// issuer. {env.NAME} references are expanded.
	TokenURL string `toml:"token_url"`
	// Issuer (oauth2) is the authorization server's issuer identifier;
	// the token and revocation endpoints are discovered from
	// {issuer}/.well-known/openid-configuration or, when that answers
	// 404, from its RFC 8414 metadata (/.well-known/oauth-authorization-server
	// before the issuer's path). Either document must name exactly this
	// issuer, a trailing slash included. {env.NAME} references are
	// expanded.
	Issuer string `toml:"issuer"`
	// RevocationURL (oauth2) is the RFC 7009 revocation endpoint.
	// Optional; with issuer, the discovered one is the default.
	RevocationURL string `toml:"revocation_url"`
	// ClientID (oauth2) is the client identifier, in clear. Required.
	// {env.NAME} references are expanded.
	ClientID string `toml:"client_id"`
	// ClientSecret (oauth2) is the client secret: a secret reference,
	// "{env.NAME}" or "{file.PATH}". Required for client_secret_basic and
	// client_secret_post, not allowed with the other methods.
	ClientSecret string `toml:"client_secret"`
	// AuthMethod (oauth2) is the client authentication method:
	// client_secret_basic, client_secret_post, private_key_jwt or
	// tls_client_auth. Default: client_secret_basic with a client_secret,
	// private_key_jwt with a private_key, tls_client_auth with a
	// tls.client_cert.
	AuthMethod string `toml:"auth_method"`
	// PrivateKey (oauth2, private_key_jwt) is the path of the PEM private
	// key that signs the client assertions (PKCS#1, PKCS#8 or SEC1;
	// unencrypted: protect the file instead). A plain path like
	// tls.client_key, relative to this file's folder; {env.NAME}
	// references are expanded.
	PrivateKey string `toml:"private_key"`
	// KeyID (oauth2, private_key_jwt) is the kid header of the
	// assertions, as registered with the provider. Default the key's
	// RFC 7638 SHA-256 thumbprint.
	KeyID string `toml:"key_id"`
	// SigningAlg (oauth2, private_key_jwt) is PS256, ES256 or RS256.
	// Default PS256 for an RSA key, ES256 for an EC P-256 key.
	SigningAlg string `toml:"signing_alg"`
	// AssertionAudience (oauth2, private_key_jwt) is the aud claim of
	// the assertions. Default the URL of the endpoint called (the token
	// endpoint's; the PAR endpoint's for a pushed request). A server that
	// wants its issuer identifier (FAPI 2.0, zitadel) needs it here.
	AssertionAudience string `toml:"assertion_audience"`
	// Audience (oauth2) is sent as the audience parameter when the
	// merchant sets none. Optional. {env.NAME} references are expanded.
	Audience string `toml:"audience"`
	// Resource (oauth2) is sent as the resource parameter (RFC 8707).
	// Optional. {env.NAME} references are expanded.
	Resource string `toml:"resource"`
	// Params (oauth2) are extra form parameters of every token request,
	// [providers.NAME.params]. They cannot replace the parameters the
	// broker sets (grant_type, scope, client_id, ...). {env.NAME}
	// references in the values are expanded.
	Params map[string]string `toml:"params"`
	// DefaultLifetime (oauth2) is the lifetime of a token whose response
	// has no expires_in and that is not a JWT with an exp claim. Default
	// 5m, at most 8760h.
	DefaultLifetime *Duration `toml:"default_lifetime"`
	// Consent (oauth2, grant refresh_token) is the merchants' consent
	// through the sidecar, [providers.NAME.consent] (see consentTOML).
	Consent *consentTOML `toml:"consent"`
	// DPoP (oauth2) binds the provider's tokens to a key (RFC 9449),
	// [providers.NAME.dpop] (see dpopTOML). Optional: without it the
	// tokens are bearer tokens.
	DPoP *dpopTOML `toml:"dpop"`
}

// dpopTOML is a [providers.NAME.dpop] table: the key the provider's
// tokens are bound to. Every token request carries a proof signed with
// it, the provider must answer token_type DPoP, a consent names its
// thumbprint (dpop_jkt), and proxied requests send "Authorization: DPoP
// <token>" with a fresh proof. The key's thumbprint is part of the
// provider ID: sidecars share tokens only when they hold the same key.
type dpopTOML struct {
	// Key is the PEM private key (PKCS#8, SEC1 or PKCS#1, unencrypted):
	// an EC P-256, Ed25519 or RSA key of at least 2048 bits. Either a
	// secret reference, "{file.PATH}" or "{env.NAME}" (a variable holding
	// the PEM itself), or a plain path like private_key, relative to this
	// file's folder ({env.NAME} references in it are expanded). One key
	// per provider, the same on every node of a fleet. Required.
	Key string `toml:"key"`
	// Alg is the proofs' algorithm: ES256, PS256, EdDSA or Ed25519.
	// Default from the key: ES256 for EC P-256, PS256 for RSA, EdDSA for
	// Ed25519 (the cheapest proofs: the recommended key when the provider
	// accepts it). An Ed25519 key takes EdDSA or Ed25519, two names of one
	// algorithm (RFC 9864 deprecates EdDSA for Ed25519): the proofs to an
	// authorization server whose discovery document lists
	// dpop_signing_alg_values_supported carry the name it lists (Ed25519
	// when listed), other proofs the name given. A given alg must fit the
	// key.
	Alg string `toml:"alg"`
}

// tlsTOML is a [providers.NAME.tls] table. Relative paths are resolved
// against the TOML file's folder; {env.NAME} references are expanded.
type tlsTOML struct {
	// ClientCert is the PEM client certificate chain (e.g. an eIDAS
	// QWAC). Requires ClientKey.
	ClientCert string `toml:"client_cert"`
	// ClientKey is the PEM private key of ClientCert.
	ClientKey string `toml:"client_key"`
	// CAFile is a PEM bundle of the CAs trusted for the provider's
	// server certificate, instead of the system roots.
	CAFile string `toml:"ca_file"`
	// ServerName overrides the name checked in the server certificate.
	ServerName string `toml:"server_name"`
}

// merchantTOML is one [merchants.ID] table.
type merchantTOML struct {
	// Provider is the name of the provider that issues this merchant's
	// tokens. Required.
	Provider string `toml:"provider"`
	// Organisation is the provider's id of the merchant's organisation
	// (Nuapay's encodedOrganisationId). Required for nuapay. {env.NAME}
	// references are expanded.
	Organisation string `toml:"organisation"`
	// Scopes are the scopes asked for when the route sets none. Nuapay
	// needs at least one. {env.NAME} references are expanded.
	Scopes []string `toml:"scopes"`
	// TokenLifetime overrides the provider's token_lifetime. Optional.
	TokenLifetime *Duration `toml:"token_lifetime"`
	// Audience is the audience or resource the token is for, if the
	// provider needs one. Optional. {env.NAME} references are expanded.
	Audience string `toml:"audience"`
	// DisplayName is the merchant's name as its people know it, shown on
	// the consent pages ("Consent for Acme Ltd at Example Bank"); default
	// the merchant id. At most 100 characters, no control characters or
	// surrounding spaces. Not on the wildcard entry. Optional.
	DisplayName string `toml:"display_name"`
}

// providerType is what the registry knows about one provider type. Adding
// a type is adding one entry to providerTypes and a struct of its keys
// embedded in providerTOML.
type providerType struct {
	// keys are the provider keys of this type, besides the common ones
	// (commonProviderKeys): the toml tags of its struct in providerTOML.
	keys []string
	// needsScopes: every merchant must end up with at least one scope.
	needsScopes bool
	// needsOrganisation: every merchant must name its organisation.
	needsOrganisation bool
	// minLifetime and maxLifetime bound the merchants' token_lifetime.
	minLifetime, maxLifetime time.Duration
	// build checks the type's own keys and returns the source, which
	// calls the token API with p's HTTP client (nil only when e is bad:
	// build then returns nil). Every resolved non-secret value that
	// shapes the source must be fed to fp so that the provider ID follows
	// it; secret values never are.
	build func(e *entry, raw *providerTOML, p *Provider, fp *fingerprint) broker.Source
}

// commonProviderKeys are the keys every provider type takes.
var commonProviderKeys = tomlKeys(commonProviderTOML{})

// providerTypes are the known provider types, by the name used in "type".
var providerTypes = map[string]providerType{
	"nuapay": {
		keys:              tomlKeys(nuapayTOML{}),
		needsScopes:       true,
		needsOrganisation: true,
		minLifetime:       nuapay.MinLifetime,
		maxLifetime:       nuapay.MaxLifetime,
		build:             buildNuapay,
	},
	"oauth2": {
		keys:        tomlKeys(oauth2TOML{}),
		minLifetime: time.Second,
		maxLifetime: maxOAuthLifetime,
		build:       buildOAuth2,
	},
}

// typeNames lists the known provider types for messages.
func typeNames() string { return strings.Join(slices.Sorted(maps.Keys(providerTypes)), ", ") }

// secretKeys are the keys, in any entry, whose values are secrets, or
// name a private key's file where the key itself may be written by
// mistake (private_key, tls.client_key, dpop.key): a syntax error in
// their value is reported without the text it stumbled on.
var secretKeys = []string{"api_key", "client_secret", "private_key", "client_key", "key"}

// Known keys, from the toml tags of the schema structs.
var (
	topKeys      = tomlKeys(document{})
	providerKeys = tomlKeys(providerTOML{})
	tlsKeys      = tomlKeys(tlsTOML{})
	merchantKeys = tomlKeys(merchantTOML{})
	dpopKeys     = tomlKeys(dpopTOML{})
)

// tomlKeys returns the toml tags of a struct's fields, those of its
// embedded structs included.
func tomlKeys(v any) []string {
	var keys []string
	for f := range reflect.TypeOf(v).Fields() {
		if f.Anonymous {
			keys = append(keys, tomlKeys(reflect.New(f.Type).Elem().Interface())...)
			continue
		}
		key, _, _ := strings.Cut(f.Tag.Get("toml"), ",")
		keys = append(keys, key)
	}
	return keys
}

// providerKeysOf returns the keys a provider of type typ takes, and
// what to call such a provider in messages; every provider key when the
// type is not known.
func providerKeysOf(typ string) ([]string, string) {
	pt, ok := providerTypes[typ]
	if !ok {
		return providerKeys, ""
	}
	return append(slices.Clone(commonProviderKeys), pt.keys...), fmt.Sprintf("a provider of type %s", typ)
}

// unknownPart returns the length of the shortest prefix of k that the
// schema does not know, with the keys allowed in its place and what they
// are the keys of ("" for "here"); 0 when k is known. Every prefix is
// checked because implicit tables ([merchant.acme] defines "merchant")
// are not themselves listed by MetaData.Keys. typeOf gives a provider's
// type: a provider's unknown key is shown the keys of its type only. A key
// of another provider type is known here: the provider's resolution
// reports it (not used by providers of this type).
func unknownPart(k toml.Key, typeOf func(provider string) string) (int, []string, string) {
	for n := 1; n <= len(k); n++ {
		var allowed []string
		what := ""
		switch {
		case n == 1:
			allowed = topKeys
		case n == 2:
			continue // an entry name, checked with the entry
		case n == 3 && k[0] == "providers":
			if slices.Contains(providerKeys, k[2]) {
				continue
			}
			allowed, what = providerKeysOf(typeOf(k[1]))
		case n == 3 && k[1] == WildcardID:
			allowed = wildcardKeys
		case n == 3:
			allowed = merchantKeys
		case n == 4 && k[0] == "providers" && k[2] == "tls":
			allowed = tlsKeys
		case n == 4 && k[0] == "providers" && k[2] == "consent":
			allowed = consentKeys
		case n == 4 && k[0] == "providers" && k[2] == "dpop":
			allowed = dpopKeys
		case n == 4 && k[0] == "providers" && k[2] == "params":
			continue // any parameter name
		}
		if !slices.Contains(allowed, k[n-1]) {
			return n, allowed, what
		}
	}
	return 0, nil, ""
}

// checkKeys reports every key of the file that the schema does not know,
// once per unknown subtree, with the nearest known key when one is close
// (a misspelling) and the keys allowed there. The comparison is exact:
// BurntSushi's decoder also matches keys case-insensitively (so
// MetaData.Undecoded would let "Provider" through), hence the check of
// MetaData.Keys against the schema.
func (p *parser) checkKeys(keys []toml.Key, typeOf func(provider string) string) {
	var reported []toml.Key
	for _, k := range keys {
		if slices.ContainsFunc(reported, func(r toml.Key) bool { return len(r) <= len(k) && slices.Equal(r, k[:len(r)]) }) {
			continue
		}
		if len(k) == 3 && k[0] == "providers" && slices.Contains(providerKeys, k[2]) {
			typ := typeOf(k[1])
			if allowed, what := providerKeysOf(typ); what != "" && !slices.Contains(allowed, k[2]) {
				p.problem(k, fmt.Sprintf("not used by providers of type %s (their keys: %s)", typ, strings.Join(allowed, ", ")))
			}
			continue
		}
		n, allowed, what := unknownPart(k, typeOf)
		if n == 0 {
			continue
		}
		k = k[:n]
		reported = append(reported, k)
		msg := fmt.Sprintf("unknown key %q", k.String())
		if s := nearest(k[n-1], allowed); s != "" {
			msg += fmt.Sprintf(": did you mean %q?", s)
		}
		if len(allowed) > 0 {
			if what == "" {
				what = "known keys here"
			} else {
				what = "the keys of " + what
			}
			msg += " (" + what + ": " + strings.Join(allowed, ", ") + ")"
		}
		p.problem(k, msg)
	}
}
