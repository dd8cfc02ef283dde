package module

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	zapobserver "go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// POST /token_broker/merchants/{id}/check answers what one token request
// for the merchant got; the operator's view is told of it even for a
// merchant no route has served yet. Other methods and unknown merchants
// are refused.
func TestAdminCheck(t *testing.T) {
	toml := `[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "http://127.0.0.1:1/token"
client_id = "tpp"
client_secret = "{env.BANK_SECRET}"

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`
	reg, err := configtest.Load(t, "merchants.toml", []byte(toml), config.Options{RefreshStore: &oauth.MemoryStore{},
		LookupEnv: func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := zapobserver.New(zap.InfoLevel)
	app := &App{registry: reg, logger: zap.New(core), tables: &bindings.Tables{}, tracker: opstate.NewTracker(opstate.TrackerOptions{}),
		broker: broker.New(broker.Options{MaxAttempts: 1}), metrics: telemetry.NewMetrics(false)}
	t.Cleanup(app.broker.Close)
	app.instrument()
	prev := current.Swap(app)
	t.Cleanup(func() { current.Store(prev) })
	tests := []struct {
		name, method, path string
		wantStatus         int
		wantOutcome        string
	}{
		{"consent needed", http.MethodPost, "/token_broker/merchants/acme/check", http.StatusOK, "consent_required"},
		{"GET", http.MethodGet, "/token_broker/merchants/acme/check", http.StatusMethodNotAllowed, ""},
		{"unknown merchant", http.MethodPost, "/token_broker/merchants/nobody/check", http.StatusNotFound, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			err := serveAdmin(rec, httptest.NewRequest(tt.method, tt.path, nil))
			status := rec.Code
			var ae caddy.APIError
			if errors.As(err, &ae) {
				status = ae.HTTPStatus
			} else if err != nil {
				t.Fatal(err)
			}
			if status != tt.wantStatus {
				t.Fatalf("%s %s: %d %v %s, want %d", tt.method, tt.path, status, err, rec.Body, tt.wantStatus)
			}
			if tt.wantOutcome == "" {
				return
			}
			var res adminapi.CheckResult
			if err := json.Unmarshal(rec.Body.Bytes(), &res); err != nil || res.Outcome != tt.wantOutcome || res.OK || !res.Called ||
				!strings.Contains(res.Message, "caddy token-broker consent-link acme") {
				t.Fatalf("answer %s: %v", rec.Body, err)
			}
		})
	}
	rep := opstate.Build(app.stateSources(), opstate.Query{}, time.Now())
	if len(rep.Merchants) != 1 || rep.Merchants[0].State != opstate.StateNeedsConsent {
		t.Fatalf("the state after the check: %+v, want acme needing consent", rep.Merchants)
	}
	// The check's call is counted and logged like a route's.
	if n := testutil.ToFloat64(app.metrics.TokenRequests.WithLabelValues("bank", "consent_required")); n != 1 {
		t.Errorf("token_requests_total{provider=bank,outcome=consent_required} = %v, want 1", n)
	}
	if n := logs.FilterMessage("token fetch failed").FilterField(zap.String("merchant", "acme")).Len(); n != 1 {
		t.Errorf("%d token fetch lines, want 1", n)
	}
}
