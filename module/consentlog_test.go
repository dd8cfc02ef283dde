package module

import (
	"net/http/httptest"
	"reflect"
	"strings"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	zapobserver "go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// A consent link asked through the admin API or through the links route
// is logged the same way: same level, message and fields.
func TestConsentLinkLoggedAlikeByAdminAndRoute(t *testing.T) {
	const toml = `[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "https://bank.invalid/token"
client_id = "tpp"
client_secret = "{env.BANK_SECRET}"
  [providers.bank.consent]
  authorization_url = "https://bank.invalid/authorize"
  redirect_uris = ["https://cb.partner.example/consent/callback"]
  return_urls = ["https://app.partner.example/consent/"]
  scopes = ["offline_access", "accounts"]

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`
	reg, err := configtest.Load(t, "merchants.toml", []byte(toml), config.Options{RefreshStore: &oauth.MemoryStore{},
		ConsentStore: &oauth.MemoryPendingStore{},
		LookupEnv:    func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name    string
		body    string
		level   zapcore.Level
		msg     string
		outcome string
	}{
		{"created", `{"merchant":"acme"}`, zap.InfoLevel, "consent step", "ok"},
		{"return URL refused", `{"merchant":"acme","return_url":"https://evil.example/"}`, zap.WarnLevel, "consent refused", oauth.ReasonReturnURL},
		{"unknown merchant", `{"merchant":"globex"}`, zap.WarnLevel, "consent refused", "error"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			adminCore, adminLogs := zapobserver.New(zap.DebugLevel)
			app := &App{registry: reg, logger: zap.New(adminCore), broker: broker.New(broker.Options{})}
			t.Cleanup(app.broker.Close)
			prev := current.Swap(app)
			t.Cleanup(func() { current.Store(prev) })
			_ = serveAdmin(httptest.NewRecorder(), httptest.NewRequest("POST", "/token_broker/consent/links", strings.NewReader(tt.body)))

			routeCore, routeLogs := zapobserver.New(zap.DebugLevel)
			web, err := consentweb.New(consentweb.Options{Links: true, Registry: reg, Broker: app.broker, Gate: consentweb.CallerGate{Hosts: app.site, Policy: app.callers},
				Steps:  prometheus.NewCounterVec(prometheus.CounterOpts{Name: "steps"}, []string{"provider", "step", "outcome"}),
				Logger: zap.New(routeCore)})
			if err != nil {
				t.Fatal(err)
			}
			web.ServeHTTP(httptest.NewRecorder(), httptest.NewRequest("POST", "http://localhost/consent/links", strings.NewReader(tt.body)))

			admin, route := adminLogs.All(), routeLogs.All()
			if len(admin) != 1 || len(route) != 1 {
				t.Fatalf("admin logged %v, route logged %v; want one line each", admin, route)
			}
			a, r := admin[0], route[0]
			if a.Level != tt.level || a.Message != tt.msg || a.ContextMap()["outcome"] != tt.outcome || a.ContextMap()["step"] != consentweb.StepLink {
				t.Errorf("admin: %s %q %v; want %s %q outcome %s", a.Level, a.Message, a.ContextMap(), tt.level, tt.msg, tt.outcome)
			}
			if a.Level != r.Level || a.Message != r.Message || !reflect.DeepEqual(a.ContextMap(), r.ContextMap()) {
				t.Errorf("admin and route differ:\n admin %s %q %v\n route %s %q %v", a.Level, a.Message, a.ContextMap(), r.Level, r.Message, r.ContextMap())
			}
		})
	}
}
