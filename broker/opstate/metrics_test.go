package opstate

import (
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
)

// TestCollector: the merchants gauge has every provider and state, is
// computed again once older than its maximum age, and l2_up is exported
// only with a fleet tier.
func TestCollector(t *testing.T) {
	f := newStateFixture(t)
	for _, m := range []string{"a-fresh", "b-refused", "d-down"} {
		_ = f.get(t, m)
	}
	c := NewCollector(f.sources)
	reg := prometheus.NewPedanticRegistry()
	if err := reg.Register(c); err != nil {
		t.Fatal(err)
	}
	gauge := func(provider string, counts map[string]int) string {
		var b strings.Builder
		for _, st := range States() {
			b.WriteString(`caddy_token_broker_merchants{provider="` + provider + `",state="` + st + `"} `)
			b.WriteString(strconv.Itoa(counts[st]) + "\n")
		}
		return b.String()
	}
	const help = "# HELP caddy_token_broker_merchants Merchants by state (refused, unknown_organisation, needs_consent, backing_off, refreshing, fresh, idle): the registry's explicit merchants and the wildcard's active ones.\n# TYPE caddy_token_broker_merchants gauge\n"
	const l2Help = "# HELP caddy_token_broker_l2_up 1 while the shared (Redis) tier is used, 0 while it is unavailable (its breaker is open: the broker mints alone).\n# TYPE caddy_token_broker_l2_up gauge\n"
	for _, tt := range []struct {
		name string
		do   func()
		want string
	}{
		{"three merchants asked", func() {}, help +
			gauge("nuapay", map[string]int{StateFresh: 1, StateRefused: 1, StateBackingOff: 1, StateIdle: 4}) +
			gauge("nuapay2", map[string]int{StateIdle: 1})},
		{"counts reused while younger than their maximum age", func() {
			_ = f.get(t, "e-idle")
			f.clk.Add(countsMaxAge - time.Second)
		}, help +
			gauge("nuapay", map[string]int{StateFresh: 1, StateRefused: 1, StateBackingOff: 1, StateIdle: 4}) +
			gauge("nuapay2", map[string]int{StateIdle: 1})},
		{"computed again at their maximum age", func() { f.clk.Add(time.Second) }, help +
			gauge("nuapay", map[string]int{StateFresh: 2, StateRefused: 1, StateBackingOff: 1, StateIdle: 3}) +
			gauge("nuapay2", map[string]int{StateIdle: 1})},
		{"computed again a minute later, with a fleet tier down", func() {
			f.clk.Add(time.Minute)
			f.tracker.SetFleet(true, false)
		}, l2Help + "caddy_token_broker_l2_up 0\n" + help +
			// d-down's failure memory (a minute) ended: idle, its last
			// error kept.
			gauge("nuapay", map[string]int{StateFresh: 2, StateRefused: 1, StateIdle: 4}) +
			gauge("nuapay2", map[string]int{StateIdle: 1})},
		{"the fleet tier back", func() { f.tracker.FleetChanged(true, nil) }, l2Help + "caddy_token_broker_l2_up 1\n"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tt.do()
			names := []string{"caddy_token_broker_merchants", "caddy_token_broker_l2_up"}
			if !strings.Contains(tt.want, "merchants{") {
				names = names[1:]
			}
			if err := testutil.GatherAndCompare(reg, strings.NewReader(tt.want), names...); err != nil {
				t.Error(err)
			}
		})
	}
}
