package module

import (
	"context"
	"net/http"
	"net/http/httptest"
	"reflect"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zapcore"
	zapobserver "go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// newMetricsHandler returns a handler for merchants acme and globex of
// provider nuapay, on a broker with the clock, instrumented with fresh
// collectors registered in reg.
func newMetricsHandler(t *testing.T, src sourceFunc, clk *clocktest.Clock, merchantLabel bool) (*Handler, *telemetry.Metrics, *prometheus.Registry) {
	t.Helper()
	return newMetricsHandlerWith(t, src, merchantLabel, broker.Options{Now: clk.Now, MaxAttempts: 1, FailureTTL: -1, BreakerThreshold: 2})
}

// newMetricsHandlerWith is newMetricsHandler with the broker's options
// (Sleep is set to not sleep).
func newMetricsHandlerWith(t *testing.T, src sourceFunc, merchantLabel bool, opts broker.Options) (*Handler, *telemetry.Metrics, *prometheus.Registry) {
	t.Helper()
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(),
		merchant: defaultSelector()}
	opts.Sleep = func(context.Context, time.Duration) error { return nil }
	h.broker = broker.New(opts)
	t.Cleanup(h.broker.Close)
	var bds []*broker.Binding
	for _, m := range []string{"acme", "globex"} {
		b := brokertest.NewBinding("nuapay#test", src, broker.Request{Merchant: m, Organisation: "org-" + m, Scopes: []string{"openbanking_pisp"}})
		bds = append(bds, b)
	}
	h.bindings = handTable("nuapay", "", bds...)
	m := telemetry.NewMetrics(merchantLabel)
	reg := prometheus.NewPedanticRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	h.instrument(m)
	return h, m, reg
}

func merchantRequest(merchant string) *http.Request {
	req := httptest.NewRequest("GET", "/", nil)
	req.Header.Set("X-Merchant-Id", merchant)
	return req
}

// TestMetricsScriptedSequence drives miss, hit, refresh-ahead, a failure
// and an open breaker through the handler on an injected clock, and checks
// every series exactly. The integration test cannot move Caddy's clock, so
// refresh-ahead is counted here.
func TestMetricsScriptedSequence(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	var fail atomic.Bool
	var calls atomic.Int64
	src := func(ctx context.Context, req broker.Request) (broker.Token, error) {
		calls.Add(1)
		if fail.Load() {
			return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 503}
		}
		now := clk.Now()
		return broker.Token{Value: broker.Secret("tok-" + req.Merchant), IssuedAt: now, Expiry: now.Add(100 * time.Second)}, nil
	}
	h, m, reg := newMetricsHandler(t, src, clk, false)
	// A fetch's log line is written once its calls are counted and its
	// outcome is cached (broker.Observer.FetchDone): a background refresh is
	// done when its line is.
	fetchLogged := make(chan struct{}, 8)
	core, _ := zapobserver.New(zap.InfoLevel)
	h.logger = zap.New(core, zap.Hooks(func(e zapcore.Entry) error {
		if strings.HasPrefix(e.Message, "token fetch") {
			fetchLogged <- struct{}{}
		}
		return nil
	}))
	h.instrument(m)
	fetchDone := func() {
		t.Helper()
		select {
		case <-fetchLogged:
		case <-time.After(10 * time.Second):
			t.Fatal("no fetch logged in 10s")
		}
	}

	mustServe := func(merchant string, want int) {
		t.Helper()
		rec, _, err := serve(t, h, merchantRequest(merchant))
		if err != nil || rec.Code != want {
			t.Fatalf("%s: status %d err %v, want %d", merchant, rec.Code, err, want)
		}
	}
	mustServe("acme", 200) // miss
	fetchDone()
	mustServe("acme", 200) // hit
	clk.Add(98 * time.Second)
	mustServe("acme", 200) // refresh: past its planned point (in the last 25 %, before the last 2.5 s), starts the background refresh
	fetchDone()
	mustServe("acme", 200) // hit on the refreshed token
	fail.Store(true)
	mustServe("globex", 502) // failure: a token API call with outcome token_unavailable
	fetchDone()
	mustServe("globex", 502) // second failure opens the breaker (threshold 2)
	fetchDone()
	mustServe("globex", 503) // breaker open: no call

	expect := map[prometheus.Collector]map[string]float64{
		m.Lookups: {
			`provider="nuapay",result="hit"`:     2,
			`provider="nuapay",result="refresh"`: 1,
			`provider="nuapay",result="miss"`:    1,
			`provider="nuapay",result="shared"`:  0,
		},
		m.TokenRequests: {
			`outcome="ok",provider="nuapay"`:                2,
			`outcome="token_unavailable",provider="nuapay"`: 2,
		},
		m.Breaker: {`provider="nuapay"`: float64(broker.BreakerOpen)},
	}
	checkSeries(t, reg, expect)
	if n := histogramCount(t, reg, "caddy_token_broker_token_request_duration_seconds"); n != 4 {
		t.Errorf("latency histogram count = %d, want 4", n)
	}
	if calls.Load() != 4 {
		t.Errorf("token API calls = %d, want 4", calls.Load())
	}

	// A reload brings a new registry: the same collectors register again
	// and keep counting.
	reg2 := prometheus.NewPedanticRegistry()
	if err := m.Register(reg2); err != nil {
		t.Fatal(err)
	}
	if err := m.Register(reg2); err != nil {
		t.Fatalf("second registration in one registry: %v", err)
	}
	mustServe("acme", 200)
	m.Purged("nuapay", "acme")
	expect[m.Lookups][`provider="nuapay",result="hit"`] = 3
	expect[m.Purges] = map[string]float64{`provider="nuapay"`: 1}
	checkSeries(t, reg2, expect)
}

