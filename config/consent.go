package config

import (
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentpage"
)

// consentTOML is a [providers.NAME.consent] table: the authorization-code
// flow through which the merchants of a refresh_token provider consent
// (the token_broker_consent handler). {env.NAME} references are expanded
// in every value.
type consentTOML struct {
	DisplayName      string    `toml:"display_name"`  // the provider's name on the consent pages
	RedirectURIs     []string  `toml:"redirect_uris"` // registered callback URLs, each ending in "/callback"; required
	ReturnURLs       []string  `toml:"return_urls"`   // allow-list of the app's return URLs ("/"-ended: that path and below)
	Scopes           []string  `toml:"scopes"`
	PAR              bool      `toml:"par"` // push the request (RFC 9126) even when discovery does not require it
	AuthorizationURL string    `toml:"authorization_url"`
	PARURL           string    `toml:"par_url"`
	LinkTTL          *Duration `toml:"link_ttl"`

	// The authorization request's own parameters.
	Prompt               []string `toml:"prompt"`
	ACRValues            []string `toml:"acr_values"`
	Claims               string   `toml:"claims"`                // a JSON object (OpenID Connect Core §5.5)
	AuthorizationDetails string   `toml:"authorization_details"` // a JSON array (RFC 9396)
	Resources            []string `toml:"resources"`             // RFC 8707

	// Limits of the consent links (answered 429 past them).
	MaxPendingLinks        *int `toml:"max_pending_links"`
	MerchantLinksPerMinute *int `toml:"merchant_links_per_minute"`
	LinksPerMinute         *int `toml:"links_per_minute"`
}

// consentKeys are the keys of a consent table.
var consentKeys = tomlKeys(consentTOML{})

// maxLinkTTL bounds consent.link_ttl.
const maxLinkTTL = 24 * time.Hour

// maxLinkLimit bounds the consent link limits.
const maxLinkLimit = 100_000

// displayName checks a display_name as a name shown on the consent pages
// (consentpage.CheckName); "" when unset or refused.
func (e *entry) displayName(field, v string) string {
	if err := consentpage.CheckName(v); err != nil {
		e.errf(field, "%q: %v", v, err)
		return ""
	}
	return v
}

// linkLimit resolves a consent link limit: def when unset, else 1 to
// maxLinkLimit.
func (e *entry) linkLimit(field string, v *int, def int) int {
	switch {
	case v == nil:
		return def
	case *v < 1 || *v > maxLinkLimit:
		e.errf(field, "%d is out of range 1..%d", *v, maxLinkLimit)
	}
	return *v
}

// consent resolves the consent table of a refresh_token provider into
// p.Consent, its flow over src (left nil when there is no table or it has
// problems).
func (e *entry) consent(raw *consentTOML, p *Provider, src *oauth.RefreshToken) {
	if raw == nil {
		return
	}
	p.DisplayName = e.displayName("consent.display_name", raw.DisplayName)
	cfg := oauth.AuthCodeConfig{PAR: raw.PAR}
	list := func(field string, in []string, url bool) []string {
		out := make([]string, 0, len(in))
		for _, v := range in {
			if url {
				out = append(out, e.httpURL(field, v, field == "consent.return_urls", "a URL"))
			} else {
				out = append(out, e.plain(field, v))
			}
		}
		return out
	}
	cfg.RedirectURIs = list("consent.redirect_uris", raw.RedirectURIs, true)
	cfg.ReturnURLs = list("consent.return_urls", raw.ReturnURLs, true)
	cfg.Scopes = list("consent.scopes", raw.Scopes, false)
	if raw.AuthorizationURL != "" {
		cfg.AuthorizationURL = e.httpURL("consent.authorization_url", raw.AuthorizationURL, true, "the authorization endpoint")
	}
	if raw.PARURL != "" {
		cfg.PARURL = e.httpURL("consent.par_url", raw.PARURL, false, "the PAR endpoint")
	}
	cfg.Prompt = list("consent.prompt", raw.Prompt, false)
	cfg.ACRValues = list("consent.acr_values", raw.ACRValues, false)
	cfg.Resources = list("consent.resources", raw.Resources, false)
	// JSON may span lines: NewAuthCode checks it as JSON.
	cfg.Claims, _ = e.expand("consent.claims", raw.Claims)
	cfg.AuthorizationDetails, _ = e.expand("consent.authorization_details", raw.AuthorizationDetails)
	cfg.LinkTTL = e.duration("consent.link_ttl", raw.LinkTTL, oauth.DefaultLinkTTL, 10*time.Second, maxLinkTTL)
	cfg.Limits = oauth.LinkLimits{
		MaxPending:        e.linkLimit("consent.max_pending_links", raw.MaxPendingLinks, oauth.DefaultMaxPendingLinks),
		MerchantPerMinute: e.linkLimit("consent.merchant_links_per_minute", raw.MerchantLinksPerMinute, oauth.DefaultMerchantLinksPerMinute),
		PerMinute:         e.linkLimit("consent.links_per_minute", raw.LinksPerMinute, oauth.DefaultLinksPerMinute),
	}
	if len(raw.RedirectURIs) == 0 {
		e.errf("consent.redirect_uris", "missing: set the callback URLs registered with the provider (https://callback.example.com/consent/callback)")
	}
	if e.bad {
		return
	}
	store := e.p.opts.ConsentStore
	if store == nil {
		store = &oauth.MemoryPendingStore{}
	}
	flow, err := oauth.NewAuthCode(src, cfg, &oauth.Pendings{Store: store})
	if err != nil {
		e.errf("consent", "%v", err)
		return
	}
	p.Consent = flow
}
