package opstate

import (
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestBudgetState: a provider with a rate_limit shows its budget in the
// report and in the budget gauges; a refresh behind plan is counted and
// announced.
func TestBudgetState(t *testing.T) {
	toml := strings.Replace(stateTOML, "base_url = \"http://127.0.0.1:1\"\n", "base_url = \"http://127.0.0.1:1\"\nrate_limit = \"20/s\"\nrate_burst = 4\n", 1)
	f := newFixtureOf(t, toml)
	byName := func() map[string]Provider {
		out := map[string]Provider{}
		for _, p := range Build(f.sources(), Query{}, f.clk.Now()).Providers {
			out[p.Name] = p
		}
		return out
	}
	ps := byName()
	want := Budget{Rate: 20, Burst: 4, Effective: 20, Remaining: 4}
	if b := ps["nuapay"].Budget; b == nil || *b != want {
		t.Errorf("nuapay budget %+v, want %+v", b, want)
	}
	if b := ps["nuapay2"].Budget; b != nil {
		t.Errorf("nuapay2 has no rate_limit, but a budget %+v", b)
	}

	b, err := f.reg.Binding("a-fresh", nil)
	if err != nil {
		t.Fatal(err)
	}
	f.tracker.RefreshBehind("nuapay", b, f.clk.Now().Add(time.Second))
	if got, want := f.events.events, []string{EventRefreshBehind + " merchant=a-fresh provider=nuapay error=budget_exhausted"}; strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("events %q, want %q", got, want)
	}
	if got := byName()["nuapay"].Budget.RefreshesBehind; got != 1 {
		t.Errorf("refreshes_behind %d, want 1", got)
	}

	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(NewCollector(f.sources)); err != nil {
		t.Fatal(err)
	}
	const gauges = `
# HELP caddy_token_broker_budget_queue_length Callers waiting for their turn at the provider's budget.
# TYPE caddy_token_broker_budget_queue_length gauge
caddy_token_broker_budget_queue_length{provider="nuapay"} 0
# HELP caddy_token_broker_budget_rate Token requests per second the provider's budget (rate_limit) spends now: its rate (this sidecar's share without Redis), or lower while the provider's rate-limit headers say so (0 while none is left).
# TYPE caddy_token_broker_budget_rate gauge
caddy_token_broker_budget_rate{provider="nuapay"} 20
# HELP caddy_token_broker_budget_remaining Token requests the provider's budget held at its last answer.
# TYPE caddy_token_broker_budget_remaining gauge
caddy_token_broker_budget_remaining{provider="nuapay"} 4
`
	if err := testutil.GatherAndCompare(reg, strings.NewReader(gauges), "caddy_token_broker_budget_rate",
		"caddy_token_broker_budget_remaining", "caddy_token_broker_budget_queue_length"); err != nil {
		t.Error(err)
	}
	if n, err := testutil.GatherAndCount(reg, "caddy_token_broker_budget_exhausted_total", "caddy_token_broker_budget_queue_wait_seconds_total"); err != nil || n != 2 {
		t.Errorf("budget counters: %d series, %v; want 2", n, err)
	}
}