func TestMetricsSharedAndMerchantLabel(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	release, started := make(chan struct{}), make(chan struct{}, 1)
	src := func(ctx context.Context, req broker.Request) (broker.Token, error) {
		started <- struct{}{}
		<-release
		now := clk.Now()
		return broker.Token{Value: "tok", IssuedAt: now, Expiry: now.Add(time.Hour)}, nil
	}
	h, m, reg := newMetricsHandler(t, src, clk, true)
	const n = 8
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() { serve(t, h, merchantRequest("acme")) })
	}
	<-started // the one fetch is in flight; requests arriving now share it
	close(release)
	wg.Wait()
	miss := testutil.ToFloat64(m.Lookups.WithLabelValues("nuapay", "miss", "acme"))
	shared := testutil.ToFloat64(m.Lookups.WithLabelValues("nuapay", "shared", "acme"))
	hit := testutil.ToFloat64(m.Lookups.WithLabelValues("nuapay", "hit", "acme"))
	// Every request is counted once: exactly one started the fetch (miss),
	// the others waited on it (shared) or came after it (hit).
	if miss != 1 || miss+shared+hit != n {
		t.Fatalf("miss %v shared %v hit %v, want exactly 1 miss and %d in all", miss, shared, hit, n)
	}
	checkSeries(t, reg, map[prometheus.Collector]map[string]float64{
		m.TokenRequests: {`merchant="acme",outcome="ok",provider="nuapay"`: 1},
	})
}

