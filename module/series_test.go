package module

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// TestWildcardMerchantSeriesFollowActiveSet: with the merchant label on,
// a wildcard merchant's series (cache lookups, token requests) are deleted
// when its last binding in the process goes, evicted or with its config,
// so that the series follow the active set, not every id seen. Kept: an
// explicit merchant's; a merchant's still used by another table (another
// route's scopes); a merchant's that the next config lists explicitly;
// and a discarded table's late eviction releases nothing, so another
// table's use stays.
//
// Handlers: h1 (the env's wildcard table, max_active 1), h2 (another
// route's table on the same registry), h3 (the next config: ORG1
// explicit). Steps: "hN:ID" a request, "+2m" the clock, "discard hN" its
// Cleanup.
func TestWildcardMerchantSeriesFollowActiveSet(t *testing.T) {
	for _, tt := range []struct {
		name  string
		steps []string
		want  map[string]bool // merchant -> has series
	}{
		{"evicted", []string{"h1:ORG1", "+2m", "h1:ORG2"}, map[string]bool{"ORG1": false, "ORG2": true}},
		{"explicit kept", []string{"h1:acme", "+2m", "h1:ORG1", "+2m", "h1:ORG2", "discard h1"}, map[string]bool{"acme": true, "ORG1": false, "ORG2": false}},
		{"config discarded", []string{"h1:ORG1", "discard h1"}, map[string]bool{"ORG1": false}},
		{"held by another table", []string{"h1:ORG1", "h2:ORG1", "+2m", "h1:ORG2"}, map[string]bool{"ORG1": true, "ORG2": true}},
		{"released by both tables", []string{"h1:ORG1", "h2:ORG1", "+2m", "h1:ORG2", "discard h2"}, map[string]bool{"ORG1": false, "ORG2": true}},
		{"back after eviction", []string{"h1:ORG1", "+2m", "h1:ORG2", "+2m", "h1:ORG1"}, map[string]bool{"ORG1": true, "ORG2": false}},
		{"explicit in the next config", []string{"h1:ORG1", "h3:ORG1", "discard h1", "+2m", "h3:ORG1"}, map[string]bool{"ORG1": true}},
		{"discarded table evicts late", []string{"h1:ORG1", "h2:ORG1", "discard h1", "+2m", "h1:ORG2", "h2:ORG1"}, map[string]bool{"ORG1": true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env, m, promReg := newLabelledEnv(t)
			handlers := map[string]*Handler{
				"h1": env.h,
				"h2": env.otherHandler(env.h.registry, []string{"openbanking_pisp"}, m),
				"h3": env.otherHandler(explicitORG1(t), nil, m),
			}
			for _, step := range tt.steps {
				switch {
				case step == "+2m":
					env.clk.Add(2 * time.Minute)
				case strings.HasPrefix(step, "discard "):
					if err := handlers[strings.TrimPrefix(step, "discard ")].Cleanup(); err != nil {
						t.Fatal(err)
					}
				default:
					name, id, _ := strings.Cut(step, ":")
					if rec, got, err := serve(t, handlers[name], merchantRequest(id)); err != nil || got == nil {
						t.Fatalf("%s: %d %v", step, rec.Code, err)
					}
				}
			}
			series := merchantSeries(t, promReg)
			for merchant, has := range tt.want {
				got := series[merchant]
				if has && !got["caddy_token_broker_cache_lookups_total"] {
					t.Errorf("%s: no cache_lookups_total series, want them (got %v)", merchant, got)
				}
				if !has && len(got) > 0 {
					t.Errorf("%s: series %v left, want none", merchant, got)
				}
			}
		})
	}
}

// newLabelledEnv is newWildcardEnv with max_active 1 and idle_timeout 1m,
// whose handler counts into metrics with the merchant label, registered in
// a registry of their own.
func newLabelledEnv(t *testing.T) (*wildcardEnv, *telemetry.Metrics, *prometheus.Registry) {
	t.Helper()
	env := newWildcardEnv(t, "max_active = 1\nidle_timeout = \"1m\"")
	m := telemetry.NewMetrics(true)
	promReg := prometheus.NewRegistry()
	if err := m.Register(promReg); err != nil {
		t.Fatal(err)
	}
	env.h.instrument(m)
	return env, m, promReg
}

