package budgets

import (
	"context"
	"errors"
	"strings"
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
	spec := Spec{Provider: "nuapay", Endpoint: "https://api.example", Account: budget.Account("key A"), Limit: l, FleetSize: 4}

	budgetOf := func(spec Spec, shared budget.Store, storeID string) *budget.Budget {
		t.Helper()
		b, err := k.Budget(spec, shared, storeID)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	local := budgetOf(spec, nil, "")
	if st := local.State(); st.Rate != 5 || st.Burst != 5 || st.Name != "nuapay" {
		t.Errorf("local budget of a fleet of 4: rate %g burst %d name %q, want 5 5 nuapay", st.Rate, st.Burst, st.Name)
	}
	if again := budgetOf(spec, nil, ""); again != local {
		t.Error("the same spec made a second budget")
	}
	other := spec
	other.FleetSize = 2
	if b := budgetOf(other, nil, ""); b == local || b.State().Rate != 10 {
		t.Errorf("fleet size 2: the same budget or rate %g", b.State().Rate)
	}

	cs := &countingStore{Store: budget.NewLocal(now)}
	shared := budgetOf(spec, cs, "redis A")
	if shared == local || shared.State().Rate != 20 {
		t.Errorf("shared budget: rate %g, want the whole 20", shared.State().Rate)
	}
	if _, err := shared.Take(context.Background(), budget.Foreground, time.Time{}, nil); err != nil {
		t.Fatal(err)
	}
	// Key("nuapay", "https://api.example", budget.Account("key A")),
	// computed once: the key every sidecar of the fleet spends.
	if want := "nuapay:6c1de24ae402"; len(cs.keys) != 1 || cs.keys[0] != want {
		t.Errorf("shared store keys %q, want [%q]", cs.keys, want)
	}
	if b := budgetOf(spec, cs, "redis B"); b == shared {
		t.Error("another store got the same budget")
	}

	// Held budgets stay across a reload; the others go at the next Release.
	k.Hold([]*budget.Budget{local, shared})
	k.Hold([]*budget.Budget{shared, nil}) // the next configuration
	k.Release([]*budget.Budget{local, shared})
	if got := keptLen(k); got != 1 {
		t.Errorf("after the first release: %d budgets kept, want 1 (shared)", got)
	}
	if b := budgetOf(spec, cs, "redis A"); b != shared {
		t.Error("a held budget was not kept")
	}
	if b := budgetOf(spec, nil, ""); b == local {
		t.Error("a released budget was kept")
	}
	k.Release([]*budget.Budget{shared})
	if got := keptLen(k); got != 0 {
		t.Errorf("after the last release: %d budgets kept", got)
	}
}

// TestKeeperBudgetPerAccount: two configurations of one token API that
// differ only in their credential's account (two partners' API keys, each
// with its own rate limit at the provider) get two budgets, spending two
// keys of a shared store, a fleet's Redis: spending one leaves the other
// whole. The same configuration, in another sidecar of the fleet (another
// Keeper), spends the same key.
func TestKeeperBudgetPerAccount(t *testing.T) {
	now := func() time.Time { return time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC) }
	cs := &countingStore{Store: budget.NewLocal(now)}
	one := budget.Limit{Rate: 1, Burst: 1, Period: time.Minute}
	specA := Spec{Provider: "nuapay", Endpoint: "https://api.example", Account: budget.Account("api key of partner A"), Limit: one, FleetSize: 2}
	specB := specA
	specB.Account = budget.Account("api key of partner B")
	spend := func(k *Keeper, spec Spec) error {
		t.Helper()
		b, err := k.Budget(spec, cs, "redis A")
		if err != nil {
			t.Fatal(err)
		}
		_, err = b.Take(context.Background(), budget.Foreground, now(), nil)
		return err
	}
	sidecar1, sidecar2 := NewKeeper(now), NewKeeper(now)
	if err := spend(sidecar1, specA); err != nil {
		t.Fatalf("partner A's first request: %v", err)
	}
	if err := spend(sidecar1, specB); err != nil {
		t.Fatalf("partner B's first request, after A's: %v; want its own budget", err)
	}
	if err := spend(sidecar2, specA); !errors.Is(err, budget.ErrExhausted) {
		t.Fatalf("partner A's second request, on another sidecar: %v; want the fleet's budget of A exhausted", err)
	}
	if cs.keys[0] == cs.keys[1] || cs.keys[0] != cs.keys[2] {
		t.Errorf("store keys %q: want A's and B's apart, A's the same on both sidecars", cs.keys)
	}
}

// TestKeeperSharedNeedsFleetSize: a budget shared through a store needs
// the fleet size, which gives each sidecar its share while the store
// fails; without a shared store one sidecar spends the whole limit.
func TestKeeperSharedNeedsFleetSize(t *testing.T) {
	k := NewKeeper(nil)
	spec := Spec{Provider: "nuapay", Endpoint: "https://api.example", Limit: budget.Limit{Rate: 20, Period: time.Second, Burst: 20}}
	b, err := k.Budget(spec, budget.NewLocal(nil), "redis A")
	if b != nil || err == nil || !strings.Contains(err.Error(), `provider "nuapay"`) || !strings.Contains(err.Error(), "set the token_broker app's fleet_size") {
		t.Errorf("shared, fleet_size unset: budget %v, error %v; want an error naming the provider and fleet_size", b, err)
	}
	if b, err := k.Budget(spec, nil, ""); err != nil || b.State().Rate != 20 {
		t.Errorf("local, fleet_size unset: %v; want the whole limit", err)
	}
	spec.FleetSize = 1
	if b, err := k.Budget(spec, budget.NewLocal(nil), "redis A"); err != nil || b.State().Rate != 20 {
		t.Errorf("shared, fleet_size 1: %v; want the whole limit", err)
	}
}

// keptLen returns how many budgets k keeps.
func keptLen(k *Keeper) int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.byKey)
}