// The breaker opening mid-retry counts each call once; breaker_state,
// token_purges_total and keys_backing_off exist from provisioning; half-open
// is reported (the probe sees the gauge at 1); a failing key is counted as
// backing off until a success.
func TestMetricsPolicyState(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	var fail atomic.Bool
	var calls atomic.Int64
	var m *telemetry.Metrics
	var duringProbe atomic.Value
	src := func(ctx context.Context, req broker.Request) (broker.Token, error) {
		calls.Add(1)
		duringProbe.Store(testutil.ToFloat64(m.Breaker.WithLabelValues("nuapay")))
		if fail.Load() {
			return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 503}
		}
		now := clk.Now()
		return broker.Token{Value: broker.Secret("tok-" + req.Merchant), IssuedAt: now, Expiry: now.Add(time.Hour)}, nil
	}
	h, m, reg := newMetricsHandlerWith(t, src, false, broker.Options{Now: clk.Now, MaxAttempts: 3, BreakerThreshold: 2, BreakerCooldown: 10 * time.Second})
	present := func(name string) bool {
		mfs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		for _, mf := range mfs {
			if mf.GetName() == name && len(mf.GetMetric()) > 0 {
				return true
			}
		}
		return false
	}
	for _, name := range []string{"caddy_token_broker_breaker_state", "caddy_token_broker_token_purges_total", "caddy_token_broker_keys_backing_off"} {
		if !present(name) {
			t.Errorf("%s not exported before any request", name)
		}
	}
	fail.Store(true)
	if rec, _, _ := serve(t, h, merchantRequest("globex")); rec.Code != 503 {
		t.Fatalf("status %d, want 503 (breaker opened mid-retry)", rec.Code)
	}
	checkSeries(t, reg, map[prometheus.Collector]map[string]float64{
		m.TokenRequests: {`outcome="token_unavailable",provider="nuapay"`: 2},
		m.Breaker:       {`provider="nuapay"`: float64(broker.BreakerOpen)},
		m.BackingOff:    {`provider="nuapay"`: 1},
	})
	if n := histogramCount(t, reg, "caddy_token_broker_token_request_duration_seconds"); n != 2 || calls.Load() != 2 {
		t.Fatalf("latency histogram count = %d for %d calls, want 2", n, calls.Load())
	}
	// After the cooldown the probe runs with the breaker half-open, and
	// closes it.
	fail.Store(false)
	clk.Add(11 * time.Second)
	if rec, _, _ := serve(t, h, merchantRequest("globex")); rec.Code != 200 {
		t.Fatalf("after the cooldown: %d", rec.Code)
	}
	if v := duringProbe.Load(); v != float64(broker.BreakerHalfOpen) {
		t.Fatalf("breaker gauge during the probe = %v, want half-open (1)", v)
	}
	checkSeries(t, reg, map[prometheus.Collector]map[string]float64{
		m.TokenRequests: {`outcome="token_unavailable",provider="nuapay"`: 2, `outcome="ok",provider="nuapay"`: 1},
		m.Breaker:       {`provider="nuapay"`: float64(broker.BreakerClosed)},
		m.BackingOff:    {`provider="nuapay"`: 0},
	})
}

func TestLookupAllocatesNothing(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	h, _, _ := newMetricsHandler(t, func(context.Context, broker.Request) (broker.Token, error) {
		return broker.Token{Value: "tok", Expiry: clk.Now().Add(time.Hour)}, nil
	}, clk, false)
	b := &h.bindings.Peek("acme").Binding
	if n := testing.AllocsPerRun(100, func() { b.Observer.Lookup(b, broker.Hit) }); n != 0 {
		t.Fatalf("Lookup allocates %v times", n)
	}
}

func TestFetchLogLine(t *testing.T) {
	core, logs := zapobserver.New(zap.InfoLevel)
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	h, m, _ := newMetricsHandler(t, func(context.Context, broker.Request) (broker.Token, error) {
		return broker.Token{Value: testToken, Expiry: clk.Now().Add(time.Hour)}, nil
	}, clk, false)
	h.logger = zap.New(core)
	h.instrument(m)
	if rec, _, _ := serve(t, h, merchantRequest("acme")); rec.Code != 200 {
		t.Fatal(rec.Code)
	}
	entries := logs.FilterMessage("token fetched").All()
	if len(entries) != 1 {
		t.Fatalf("%d fetch log lines, want 1", len(entries))
	}
	f := entries[0].ContextMap()
	for k, want := range map[string]any{"merchant": "acme", "provider": "nuapay", "outcome": "ok",
		"fingerprint": broker.Fingerprint(testToken)} {
		if f[k] != want {
			t.Errorf("%s = %v, want %v", k, f[k], want)
		}
	}
	if _, ok := f["duration"]; !ok {
		t.Error("no duration")
	}
	for _, e := range logs.All() {
		for _, v := range e.ContextMap() {
			if s, ok := v.(string); ok && strings.Contains(s, testToken) {
				t.Fatalf("log line %q carries the token", e.Message)
			}
		}
	}
}

