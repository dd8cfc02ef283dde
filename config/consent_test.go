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
	reg, err := ParseWith("m.toml", []byte(consentProvider), opts)
	if err != nil {
		t.Fatal(err)
	}
	flow := reg.Providers["bank"].Consent
	if flow == nil {
		t.Fatal("no consent flow")
	}
	cfg := flow.Config()
	if len(cfg.RedirectURIs) != 2 || !cfg.PAR || cfg.LinkTTL != 5*time.Minute || strings.Join(cfg.Scopes, " ") != "openid offline_access" {
		t.Errorf("consent config %+v", cfg)
	}
	if !flow.ReturnURLAllowed("https://app.partner.example/consent/done?x=1") || flow.ReturnURLAllowed("https://app.partner.example/other") {
		t.Error("return URL allow-list")
	}

	rows := []struct {
		name, old, new, want string
	}{
		{"unknown key", `par = true`, `pkce = true`, `m.toml:11: provider "bank": field consent.pkce: unknown key`},
		{"not a callback", `cb2.partner.example/consent/callback"`, `cb2.partner.example/consent/cb"`, `must end in /callback`},
		{"client credentials", `grant = "refresh_token"`, `grant = "client_credentials"`, `field consent: only providers with grant "refresh_token"`},
		{"no redirect", `redirect_uris = ["https://cb1.partner.example/consent/callback", "https://cb2.partner.example/consent/callback"]`, ``, `field consent.redirect_uris: missing`},
		{"ttl out of range", `link_ttl = "5m"`, `link_ttl = "48h"`, `field consent.link_ttl: 48h0m0s is out of range`},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			data := strings.Replace(consentProvider, tc.old, tc.new, 1)
			_, err := ParseWith("m.toml", []byte(data), opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
