package module

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/broker/reload"
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
	app := &App{registry: reg, logger: zap.NewNop(), kept: reload.NewLogger(zap.NewNop()), tables: &bindings.Tables{},
		broker:  broker.New(broker.Options{MaxAttempts: 1, FailureTTL: time.Minute}),
		tracker: opstate.NewTracker(opstate.TrackerOptions{})}
	t.Cleanup(app.broker.Close)
	prev := current.Swap(app)
	t.Cleanup(func() { current.Store(prev) })
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector(),
		broker: app.broker, tracker: app.tracker, registry: reg}
	h.bindings = app.tables.Table(reg, nil, nil)
	h.instrument(telemetry.NewMetrics(false))
	return app, h
}

// getState asks the admin route; it returns the status and the body.
func getState(t *testing.T, method, query string) (int, *httptest.ResponseRecorder) {
	t.Helper()
	rec := httptest.NewRecorder()
	err := serveAdmin(rec, httptest.NewRequest(method, "/token_broker/state?"+query, nil))
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

// TestStateCollectorRegistered: the app's collector exports the merchants
// gauge from the same state as the admin route, and no l2_up without
// redis.
func TestStateCollectorRegistered(t *testing.T) {
	app, h := stateApp(t)
	for _, m := range []string{"m-down", "m-fresh", "m-refused"} {
		if _, _, err := serve(t, h, merchantRequest(m)); err != nil {
			t.Fatal(err)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	if err := app.registerStateCollector(reg); err != nil {
		t.Fatal(err)
	}
	want := map[string]float64{"refused": 1, "unknown_organisation": 0, "needs_consent": 0, "backing_off": 1, "refreshing": 0, "fresh": 1, "idle": 1}
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, f := range families {
		if f.GetName() == "caddy_token_broker_l2_up" {
			t.Error("l2_up without redis")
		}
		if f.GetName() != "caddy_token_broker_merchants" {
			continue
		}
		for _, m := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range m.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["provider"] != "nuapay" {
				t.Errorf("series of provider %q", labels["provider"])
			}
			got[labels["state"]] = m.GetGauge().GetValue()
		}
	}
	if !maps.Equal(got, want) {
		t.Errorf("merchants gauge %v, want %v", got, want)
	}
}

// TestStateConsent: a merchant whose refresh token the bank refuses
// needs consent (an event, once, and its state), and a refresh token
// loaded through the admin API grants it (an event, once).
func TestStateConsent(t *testing.T) {
	bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		if r.ParseForm() != nil || r.PostForm.Get("refresh_token") != "rt-new" {
			w.WriteHeader(http.StatusBadRequest)
			w.Write([]byte(`{"error":"invalid_grant"}`))
			return
		}
		w.Write([]byte(`{"access_token":"at-after-consent","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(bank.Close)
	reg, err := configtest.Load(t, "merchants.toml", []byte(`[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "`+bank.URL+`/token"
client_id = "tpp"
client_secret = "{env.BANK_SECRET}"

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`), config.Options{RefreshStore: &oauth.MemoryStore{}, LookupEnv: func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }})
	if err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var events []string
	app := &App{registry: reg, logger: zap.NewNop(), tables: &bindings.Tables{},
		broker: broker.New(broker.Options{MaxAttempts: 1, FailureTTL: -1}),
		tracker: opstate.NewTracker(opstate.TrackerOptions{Emit: func(event string, data map[string]any) {
			mu.Lock()
			defer mu.Unlock()
			events = append(events, fmt.Sprintf("%s %v %v %v", event, data["merchant"], data["provider"], data["error"]))
		}})}
	t.Cleanup(app.broker.Close)
	prev := current.Swap(app)
	t.Cleanup(func() { current.Store(prev) })
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector(),
		broker: app.broker, tracker: app.tracker, registry: reg}
	h.bindings = app.tables.Table(reg, nil, nil)
	h.instrument(nil)
	took := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := events
		events = nil
		return out
	}
	state := func() string {
		t.Helper()
		_, rec := getState(t, http.MethodGet, "")
		var r opstate.Report
		if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil || len(r.Merchants) != 1 {
			t.Fatalf("%s: %v", rec.Body, err)
		}
		return r.Merchants[0].State + " " + r.Merchants[0].LastError
	}
	put := func(rt string) {
		t.Helper()
		req := httptest.NewRequest(http.MethodPut, "/token_broker/merchants/acme/refresh_token", strings.NewReader(`{"refresh_token":"`+rt+`"}`))
		if err := adminapi.Serve(httptest.NewRecorder(), req, app.admin()); err != nil {
			t.Fatal(err)
		}
	}

	if got := state(); got != "idle " {
		t.Fatalf("before any request: %q", got)
	}
	for range 3 {
		if rec := request(t, h, "acme"); rec.Code != http.StatusBadGateway {
			t.Fatalf("without a refresh token: %d %s", rec.Code, rec.Body)
		}
	}
	if got := took(); !slices.Equal(got, []string{"merchant_consent_needed acme bank consent_required"}) {
		t.Errorf("events %q", got)
	}
	if got := state(); got != "needs_consent consent_required" {
		t.Errorf("state %q", got)
	}
	put("rt-new")
	if rec := request(t, h, "acme"); rec.Code != http.StatusOK {
		t.Fatalf("with a refresh token: %d %s", rec.Code, rec.Body)
	}
	if got := took(); !slices.Equal(got, []string{"merchant_consent_granted acme bank <nil>"}) {
		t.Errorf("events %q", got)
	}
	if got := state(); got != "fresh consent_required" {
		t.Errorf("state %q; want fresh, the last error kept", got)
	}
	put("rt-rotated")
	if got := took(); len(got) != 0 {
		t.Errorf("a routine rotation: events %q, want none", got)
	}
}

// TestStateFleetTier: with redis configured, the state has the fleet
// tier, up until its breaker opens after consecutive failures (Redis is
// down: nothing listens on port 1), and caddy_token_broker_l2_up says so.
func TestStateFleetTier(t *testing.T) {
	t.Setenv("TB_TEST_REDIS_KEY", base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32))))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	app := &App{Redis: &RedisConfig{Address: []string{"127.0.0.1:1"}, EncryptionKey: "{env.TB_TEST_REDIS_KEY}", Timeout: caddy.Duration(20 * time.Millisecond)}}
	if err := app.Provision(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = app.Cleanup() })
	prev := current.Swap(app)
	t.Cleanup(func() { current.Store(prev) })
	l2Up := func() float64 {
		t.Helper()
		families, err := ctx.GetMetricsRegistry().Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, f := range families {
			if f.GetName() == "caddy_token_broker_l2_up" {
				return f.GetMetric()[0].GetGauge().GetValue()
			}
		}
		t.Fatal("no caddy_token_broker_l2_up")
		return 0
	}
	tier := func() opstate.Fleet {
		t.Helper()
		_, rec := getState(t, http.MethodGet, "")
		var r opstate.Report
		if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil || r.Fleet == nil {
			t.Fatalf("%s: %v", rec.Body, err)
		}
		return *r.Fleet
	}
	if f := tier(); !f.Up || f.Since == nil || l2Up() != 1 {
		t.Fatalf("before any Redis call: %+v, l2_up %g", f, l2Up())
	}
	// Each lookup makes at least one failed Redis call: the breaker opens.
	for i := range fleet.BreakerThreshold {
		if _, _, err := app.fleet.Cache.Fetch(context.Background(), fmt.Sprint("k", i), func(brokerToken) bool { return true }, mintOne); err != nil {
			t.Fatal(err)
		}
	}
	if f := tier(); f.Up || f.LastError == "" || f.LastErrorAt == nil || l2Up() != 0 {
		t.Fatalf("with Redis down: %+v, l2_up %g", f, l2Up())
	}
}

// TestStateHandlersRegistry: a handler with a registry of its own, whose
// provider has the name of the app's, is held (a 429): the app's start
// (a reload) and a scrape keep it failing (no provider_recovered), since
// the handler's registry is among the operator's view's sources; reading
// the state emits nothing.
func TestStateHandlersRegistry(t *testing.T) {
	app, _ := stateApp(t)
	var mu sync.Mutex
	var events []string
	app.tracker = opstate.NewTracker(opstate.TrackerOptions{Emit: func(event string, data map[string]any) {
		mu.Lock()
		defer mu.Unlock()
		events = append(events, fmt.Sprintf("%s %v", event, data["provider"]))
	}})
	app.watched = &probe.Watched{}
	took := func() []string {
		mu.Lock()
		defer mu.Unlock()
		out := events
		events = nil
		return out
	}
	own, err := configtest.Load(t, "own.toml", []byte(strings.Replace(stateAdminTOML, "127.0.0.1:1", "127.0.0.1:2", 1)),
		config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	own.Providers["nuapay"].Source = sourceFunc(func(context.Context, broker.Request) (broker.Token, error) {
		return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 429, RetryAfter: time.Minute}
	})
	app.watched.Add(own, nil)
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector(),
		broker: app.broker, tracker: app.tracker, registry: own}
	h.bindings = app.tables.Table(own, nil, nil)
	h.instrument(nil)
	if rec := request(t, h, "m-fresh"); rec.Code != http.StatusServiceUnavailable {
		t.Fatalf("the handler's throttled provider: %d %s", rec.Code, rec.Body)
	}
	if got := took(); !slices.Equal(got, []string{"provider_failing nuapay"}) {
		t.Fatalf("events %q", got)
	}
	if err := app.Start(); err != nil {
		t.Fatal(err)
	}
	getState(t, http.MethodGet, "")
	c := opstate.NewCollector(app.stateSources)
	ch := make(chan prometheus.Metric, 100)
	c.Collect(ch)
	if got := took(); len(got) != 0 {
		t.Errorf("events after a start, a read and a scrape: %q, want none", got)
	}
}

// TestStateFleetTierAfterFailedLoad: a config load that fails after the
// app provisioned (another module's error) with the running config's
// Redis but other cache settings leaves the running app's view of the
// shared tier live: when the tier's breaker opens afterwards (Redis is
// down: nothing listens on port 1), the state says so.
func TestStateFleetTierAfterFailedLoad(t *testing.T) {
	t.Setenv("TB_TEST_REDIS_KEY", base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32))))
	provision := func(leeway time.Duration) *App {
		t.Helper()
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		app := &App{Leeway: caddy.Duration(leeway), Redis: &RedisConfig{Address: []string{"127.0.0.1:1"},
			EncryptionKey: "{env.TB_TEST_REDIS_KEY}", Timeout: caddy.Duration(20 * time.Millisecond)}}
		if err := app.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		return app
	}
	running := provision(time.Second)
	t.Cleanup(func() { _ = running.Cleanup() })
	prev := current.Load()
	t.Cleanup(func() { current.Store(prev) })
	if err := running.Start(); err != nil {
		t.Fatal(err)
	}
	failed := provision(2 * time.Second) // the same tier, another broker
	if failed.fleet != running.fleet || failed.pooled == running.pooled {
		t.Fatal("want the failed load to share the running app's tier, not its broker")
	}
	if err := failed.Cleanup(); err != nil {
		t.Fatal(err)
	}

	for i := range fleet.BreakerThreshold {
		if _, _, err := running.fleet.Cache.Fetch(context.Background(), fmt.Sprint("k", i), func(brokerToken) bool { return true }, mintOne); err != nil {
			t.Fatal(err)
		}
	}
	if running.fleet.Cache.Available() {
		t.Fatal("the breaker did not open")
	}
	_, rec := getState(t, http.MethodGet, "")
	var r opstate.Report
	if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil || r.Fleet == nil {
		t.Fatalf("%s: %v", rec.Body, err)
	}
	if r.Fleet.Up || r.Fleet.LastError == "" {
		t.Fatalf("with Redis down after a failed load: %+v; want the tier down, with its error", *r.Fleet)
	}
}
