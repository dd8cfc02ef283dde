package opstate

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// BenchmarkBuild builds one page of the report of 100 000 explicit
// merchants, half of them with a cached token, 1 000 backing off and
// 1 000 refused, with the state filter and without.
func BenchmarkBuild(b *testing.B) {
	const n = 100_000
	var toml strings.Builder
	toml.WriteString("[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"http://127.0.0.1:1\"\napi_key = \"{env.K}\"\n")
	for i := range n {
		fmt.Fprintf(&toml, "\n[merchants.merchant-%06d]\nprovider = \"nuapay\"\norganisation = \"org-%06d\"\nscopes = [\"s\"]\n", i, i)
	}
	reg, err := configtest.Load(b, "bench.toml", []byte(toml.String()), config.Options{LookupEnv: func(string) (string, bool) { return "k", true }})
	if err != nil {
		b.Fatal(err)
	}
	now := time.Unix(1_700_000_000, 0)
	clock := func() time.Time { return now }
	reg.Providers["nuapay"].Source = sourceFunc(func(_ context.Context, req broker.Request) (broker.Token, error) {
		switch {
		case strings.HasSuffix(req.Organisation, "1"): // 1 in 10: a tenth of them fail
			return broker.Token{}, errDown
		case strings.HasSuffix(req.Organisation, "3"):
			return broker.Token{}, errRefused
		}
		return broker.Token{Value: broker.Secret("t-" + req.Organisation), IssuedAt: now, Expiry: now.Add(time.Hour)}, nil
	})
	br := broker.New(broker.Options{Now: clock, MaxAttempts: 1, FailureTTL: time.Hour, FailureMax: time.Hour, BreakerThreshold: -1})
	b.Cleanup(br.Close)
	tracker := NewTracker(TrackerOptions{Now: clock})
	table := bindings.ForRegistry(reg, nil, nil, clock)
	obs := &tapObserver{t: tracker}
	for i := 0; i < n; i += 2 { // half of the merchants asked for a token
		bd, err := reg.Binding(fmt.Sprintf("merchant-%06d", i+i%20/10), nil)
		if err != nil {
			b.Fatal(err)
		}
		bd.Observer = obs
		_, _, _ = br.Get(context.Background(), bd)
	}
	s := Sources{Registry: reg, Broker: br, Tables: []*bindings.Table{table}, Tracker: tracker, Index: &Index{}}
	r := Build(s, Query{}, now)
	if r.Total != n || r.Counts[StateFresh] == 0 || r.Counts[StateBackingOff] == 0 || r.Counts[StateRefused] == 0 || r.Counts[StateIdle] == 0 {
		b.Fatalf("counts %v, total %d", r.Counts, r.Total)
	}
	for _, q := range []Query{{Page: Page{Limit: DefaultLimit}}, {State: StateRefused, Page: Page{Limit: DefaultLimit, After: "merchant-050000"}}} {
		b.Run(fmt.Sprintf("state=%s", q.State), func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				Build(s, q, now)
			}
		})
	}
}

// tapObserver feeds a Tracker as the telemetry observer does.
type tapObserver struct{ t *Tracker }

func (o *tapObserver) Lookup(*broker.Binding, broker.Result)                    {}
func (o *tapObserver) FetchDone(context.Context, *broker.Binding, broker.Fetch) {}
func (o *tapObserver) BreakerChanged(string, broker.BreakerState)               {}
func (o *tapObserver) BackingOff(*broker.Binding, bool)                         {}
func (o *tapObserver) SourceBackingOff(string, bool)                            {}
func (o *tapObserver) RefreshPlanned(*broker.Binding, time.Time)                {}
func (o *tapObserver) RefreshBehind(*broker.Binding, time.Time)                 {}

func (o *tapObserver) Fetched(_ context.Context, b *broker.Binding, _ broker.Token, _ time.Duration, _ bool, err error) {
	o.t.Fetched("nuapay", b, nil, err)
}
