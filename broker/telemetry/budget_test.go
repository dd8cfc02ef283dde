package telemetry

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

func (t *tap) RefreshBehind(provider string, b *broker.Binding, expiry time.Time) {
	t.note(fmt.Sprintf("behind %s %s %d", provider, b.Merchant, expiry.Unix()))
}

// TestRecorderBudget: the calls of a binding with a budget are counted
// by priority; refresh plans by when; a refresh behind plan is told to
// the tap.
func TestRecorderBudget(t *testing.T) {
	m := NewMetrics(false)
	var tp tap
	r := ForRegistry(m, &tp, zap.NewNop(), nil, registryOf("nuapay#1a2b"), nil)
	o := &Observer{r: r}
	l, err := budget.ParseRate("20/s")
	if err != nil {
		t.Fatal(err)
	}
	p := broker.NewProfile("nuapay#1a2b", nil, []string{"s"}, "", 0)
	p.Budget = budget.New("nuapay", l, budget.NewLocal(nil), nil)
	withBudget := broker.NewBindingFor(p, "acme", "org-acme")
	without := brokertest.NewBinding("nuapay#1a2b", nil, broker.Request{Merchant: "plain"})

	ctx := context.Background()
	o.Fetched(ctx, withBudget, broker.Token{}, 0, false, nil)
	o.Fetched(ctx, withBudget, broker.Token{}, 0, true, nil)
	o.Fetched(ctx, withBudget, broker.Token{}, 0, true, &broker.APIError{Provider: "nuapay", StatusCode: 503})
	o.Fetched(ctx, without, broker.Token{}, 0, false, nil)
	expiry := time.Unix(1_700_000_000, 0)
	o.RefreshPlanned(withBudget, expiry.Add(-time.Minute))
	o.RefreshPlanned(without, expiry.Add(-time.Minute))
	o.RefreshBehind(withBudget, expiry)

	for _, tc := range []struct {
		name string
		got  float64
		want float64
	}{
		{"used foreground", testutil.ToFloat64(m.BudgetUsed.WithLabelValues("nuapay", "foreground")), 1},
		{"used background", testutil.ToFloat64(m.BudgetUsed.WithLabelValues("nuapay", "background")), 2},
		{"planned ahead", testutil.ToFloat64(m.RefreshesPlanned.WithLabelValues("nuapay", PlannedAhead)), 2},
		{"planned behind", testutil.ToFloat64(m.RefreshesPlanned.WithLabelValues("nuapay", PlannedBehind)), 1},
	} {
		if tc.got != tc.want {
			t.Errorf("%s: %g, want %g", tc.name, tc.got, tc.want)
		}
	}
	if want := "behind nuapay acme 1700000000"; !slices.Contains(tp.told, want) {
		t.Errorf("tap told %q, want %q among them", tp.told, want)
	}
	// Without metrics the observer still tells the tap.
	var tp2 tap
	o2 := &Observer{r: ForRegistry(nil, &tp2, zap.NewNop(), nil, nil, nil)}
	o2.RefreshPlanned(withBudget, expiry)
	o2.RefreshBehind(withBudget, expiry)
	if len(tp2.told) != 1 {
		t.Errorf("without metrics: tap told %q, want the refresh behind", tp2.told)
	}
}
