package budgets

import (
	"context"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// countingStore is a shared store that records the keys it is asked for.
type countingStore struct {
	budget.Store
	keys []string
}

func (c *countingStore) AllowN(ctx context.Context, key string, l budget.Limit, n int) (budget.Result, error) {
	c.keys = append(c.keys, key)
	return c.Store.AllowN(ctx, key, l, n)
}

func TestKeeper(t *testing.T) {
	now := func() time.Time { return time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC) }
	k := NewKeeper(now)
	l, err := budget.ParseRate("20/s")
	if err != nil {
		t.Fatal(err)
	}
	spec := Spec{Provider: "nuapay", Endpoint: "https://api.example", Limit: l, FleetSize: 4}

	local := k.Budget(spec, nil, "")
	if st := local.State(); st.Rate != 5 || st.Burst != 5 || st.Name != "nuapay" {
		t.Errorf("local budget of a fleet of 4: rate %g burst %d name %q, want 5 5 nuapay", st.Rate, st.Burst, st.Name)
	}
	if again := k.Budget(spec, nil, ""); again != local {
		t.Error("the same spec made a second budget")
	}
	other := spec
	other.FleetSize = 2
	if b := k.Budget(other, nil, ""); b == local || b.State().Rate != 10 {
		t.Errorf("fleet size 2: the same budget or rate %g", b.State().Rate)
	}

	cs := &countingStore{Store: budget.NewLocal(now)}
	shared := k.Budget(spec, cs, "redis A")
	if shared == local || shared.State().Rate != 20 {
		t.Errorf("shared budget: rate %g, want the whole 20", shared.State().Rate)
	}
	if err := shared.Take(context.Background(), budget.Foreground, time.Time{}); err != nil {
		t.Fatal(err)
	}
	if want := Key("nuapay", "https://api.example"); len(cs.keys) != 1 || cs.keys[0] != want {
		t.Errorf("shared store keys %q, want [%q]", cs.keys, want)
	}
	if b := k.Budget(spec, cs, "redis B"); b == shared {
		t.Error("another store got the same budget")
	}

	// Held budgets stay across a reload; the others go at the next Release.
	k.Hold([]*budget.Budget{local, shared})
	k.Hold([]*budget.Budget{shared, nil}) // the next configuration
	k.Release([]*budget.Budget{local, shared})
	if got := k.Len(); got != 1 {
		t.Errorf("after the first release: %d budgets kept, want 1 (shared)", got)
	}
	if b := k.Budget(spec, cs, "redis A"); b != shared {
		t.Error("a held budget was not kept")
	}
	if b := k.Budget(spec, nil, ""); b == local {
		t.Error("a released budget was kept")
	}
	k.Release([]*budget.Budget{shared})
	if got := k.Len(); got != 0 {
		t.Errorf("after the last release: %d budgets kept", got)
	}
}
