package config

import (
	"strings"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
)

// buildNuapay returns a Nuapay Gatekeeper source.
func buildNuapay(e *entry, raw *providerTOML, p *Provider, fp *fingerprint) broker.Source {
	baseURL := e.httpURL("base_url", raw.BaseURL, false, "the token API's http(s) URL")
	baseURL = strings.TrimRight(baseURL, "/")
	fp.add("base_url", baseURL)
	p.Endpoint = baseURL
	lifetime := e.duration("token_lifetime", raw.TokenLifetime, defLifetime, nuapay.MinLifetime, nuapay.MaxLifetime)
	fp.add("token_lifetime", lifetime)
	key := e.secret("api_key", raw.APIKey)
	p.Account = budget.Account(key.Reveal())
	orgsPath, _ := e.expand("organisations_path", raw.OrganisationsPath)
	if orgsPath == "" {
		orgsPath = "/organisations"
	} else if !strings.HasPrefix(orgsPath, "/") || strings.ContainsAny(orgsPath, "?#") {
		e.errf("organisations_path", "%q must be a path starting with \"/\", without query or fragment", orgsPath)
	}
	fp.add("organisations_path", orgsPath)
	if e.bad {
		return nil
	}
	src, err := nuapay.New(nuapay.Config{
		BaseURL:           baseURL,
		APIKey:            key,
		Lifetime:          lifetime,
		OrganisationsPath: orgsPath,
		Client:            p.client,
	})
	if err != nil {
		e.errf("", "%v", err)
		return nil
	}
	return src
}
