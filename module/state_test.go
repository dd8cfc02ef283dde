package module

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// stateAdminTOML has one Nuapay provider whose token API answers by
// organisation, and four merchants.
const stateAdminTOML = `
[providers.nuapay]
type = "nuapay"
base_url = "http://127.0.0.1:1"
api_key = "{env.K}"

[merchants.m-down]
provider = "nuapay"
organisation = "down"
scopes = ["openbanking_pisp"]

[merchants.m-fresh]
provider = "nuapay"
organisation = "ok"
scopes = ["openbanking_pisp"]

[merchants.m-idle]
provider = "nuapay"
organisation = "idle"
scopes = ["openbanking_pisp"]

[merchants.m-refused]
provider = "nuapay"
organisation = "refused"
scopes = ["openbanking_pisp"]
`

// stateApp returns a running-looking app with the registry of
// stateAdminTOML, and a handler of its routes.
func stateApp(t *testing.T) (*App, *Handler) {
	t.Helper()
	reg, err := configtest.Load(t, "state.toml", []byte(stateAdminTOML), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	reg.Providers["nuapay"].Source = sourceFunc(func(_ context.Context, req broker.Request) (broker.Token, error) {
		switch req.Organisation {
		case "refused":
			return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 403, Code: "forbidden"}
		case "down":
			return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 503}
		}
		return broker.Token{Value: testToken, Expiry: time.Now().Add(time.Hour)}, nil
	})
	app := &App{registry: reg, logger: zap.NewNop(), tables: &bindings.Tables{},
		broker:  broker.New(broker.Options{MaxAttempts: 1, FailureTTL: time.Minute}),
		tracker: opstate.NewTracker(opstate.TrackerOptions{})}
	t.Cleanup(app.broker.Close)
	prev := current.Swap(app)
	t.Cleanup(func() { current.Store(prev) })
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchantHeader: "X-Merchant-Id",
		header: "Authorization", broker: app.broker, tracker: app.tracker, registry: reg}
	h.bindings = app.tables.Table(reg, nil, nil)
	h.instrument(telemetry.NewMetrics(false))
	return app, h
}

// getState asks the admin route; it returns the status and the body.
func getState(t *testing.T, method, query string) (int, *httptest.ResponseRecorder) {
	t.Helper()
	rec := httptest.NewRecorder()
	err := (adminAPI{}).state(rec, httptest.NewRequest(method, "/token_broker/state?"+query, nil))
	if err != nil {
		var ae caddy.APIError
		if !errors.As(err, &ae) {
			t.Fatalf("%s %s: %v", method, query, err)
		}
		return ae.HTTPStatus, rec
	}
	return http.StatusOK, rec
}

// TestAdminState: GET /token_broker/state shows a refused merchant, one
// backing off, one idle (never asked for) and a fresh one, filters and
// pages them, never shows the token, and refuses a bad query (400) or
// another method (405).
func TestAdminState(t *testing.T) {
	_, h := stateApp(t)
	for _, m := range []string{"m-down", "m-fresh", "m-refused"} {
		if _, _, err := serve(t, h, merchantRequest(m)); err != nil {
			t.Fatal(err)
		}
	}
	for _, tt := range []struct {
		query  string
		want   []string
		total  int
		next   string
		counts map[string]int
	}{
		{"", []string{"m-down backing_off token_unavailable", "m-fresh fresh ", "m-idle idle ", "m-refused refused token_refused"}, 4, "",
			map[string]int{"refused": 1, "backing_off": 1, "fresh": 1, "idle": 1}},
		{"state=refused", []string{"m-refused refused token_refused"}, 1, "", nil},
		{"state=idle", []string{"m-idle idle "}, 1, "", nil},
		{"provider=nuapay&limit=2", []string{"m-down backing_off token_unavailable", "m-fresh fresh "}, 4, "m-fresh", nil},
		{"provider=nuapay&limit=2&after=m-fresh", []string{"m-idle idle ", "m-refused refused token_refused"}, 4, "", nil},
		{"provider=other", nil, 0, "", map[string]int{"refused": 0, "fresh": 0}},
	} {
		t.Run(tt.query, func(t *testing.T) {
			status, rec := getState(t, http.MethodGet, tt.query)
			if status != http.StatusOK {
				t.Fatalf("status %d: %s", status, rec.Body)
			}
			if rec.Header().Get("Cache-Control") != "no-store" || rec.Header().Get("Content-Type") != "application/json" {
				t.Errorf("headers %v", rec.Header())
			}
			if strings.Contains(rec.Body.String(), testToken) || strings.Contains(rec.Body.String(), "partner-key") {
				t.Fatalf("the state carries a secret: %s", rec.Body)
			}
			var r opstate.Report
			if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil {
				t.Fatal(err)
			}
			var got []string
			for _, m := range r.Merchants {
				got = append(got, m.Merchant+" "+m.State+" "+m.LastError)
			}
			if !slices.Equal(got, tt.want) || r.Total != tt.total || r.Next != tt.next {
				t.Errorf("merchants %q total %d next %q; want %q, %d, %q", got, r.Total, r.Next, tt.want, tt.total, tt.next)
			}
			for st, n := range tt.counts {
				if r.Counts[st] != n {
					t.Errorf("counts %v, want %s: %d", r.Counts, st, n)
				}
			}
			if len(r.Providers) != 1 || r.Providers[0].Name != "nuapay" || r.Providers[0].Requests != 3 || r.Providers[0].Failures != 2 {
				t.Errorf("providers %+v", r.Providers)
			}
		})
	}
	for _, tt := range []struct {
		method, query string
		status        int
	}{
		{http.MethodGet, "state=broken", http.StatusBadRequest},
		{http.MethodGet, "limit=0", http.StatusBadRequest},
		{http.MethodGet, "merchant=m-idle", http.StatusBadRequest},
		{http.MethodPost, "", http.StatusMethodNotAllowed},
	} {
		if status, rec := getState(t, tt.method, tt.query); status != tt.status {
			t.Errorf("%s ?%s: status %d, want %d: %s", tt.method, tt.query, status, tt.status, rec.Body)
		}
	}
}
