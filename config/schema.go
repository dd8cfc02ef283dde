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
	Providers map[string]toml.Primitive `toml:"providers"` // [providers.NAME]
	Merchants map[string]toml.Primitive `toml:"merchants"` // [merchants.ID]
}

// The TOML tables of a registry file: the README and the package doc
// describe the keys, their resolution (resolve.go, nuapay.go, oauth2.go,
// consent.go, wildcard.go) gives the defaults and bounds.

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
	Type      string    `toml:"type"`       // "nuapay" or "oauth2"; required
	Timeout   *Duration `toml:"timeout"`    // per token-API call
	TLS       *tlsTOML  `toml:"tls"`        // mutual TLS and trusted CAs
	RateLimit string    `toml:"rate_limit"` // token-request budget: "20/s", "1200/m", "72000/h", "5/10s"
	RateBurst *int      `toml:"rate_burst"` // requests at once after a quiet spell; only with rate_limit
}

// nuapayTOML are the keys of nuapay providers.
type nuapayTOML struct {
	BaseURL           string    `toml:"base_url"` // http(s) URL without query, fragment or credentials; required
	APIKey            string    `toml:"api_key"`  // secret reference; required
	TokenLifetime     *Duration `toml:"token_lifetime"`
	OrganisationsPath string    `toml:"organisations_path"`
}

// oauth2TOML are the keys of oauth2 providers.
type oauth2TOML struct {
	Grant    string `toml:"grant"`     // "client_credentials" or "refresh_token"
	TokenURL string `toml:"token_url"` // exactly one of token_url and issuer
	// Issuer is discovered from {issuer}/.well-known/openid-configuration
	// or, when that answers 404, its RFC 8414 metadata; either document
	// must name exactly this issuer, a trailing slash included.
	Issuer            string            `toml:"issuer"`
	RevocationURL     string            `toml:"revocation_url"` // RFC 7009; default the discovered one
	ClientID          string            `toml:"client_id"`      // required
	ClientSecret      string            `toml:"client_secret"`  // secret reference; client_secret_* methods only
	AuthMethod        string            `toml:"auth_method"`    // default from client_secret, private_key or tls.client_cert
	PrivateKey        string            `toml:"private_key"`    // private_key_jwt: path of the PEM key, like tls.client_key
	KeyID             string            `toml:"key_id"`         // default the key's RFC 7638 thumbprint
	SigningAlg        string            `toml:"signing_alg"`    // PS256, ES256 or RS256
	AssertionAudience string            `toml:"assertion_audience"`
	Audience          string            `toml:"audience"` // when the merchant sets none
	Resource          string            `toml:"resource"` // RFC 8707
	Params            map[string]string `toml:"params"`   // extra token-request parameters, none the broker sets
	DefaultLifetime   *Duration         `toml:"default_lifetime"`
	Consent           *consentTOML      `toml:"consent"` // grant refresh_token only
	DPoP              *dpopTOML         `toml:"dpop"`    // nil: bearer tokens
}

// dpopTOML is a [providers.NAME.dpop] table: the key the provider's
// tokens are bound to (RFC 9449), one per provider and the same on every
// node of a fleet.
type dpopTOML struct {
	// Key is the PEM private key: a {file.PATH} or {env.NAME} secret
	// reference, or a plain path like private_key.
	Key string `toml:"key"`
	Alg string `toml:"alg"` // ES256, PS256, EdDSA or Ed25519; default from the key
}

// tlsTOML is a [providers.NAME.tls] table. Relative paths are resolved
// against the TOML file's folder.
type tlsTOML struct {
	ClientCert string `toml:"client_cert"` // PEM chain (an eIDAS QWAC); requires client_key
	ClientKey  string `toml:"client_key"`
	CAFile     string `toml:"ca_file"` // PEM bundle trusted instead of the system roots
	ServerName string `toml:"server_name"`
}

// merchantTOML is one [merchants.ID] table.
type merchantTOML struct {
	Provider      string    `toml:"provider"`     // required
	Organisation  string    `toml:"organisation"` // Nuapay's encodedOrganisationId; required for nuapay
	Scopes        []string  `toml:"scopes"`       // when the route sets none; nuapay needs one
	TokenLifetime *Duration `toml:"token_lifetime"`
	Audience      string    `toml:"audience"`
	DisplayName   string    `toml:"display_name"` // shown on the consent pages; not on the wildcard entry
}

// providerType is what the registry knows about one provider type. Adding
// a type is adding one entry to providerTypes and a struct of its keys
// embedded in providerTOML.
type providerType struct {
	keys                     []string      // the type's own keys: the toml tags of its struct in providerTOML
	needsScopes              bool          // every merchant needs a scope
	needsOrganisation        bool          // every merchant needs an organisation
	minLifetime, maxLifetime time.Duration // bounds of the merchants' token_lifetime
	// build checks the type's own keys and returns the source, which
	// calls the token API with p's HTTP client; nil when e is bad. Every
	// resolved non-secret value that shapes the source is fed to fp (the
	// provider ID), never a secret value.
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
// checked: MetaData.Keys does not list implicit tables ([merchant.acme]
// defines "merchant"). typeOf gives a provider's type, whose keys alone
// are shown for its unknown key; a key of another provider type is known
// here (checkKeys reports it).
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
// and the keys allowed there. The comparison is exact: BurntSushi's
// decoder matches keys case-insensitively (MetaData.Undecoded would let
// "Provider" through).
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
