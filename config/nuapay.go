package config

import (
	"strings"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
)

// buildNuapay returns a Nuapay Gatekeeper source.
func buildNuapay(e *entry, raw *providerTOML, p *Provider, fp *fingerprint) broker.Source {
	p.BaseURL = e.httpURL("base_url", raw.BaseURL, false, "the token API's http(s) URL")
	p.BaseURL = strings.TrimRight(p.BaseURL, "/")
	fp.add("base_url", p.BaseURL)
	p.TokenLifetime = e.duration("token_lifetime", raw.TokenLifetime, defLifetime, nuapay.MinLifetime, nuapay.MaxLifetime)
	fp.add("token_lifetime", p.TokenLifetime)
	key := e.secret("api_key", raw.APIKey)
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
	src, err := nuapay.New(nuapay.Config{
		BaseURL:           p.BaseURL,
		APIKey:            key,
		Lifetime:          p.TokenLifetime,
		OrganisationsPath: p.OrganisationsPath,
		Client:            p.client,
	})
	if err != nil {
		e.errf("", "%v", err)
		return nil
	}
	return src
}
