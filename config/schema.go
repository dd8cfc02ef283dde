package config

import (
	"fmt"
	"net/http"
	"reflect"
	"slices"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/tokenbroker/caddy-token-broker/broker"
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

// providerTOML is one [providers.NAME] table.
type providerTOML struct {
	// Type is the kind of token API: "nuapay". Required.
	Type string `toml:"type"`
	// BaseURL is the token API root, an http(s) URL without query,
	// fragment or credentials, e.g. "https://sandbox.nuapay.com".
	// Required. {env.NAME} references are expanded.
	BaseURL string `toml:"base_url"`
	// APIKey is the Nuapay partner API key: a secret reference,
	// "{env.NAME}" or "{file.PATH}". Required for nuapay.
	APIKey string `toml:"api_key"`
	// Timeout bounds each token-API call. Default 10s, at most 5m.
	Timeout *Duration `toml:"timeout"`
	// TokenLifetime is the token lifetime asked for when a merchant sets
	// none. Default 1h; nuapay accepts 10s..31556926s.
	TokenLifetime *Duration `toml:"token_lifetime"`
	// OrganisationsPath is the path of Nuapay's organisations list,
	// default "/organisations". {env.NAME} references are expanded.
	OrganisationsPath string `toml:"organisations_path"`
	// TLS configures mutual TLS and the trusted CAs. Optional.
	TLS *tlsTOML `toml:"tls"`
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
}

// providerType is what the registry knows about one provider type. Adding
// a type is adding one entry to providerTypes (and its keys to
// providerTOML).
type providerType struct {
	// needsScopes: every merchant must end up with at least one scope.
	needsScopes bool
	// needsOrganisation: every merchant must name its organisation.
	needsOrganisation bool
	// minLifetime and maxLifetime bound token_lifetime.
	minLifetime, maxLifetime time.Duration
	// build checks the type's own keys and returns the source. Every
	// resolved value that shapes the source, secrets included, must be
	// fed to fp so that the provider ID follows it.
	build func(e *entry, raw *providerTOML, p *Provider, client *http.Client, fp *fingerprint) broker.Source
}

// providerTypes are the known provider types, by the name used in "type".
var providerTypes = map[string]providerType{
	"nuapay": {
		needsScopes:       true,
		needsOrganisation: true,
		minLifetime:       broker.NuapayMinLifetime,
		maxLifetime:       broker.NuapayMaxLifetime,
		build:             buildNuapay,
	},
}

// buildNuapay returns a Nuapay Gatekeeper source.
func buildNuapay(e *entry, raw *providerTOML, p *Provider, client *http.Client, fp *fingerprint) broker.Source {
	key := e.secret("api_key", raw.APIKey, fp)
	p.OrganisationsPath, _ = e.expand("organisations_path", raw.OrganisationsPath)
	if p.OrganisationsPath == "" {
		p.OrganisationsPath = "/organisations"
	} else if !strings.HasPrefix(p.OrganisationsPath, "/") || strings.ContainsAny(p.OrganisationsPath, "?#") {
		e.errf("organisations_path", "%q must be a path starting with \"/\", without query or fragment", p.OrganisationsPath)
	}
	fp.add("organisations_path", p.OrganisationsPath)
	if e.bad {
		return nil
	}
	src, err := broker.NewNuapay(broker.NuapayConfig{
		BaseURL:           p.BaseURL,
		APIKey:            key,
		Lifetime:          p.TokenLifetime,
		OrganisationsPath: p.OrganisationsPath,
		Client:            client,
	})
	if err != nil {
		e.errf("", "%v", err)
		return nil
	}
	return src
}

// typeNames lists the known provider types for messages.
func typeNames() string {
	names := make([]string, 0, len(providerTypes))
	for n := range providerTypes {
		names = append(names, n)
	}
	slices.Sort(names)
	return strings.Join(names, ", ")
}

// secretKeys are the keys whose values are secrets, in any entry.
var secretKeys = []string{"api_key"}

// Known keys, from the toml tags of the schema structs.
var (
	topKeys      = []string{"providers", "merchants"}
	providerKeys = tomlKeys(providerTOML{})
	tlsKeys      = tomlKeys(tlsTOML{})
	merchantKeys = tomlKeys(merchantTOML{})
)

func tomlKeys(v any) []string {
	t := reflect.TypeOf(v)
	keys := make([]string, t.NumField())
	for i := range keys {
		keys[i], _, _ = strings.Cut(t.Field(i).Tag.Get("toml"), ",")
	}
	return keys
}

// unknownPart returns the length of the shortest prefix of k that the
// schema does not know, with the keys allowed in its place; 0 when k is
// known. Every prefix is checked because implicit tables ([merchant.acme]
// defines "merchant") are not themselves listed by MetaData.Keys.
func unknownPart(k toml.Key) (int, []string) {
	for n := 1; n <= len(k); n++ {
		var allowed []string
		switch {
		case n == 1:
			allowed = topKeys
		case n == 2:
			continue // an entry name, checked with the entry
		case n == 3 && k[0] == "providers":
			allowed = providerKeys
		case n == 3:
			allowed = merchantKeys
		case n == 4 && k[0] == "providers" && k[2] == "tls":
			allowed = tlsKeys
		}
		if !slices.Contains(allowed, k[n-1]) {
			return n, allowed
		}
	}
	return 0, nil
}

// checkKeys reports every key of the file that the schema does not know,
// once per unknown subtree. The comparison is exact: BurntSushi's decoder
// also matches keys case-insensitively (so MetaData.Undecoded would let
// "Provider" through), hence the check of MetaData.Keys against the schema.
func (p *parser) checkKeys(keys []toml.Key) {
	var reported []toml.Key
	for _, k := range keys {
		if slices.ContainsFunc(reported, func(r toml.Key) bool { return len(r) <= len(k) && slices.Equal(r, k[:len(r)]) }) {
			continue
		}
		n, allowed := unknownPart(k)
		if n == 0 {
			continue
		}
		k = k[:n]
		reported = append(reported, k)
		e := &Error{File: p.file, Line: p.loc.line(k...), Msg: fmt.Sprintf("unknown key %q", k.String())}
		if len(allowed) > 0 {
			e.Msg += " (known keys here: " + strings.Join(allowed, ", ") + ")"
		}
		e.Entry, e.Field = entryField(k)
		p.errs = append(p.errs, e)
	}
}
