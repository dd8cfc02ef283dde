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
	// DisplayName is the provider's name as merchants know it ("Example
	// Bank"), shown on the consent pages; default "your bank" in the
	// page's language. At most 100 characters, no control characters or
	// surrounding spaces. Optional.
	DisplayName string `toml:"display_name"`
	// RedirectURIs are the callback URLs registered with the provider, one
	// per callback domain, each ending in "/callback", e.g.
	// "https://callback.partnerdomain.com/consent/callback". The consent
	// link of one is the same URL ending in "/start". Required.
	RedirectURIs []string `toml:"redirect_uris"`
	// ReturnURLs is the allow-list of the app's return URLs, where the
	// browser is sent after the callback: same scheme and host, and the
	// same path or, for an entry ending in "/", a path under it.
	ReturnURLs []string `toml:"return_urls"`
	// Scopes are the scopes of the authorization request. Default
	// ["openid", "offline_access"].
	Scopes []string `toml:"scopes"`
	// PAR pushes the authorization request (RFC 9126) even when the
	// provider does not require it (FAPI 2.0). Default false; a provider
	// whose discovery document requires PAR always gets it.
	PAR bool `toml:"par"`
	// AuthorizationURL is the authorization endpoint. Default: from the
	// issuer's discovery document; required with token_url.
	AuthorizationURL string `toml:"authorization_url"`
	// PARURL is the pushed authorization request endpoint. Default: from
	// the discovery document.
	PARURL string `toml:"par_url"`
	// LinkTTL is how long a consent link can be opened, a Go duration
	// ("10m"). Default 10m, at most 24h.
	LinkTTL *Duration `toml:"link_ttl"`

	// The authorization request's own parameters, sent on the
	// authorization URL or, with PAR, in the pushed request.

	// Prompt are prompt values (OpenID Connect Core §3.1.2.1): "login",
	// "consent", "select_account". "consent" is always sent when scopes
	// hold offline_access (OpenID Connect Core §11: without it a provider
	// issues no refresh token). Optional.
	Prompt []string `toml:"prompt"`
	// ACRValues are the requested authentication context classes, in
	// order of preference, e.g. ["urn:openbanking:psd2:sca"]. Optional.
	ACRValues []string `toml:"acr_values"`
	// Claims is the claims parameter (OpenID Connect Core §5.5) as a JSON
	// object in a string, e.g. '{"id_token": {"acr": {"essential": true}}}'.
	// Optional.
	Claims string `toml:"claims"`
	// AuthorizationDetails is the authorization_details parameter (RFC
	// 9396, e.g. an Open Banking payment consent) as a JSON array in a
	// string, each object with a string "type". Optional.
	AuthorizationDetails string `toml:"authorization_details"`
	// Resources are the resource indicators (RFC 8707) of the
	// authorization request, absolute URIs. Default the provider's
	// resource, if set.
	Resources []string `toml:"resources"`

	// MaxPendingLinks is how many unused, unexpired consent links one
	// merchant may have; more are answered 429. Default 5.
	MaxPendingLinks *int `toml:"max_pending_links"`
	// MerchantLinksPerMinute is how many consent links one merchant may
	// get per minute (as many at once); more are answered 429. Default 5.
	MerchantLinksPerMinute *int `toml:"merchant_links_per_minute"`
	// LinksPerMinute is how many consent links the provider hands out per
	// minute, all merchants together (as many at once); more are answered
	// 429. Default 60.
	LinksPerMinute *int `toml:"links_per_minute"`
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