// otherHandler is a handler of reg with a table of its own (another
// route's scopes, or another config) on env's broker and clock, counting
// into m.
func (env *wildcardEnv) otherHandler(reg *config.Registry, scopes []string, m *telemetry.Metrics) *Handler {
	h := reloadedHandlerAt(env.h.broker, reg, scopes, env.clk.Now)
	h.instrument(m)
	return h
}

// explicitORG1 is a registry that lists ORG1 explicitly, on a sandbox of
// its own, under the provider name of newWildcardEnv's.
func explicitORG1(t *testing.T) *config.Registry {
	t.Helper()
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"partner-key"}, Organisations: []sandbox.Organisation{{ID: "ORG1", Name: "One"}}})
	ts := httptest.NewServer(sb)
	t.Cleanup(ts.Close)
	reg, err := configtest.Load(t, "next.toml", []byte(fmt.Sprintf(`
[providers.nuapay]
type = "nuapay"
base_url = %q
api_key = "{env.K}"

[merchants.ORG1]
provider = "nuapay"
organisation = "ORG1"
scopes = ["openbanking_pisp"]
`, ts.URL)), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// merchantSeries returns, for each value of the merchant label in reg,
// the names of the metrics with a series of it.
func merchantSeries(t *testing.T, reg *prometheus.Registry) map[string]map[string]bool {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	series := map[string]map[string]bool{}
	for _, mf := range mfs {
		for _, s := range mf.GetMetric() {
			for _, l := range s.GetLabel() {
				if l.GetName() == "merchant" {
					if series[l.GetValue()] == nil {
						series[l.GetValue()] = map[string]bool{}
					}
					series[l.GetValue()][mf.GetName()] = true
				}
			}
		}
	}
	return series
}

// TestWildcardSeriesOfBindingEvictedInFlight: with the merchant label on,
// a token request that ends, or a token rejected, after the table evicted
// its binding (a request in flight holds it) leaves no series of its
// merchant behind, whatever the number of such merchants; a merchant back
// in the table keeps its series. max_active is 1; BAD ids fail (404).
//
// Steps: brokertest.InFlight's ("hold ID" a request takes ID's binding,
// "fetch ID" that request's token request, "flood N"), "reject ID" the
// upstream's rejection of that request's token (purged), "ID" a whole
// request.
func TestWildcardSeriesOfBindingEvictedInFlight(t *testing.T) {
	for _, tt := range []struct {
		name  string
		steps []string
		want  map[string]bool // merchant -> has series
	}{
		{"held", []string{"hold BAD1", "fetch BAD1"}, map[string]bool{"BAD1": true}},
		{"evicted while in flight", []string{"hold BAD1", "BAD2", "fetch BAD1"}, map[string]bool{"BAD1": false, "BAD2": true}},
		{"back in the table", []string{"hold BAD1", "BAD2", "BAD1", "fetch BAD1"}, map[string]bool{"BAD1": true, "BAD2": false}},
		{"its token rejected after eviction", []string{"hold BAD1", "BAD2", "reject BAD1"}, map[string]bool{"BAD1": false, "BAD2": true}},
		{"a flood of ids in flight", []string{"flood 200"}, map[string]bool{"BAD0": false, "BAD100": false, "BAD198": false, "BAD199": true}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env, _, promReg := newLabelledEnv(t)
			d := brokertest.InFlight{Broker: env.h.broker, Flood: "BAD", Bind: func(id string) (*broker.Binding, error) {
				b, rf := env.h.binding(id)
				if rf != nil {
					return nil, fmt.Errorf("%+v", rf)
				}
				return &b.Binding, nil
			}}
			for _, step := range tt.steps {
				verb, arg, _ := strings.Cut(step, " ")
				switch {
				case d.Step(t, step):
				case verb == "reject":
					env.h.metrics.Rejected(d.Held(arg), broker.Token{}, broker.RejectionPurged)
				default:
					if status, _ := env.get(t, step); status != http.StatusBadGateway {
						t.Fatalf("%s: %d, want 502", step, status)
					}
				}
			}
			series := merchantSeries(t, promReg)
			for merchant, has := range tt.want {
				if got := series[merchant]; has != (len(got) > 0) {
					t.Errorf("%s: series %v, want some: %v", merchant, got, has)
				}
			}
			if len(series) > 2 {
				t.Errorf("series of %d merchants, want at most 2 (max_active, and one explicit)", len(series))
			}
		})
	}
}
