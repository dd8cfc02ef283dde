package config

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
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

// consentOP starts an authorization server that knows consentProvider's
// client and returns toml (consentProvider, edited) with that server as
// the provider's issuer.
func consentOP(t *testing.T, toml string) (*optest.Server, string) {
	t.Helper()
	srv := optest.Start(t, optest.Options{}, &optest.Client{ID: "rt-client", Secret: secretValue, Method: oidc.AuthMethodBasic,
		Redirects: []string{"https://cb1.partner.example/consent/callback", "https://cb2.partner.example/consent/callback"}})
	return srv, strings.Replace(toml, `issuer = "https://bank.example"`, `issuer = "`+srv.URL+`"`, 1)
}

// openLink opens a consent link of flow at its callback host and returns
// the authorization URL that the browser is sent to.
func openLink(t *testing.T, flow *oauth.AuthCode, link oauth.Link) string {
	t.Helper()
	u, err := url.Parse(link.URL)
	if err != nil {
		t.Fatal(err)
	}
	authURL, _, err := flow.Start(context.Background(), u.Query().Get("link"), u.Host)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	return authURL
}

// authorizationRequest opens a new consent link of flow and returns the
// authorization request that reaches srv.
func authorizationRequest(t *testing.T, srv *optest.Server, flow *oauth.AuthCode) url.Values {
	t.Helper()
	link, err := flow.NewLink(context.Background(), "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	browser := &http.Client{CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := browser.Get(openLink(t, flow, link))
	if err != nil {
		t.Fatal(err)
	}
	_ = resp.Body.Close()
	reqs := srv.AuthorizationRequests()
	if len(reqs) == 0 {
		t.Fatal("no authorization request reached the server")
	}
	return reqs[len(reqs)-1]
}

// TestConsentTable: a provider's consent table gives its flow; its
// mistakes are reported with the field and the line.
func TestConsentTable(t *testing.T) {
	opts := Options{LookupEnv: testEnv(), RefreshStore: &oauth.MemoryStore{}, ConsentStore: &oauth.MemoryPendingStore{}}
	srv, toml := consentOP(t, consentProvider)
	reg, err := parseWith("m.toml", []byte(toml), opts)
	if err != nil {
		t.Fatal(err)
	}
	flow := reg.Providers["bank"].Consent
	if flow == nil || !reg.HasConsent() {
		t.Fatal("no consent flow")
	}
	ctx := context.Background()
	before := time.Now()
	link, err := flow.NewLink(ctx, "acme", "https://app.partner.example/consent/done?x=1", "cb2.partner.example")
	after := time.Now()
	if err != nil || !strings.HasPrefix(link.URL, "https://cb2.partner.example/consent/start?") {
		t.Fatalf("link on the second redirect_uri: %+v, %v", link, err)
	}
	if link.Expires.Before(before.Add(5*time.Minute)) || link.Expires.After(after.Add(5*time.Minute)) {
		t.Errorf("link made between %s and %s expires at %s, want 5m later (link_ttl)", before, after, link.Expires)
	}
	var ce *oauth.ConsentError
	if _, err := flow.NewLink(ctx, "acme", "https://app.partner.example/other", ""); !errors.As(err, &ce) || ce.Reason != oauth.ReasonReturnURL {
		t.Errorf("return URL off the allow-list: %v, want %s", err, oauth.ReasonReturnURL)
	}
	if q := authorizationRequest(t, srv, flow); q.Get("scope") != "openid offline_access" || srv.Pushed.Load() != 1 {
		t.Errorf("authorization request %v, %d pushed; want the default scopes, pushed (par)", q, srv.Pushed.Load())
	}
	table := consentProvider[strings.Index(consentProvider, "  [providers.bank.consent]"):strings.Index(consentProvider, "[merchants.acme]")]
	without, err := parseWith("m.toml", []byte(strings.Replace(consentProvider, table, "", 1)), opts)
	if err != nil {
		t.Fatal(err)
	}
	if without.HasConsent() {
		t.Error("HasConsent without a consent table")
	}
	clientCredentials, err := parseWith("m.toml", []byte(strings.Replace(strings.Replace(consentProvider, table, "", 1), `grant = "refresh_token"`, `grant = "client_credentials"`, 1)), opts)
	if err != nil {
		t.Fatal(err)
	}
	if !reg.HasRefreshTokens() || !without.HasRefreshTokens() || clientCredentials.HasRefreshTokens() {
		t.Error("HasRefreshTokens: want true for the refresh_token providers (with or without consent), false for client credentials")
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

// TestConsentLinkLimits: the consent table's link limits, or their
// defaults, bound the links that the flow hands out.
func TestConsentLinkLimits(t *testing.T) {
	const limits = "max_pending_links = 2\n  merchant_links_per_minute = 3\n  links_per_minute = 4"
	for _, tt := range []struct {
		name      string
		limits    string // in place of par = true
		merchants bool   // a merchant of its own per link, else acme
		open      bool   // each link opened before the next is asked
		want      int    // the links handed out before a refusal
		reason    string // of the refusal
	}{
		{"pending links, default", "", false, false, oauth.DefaultMaxPendingLinks, oauth.ReasonTooManyLinks},
		{"merchant's rate, default", "", false, true, oauth.DefaultMerchantLinksPerMinute, oauth.ReasonLinkRate},
		{"provider's rate, default", "", true, false, oauth.DefaultLinksPerMinute, oauth.ReasonLinkRate},
		{"max_pending_links", limits, false, false, 2, oauth.ReasonTooManyLinks},
		{"merchant_links_per_minute", limits, false, true, 3, oauth.ReasonLinkRate},
		{"links_per_minute", limits, true, false, 4, oauth.ReasonLinkRate},
	} {
		// refilled is how many links a rate limit gives back over the
		// time the case has run (its flow reads the wall clock): a busy
		// machine may hand out that many more before the refusal.
		start := time.Now()
		refilled := func() int {
			if tt.reason != oauth.ReasonLinkRate {
				return 0
			}
			return int(time.Since(start).Seconds() * float64(tt.want) / 60)
		}
		t.Run(tt.name, func(t *testing.T) {
			_, toml := consentOP(t, strings.Replace(consentProvider, "par = true", tt.limits, 1))
			opts := Options{LookupEnv: testEnv(), RefreshStore: &oauth.MemoryStore{}, ConsentStore: &oauth.MemoryPendingStore{}}
			reg, err := parseWith("m.toml", []byte(toml), opts)
			if err != nil {
				t.Fatal(err)
			}
			flow := reg.Providers["bank"].Consent
			for n := 0; ; n++ {
				merchant := "acme"
				if tt.merchants {
					merchant = fmt.Sprint("merchant-", n)
				}
				link, err := flow.NewLink(context.Background(), merchant, "", "")
				if err != nil {
					var le *oauth.LinkLimitError
					if n < tt.want || n > tt.want+refilled() || !errors.As(err, &le) || le.Reason != tt.reason {
						t.Fatalf("link %d refused: %v; want %d links, then %s", n+1, err, tt.want, tt.reason)
					}
					return
				}
				if n >= tt.want+refilled() {
					t.Fatalf("link %d handed out, want %d, then %s", n+1, tt.want, tt.reason)
				}
				if tt.open {
					openLink(t, flow, link)
				}
			}
		})
	}
}