// A fetch logs one line whatever its number of calls to the token API,
// with each call's outcome, while token_requests_total counts every call.
func TestFetchLogOneLinePerFetch(t *testing.T) {
	down := &broker.APIError{Provider: "nuapay", StatusCode: 503}
	refused := &broker.APIError{Provider: "nuapay", StatusCode: 401, Code: "invalid_client"}
	for _, tt := range []struct {
		name     string
		calls    []error // the answer of each call, in order; nil: a token
		breaker  int     // BreakerThreshold (0: none)
		msg      string
		outcome  string
		outcomes []any
		requests map[string]float64 // token_requests_total by outcome
	}{
		{"one call", []error{nil}, 0, "token fetched", "ok", []any{"ok"},
			map[string]float64{`outcome="ok",provider="nuapay"`: 1}},
		{"two retries then a token", []error{down, down, nil}, 0, "token fetched", "ok", []any{"token_unavailable", "token_unavailable", "ok"},
			map[string]float64{`outcome="ok",provider="nuapay"`: 1, `outcome="token_unavailable",provider="nuapay"`: 2}},
		{"three failures", []error{down, down, down}, 0, "token fetch failed", "token_unavailable", []any{"token_unavailable", "token_unavailable", "token_unavailable"},
			map[string]float64{`outcome="token_unavailable",provider="nuapay"`: 3}},
		{"breaker opens mid-retry", []error{down, down, nil}, 2, "token fetch failed", "token_api_down", []any{"token_unavailable", "token_unavailable"},
			map[string]float64{`outcome="token_unavailable",provider="nuapay"`: 2}},
		{"refused credential is not retried", []error{refused}, 0, "token fetch failed", "token_refused", []any{"token_refused"},
			map[string]float64{`outcome="token_refused",provider="nuapay"`: 1}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clk := clocktest.New(time.Unix(1_700_000_000, 0))
			var n atomic.Int64
			src := func(context.Context, broker.Request) (broker.Token, error) {
				i := n.Add(1) - 1
				if err := tt.calls[i]; err != nil {
					return broker.Token{}, err
				}
				return broker.Token{Value: testToken, Expiry: clk.Now().Add(time.Hour)}, nil
			}
			h, m, reg := newMetricsHandlerWith(t, src, false, broker.Options{Now: clk.Now, MaxAttempts: 3, BreakerThreshold: tt.breaker, BreakerCooldown: time.Minute})
			core, logs := zapobserver.New(zap.InfoLevel)
			h.logger = zap.New(core)
			h.instrument(m)
			serve(t, h, merchantRequest("acme"))
			lines := logs.FilterMessageSnippet("token fetch").All()
			if len(lines) != 1 {
				t.Fatalf("%d fetch log lines, want 1: %v", len(lines), lines)
			}
			f := lines[0].ContextMap()
			if lines[0].Message != tt.msg || f["outcome"] != tt.outcome || f["attempts"] != int64(len(tt.outcomes)) ||
				f["merchant"] != "acme" || f["provider"] != "nuapay" || f["background"] != false {
				t.Errorf("%s %v; want %s, outcome %s, %d attempts", lines[0].Message, f, tt.msg, tt.outcome, len(tt.outcomes))
			}
			if !reflect.DeepEqual(f["attempt_outcomes"], tt.outcomes) {
				t.Errorf("attempt_outcomes = %v, want %v", f["attempt_outcomes"], tt.outcomes)
			}
			if _, ok := f["duration"]; !ok {
				t.Error("no duration")
			}
			if _, ok := f["retry_in"]; ok != (tt.outcome != "ok") {
				t.Errorf("retry_in = %v, want it on a failure only", f["retry_in"])
			}
			checkSeries(t, reg, map[prometheus.Collector]map[string]float64{m.TokenRequests: tt.requests})
		})
	}
}

