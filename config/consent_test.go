package config

import (
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

const consentProvider = `
[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = "https://bank.example"
client_id = "rt-client"
client_secret = "{env.NUAPAY_API_KEY}"
  [providers.bank.consent]
  redirect_uris = ["https://cb1.partner.example/consent/callback", "https://cb2.partner.example/consent/callback"]
  return_urls = ["https://app.partner.example/consent/"]
  par = true
  link_ttl = "5m"

[merchants.acme]
provider = "bank"
`

// TestConsentTable: a provider's consent table gives its flow; its
// mistakes are reported with the field and the line.
func TestConsentTable(t *testing.T) {
	opts := Options{LookupEnv: testEnv(), RefreshStore: oauth.NewMemoryStore(), ConsentStore: &oauth.MemoryPendingStore{}}
	reg, err := parseWith("m.toml", []byte(consentProvider), opts)
	if err != nil {
		t.Fatal(err)
	}
	flow := reg.Providers["bank"].Consent
	if flow == nil || !reg.HasConsent() {
		t.Fatal("no consent flow")
	}
	cfg := flow.Config()
	if len(cfg.RedirectURIs) != 2 || !cfg.PAR || cfg.LinkTTL != 5*time.Minute || strings.Join(cfg.Scopes, " ") != "openid offline_access" {
		t.Errorf("consent config %+v", cfg)
	}
	if !flow.ReturnURLAllowed("https://app.partner.example/consent/done?x=1") || flow.ReturnURLAllowed("https://app.partner.example/other") {
		t.Error("return URL allow-list")
	}
	if l := cfg.Limits; l != (oauth.LinkLimits{MaxPending: oauth.DefaultMaxPendingLinks, MerchantPerMinute: oauth.DefaultMerchantLinksPerMinute, PerMinute: oauth.DefaultLinksPerMinute}) {
		t.Errorf("default link limits %+v", l)
	}
	limited, err := parseWith("m.toml", []byte(strings.Replace(consentProvider, `par = true`, "max_pending_links = 2\n  merchant_links_per_minute = 3\n  links_per_minute = 4", 1)), opts)
	if err != nil {
		t.Fatal(err)
	}
	table := consentProvider[strings.Index(consentProvider, "  [providers.bank.consent]"):strings.Index(consentProvider, "[merchants.acme]")]
	without, err := parseWith("m.toml", []byte(strings.Replace(consentProvider, table, "", 1)), opts)
	if err != nil {
		t.Fatal(err)
	}
	if without.HasConsent() {
		t.Error("HasConsent without a consent table")
	}
	if l := limited.Providers["bank"].Consent.Config().Limits; l != (oauth.LinkLimits{MaxPending: 2, MerchantPerMinute: 3, PerMinute: 4}) {
		t.Errorf("link limits %+v", l)
	}

	rows := []struct {
		name, old, new, want string
	}{
		{"unknown key", `par = true`, `pkce = true`, `m.toml:11: provider "bank": field consent.pkce: unknown key`},
		{"not a callback", `cb2.partner.example/consent/callback"`, `cb2.partner.example/consent/cb"`, `must end in /callback`},
		{"client credentials", `grant = "refresh_token"`, `grant = "client_credentials"`, `field consent: only providers with grant "refresh_token"`},
		{"no redirect", `redirect_uris = ["https://cb1.partner.example/consent/callback", "https://cb2.partner.example/consent/callback"]`, ``, `field consent.redirect_uris: missing`},
		{"ttl out of range", `link_ttl = "5m"`, `link_ttl = "48h"`, `field consent.link_ttl: 48h0m0s is out of range`},
		{"no pending link", `link_ttl = "5m"`, `max_pending_links = 0`, `m.toml:12: provider "bank": field consent.max_pending_links: 0 is out of range 1..100000`},
		{"negative merchant rate", `link_ttl = "5m"`, `merchant_links_per_minute = -1`, `field consent.merchant_links_per_minute: -1 is out of range`},
		{"rate too high", `link_ttl = "5m"`, `links_per_minute = 1000000`, `field consent.links_per_minute: 1000000 is out of range`},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			data := strings.Replace(consentProvider, tc.old, tc.new, 1)
			_, err := parseWith("m.toml", []byte(data), opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