func TestGlobalOptionMetricsMerchantLabel(t *testing.T) {
	var a App
	if err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser("token_broker {\n metrics_merchant_label\n}")); err != nil {
		t.Fatal(err)
	}
	if a.Metrics == nil || !a.Metrics.MerchantLabel {
		t.Fatalf("metrics = %+v", a.Metrics)
	}
	err := (&App{}).UnmarshalCaddyfile(caddyfile.NewTestDispenser("token_broker {\n metrics_merchant_label yes\n}"))
	if err == nil || !strings.Contains(err.Error(), "wrong argument count") {
		t.Fatalf("err = %v", err)
	}
}

// checkSeries compares the samples of each collector, by label string.
func checkSeries(t *testing.T, reg *prometheus.Registry, want map[prometheus.Collector]map[string]float64) {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		for _, mt := range mf.GetMetric() {
			var labels []string
			for _, l := range mt.GetLabel() {
				labels = append(labels, l.GetName()+`="`+l.GetValue()+`"`)
			}
			v := mt.GetCounter().GetValue() + mt.GetGauge().GetValue()
			got[mf.GetName()+"{"+strings.Join(labels, ",")+"}"] = v
		}
	}
	for c, series := range want {
		desc := make(chan *prometheus.Desc, 1)
		c.Describe(desc)
		name := fqName(<-desc)
		for labels, v := range series {
			key := name + "{" + labels + "}"
			if g, ok := got[key]; (!ok && v != 0) || g != v {
				t.Errorf("%s = %v (present %v), want %v", key, g, ok, v)
			}
		}
	}
}

func fqName(d *prometheus.Desc) string {
	s := d.String()
	_, s, _ = strings.Cut(s, `fqName: "`)
	s, _, _ = strings.Cut(s, `"`)
	return s
}

func histogramCount(t *testing.T, reg *prometheus.Registry, name string) uint64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	var n uint64
	for _, mf := range mfs {
		if mf.GetName() == name {
			for _, mt := range mf.GetMetric() {
				n += mt.GetHistogram().GetSampleCount()
			}
		}
	}
	return n
}

// waitFor polls cond for up to 10 s (background refreshes run on their own
// goroutine).
func waitFor(t *testing.T, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatal("condition not met in 10s")
		}
		time.Sleep(time.Millisecond)
	}
}

// TestLoadCollectors: configs share one set of collectors per key; a
// registration that fails (another collector of the same name) leaves no
// use of them behind.
func TestLoadCollectors(t *testing.T) {
	key := "test collectors " + t.Name()
	first, err := loadCollectors(prometheus.NewRegistry(), key, telemetry.NewConsentSteps)
	if err != nil {
		t.Fatal(err)
	}
	second, err := loadCollectors(prometheus.NewRegistry(), key, telemetry.NewConsentSteps)
	if err != nil {
		t.Fatal(err)
	}
	if first != second {
		t.Error("two loads of one key made two sets of collectors")
	}
	for range 2 {
		if _, err := metricsPool.Delete(key); err != nil {
			t.Fatal(err)
		}
	}

	clash := prometheus.NewRegistry()
	clash.MustRegister(telemetry.NewConsentSteps().Steps)
	failed := key + " clash"
	if _, err := loadCollectors(clash, failed, telemetry.NewConsentSteps); err == nil {
		t.Fatal("registering next to another collector of the same name succeeded")
	}
	if n, ok := metricsPool.References(failed); ok || n != 0 {
		t.Errorf("after a failed registration the pool holds %d uses of the collectors", n)
	}
}
