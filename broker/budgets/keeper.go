// Package budgets makes and keeps the providers' token-request budgets
// (package budget): a budget.Store shared by a fleet through Redis
// (Store), and a Keeper that gives a provider the same budget across
// config reloads while its settings do not change.
package budgets

import (
	"context"
	"fmt"
	"sync"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// Spec is what a provider's budget is made of. Two providers with equal
// Specs on the same store share one budget.
type Spec struct {
	// Provider is the provider's name: the budget's name in metrics,
	// errors and the admin state.
	Provider string
	// Endpoint is the provider's token endpoint; a shared store's key
	// holds its hash (Key).
	Endpoint string
	// Account is the fingerprint of the credential the provider counts
	// token requests against (budget.Account): with Endpoint it names the
	// budget.
	Account string
	// Limit is the provider's rate_limit and rate_burst.
	Limit budget.Limit
	// FleetSize is how many sidecars spend the limit: each spends its
	// share without a shared store, or while the store fails. 0: one
	// sidecar, refused with a shared store.
	FleetSize int
}

// Keeper keeps budgets across config reloads: Budget returns the budget
// already made for the same Spec and store while a configuration holds it.
// Safe for concurrent use.
type Keeper struct {
	now func() time.Time

	mu       sync.Mutex
	byKey    map[string]*kept
	byBudget map[*budget.Budget]*kept
}

// kept is one budget in the Keeper and the holds on it.
type kept struct {
	key   string
	b     *budget.Budget
	holds int
}

// NewKeeper returns an empty Keeper whose budgets read the clock now
// (time.Now when nil).
func NewKeeper(now func() time.Time) *Keeper {
	if now == nil {
		now = time.Now
	}
	return &Keeper{now: now, byKey: map[string]*kept{}, byBudget: map[*budget.Budget]*kept{}}
}

// Budget returns the budget of spec: on shared (a fleet's store, named
// storeID) the whole limit under Key, and this sidecar's share while the
// store fails; with shared nil, this sidecar's share in a local bucket
// (budget.WithLocalShare). A budget made before for the same spec and
// store is returned until the Release that leaves it unheld. It returns an
// error when shared is set and spec.FleetSize is not.
func (k *Keeper) Budget(spec Spec, shared budget.Store, storeID string) (*budget.Budget, error) {
	if shared != nil && spec.FleetSize < 1 {
		return nil, fmt.Errorf("provider %q has rate_limit %s, shared by the fleet through redis, but fleet_size is not set: "+
			"set the token_broker app's fleet_size to the number of sidecars sharing this Redis, so that while Redis fails each spends "+
			"rate_limit / fleet_size, not the whole limit", spec.Provider, spec.Limit)
	}
	n := max(spec.FleetSize, 1)
	key := fmt.Sprintf("%q %q %q %q %s fleet_size=%d", storeID, spec.Provider, spec.Endpoint, spec.Account, spec.Limit, n)
	k.mu.Lock()
	defer k.mu.Unlock()
	if e := k.byKey[key]; e != nil {
		return e.b, nil
	}
	var b *budget.Budget
	if shared != nil {
		b = budget.New(spec.Provider, spec.Limit, keyed{shared, Key(spec.Provider, spec.Endpoint, spec.Account)}, k.now,
			budget.WithFallback(spec.Limit.Share(n)), budget.WithSharedBy(n))
	} else {
		b = budget.New(spec.Provider, spec.Limit.Share(n), budget.NewLocal(k.now), k.now, budget.WithLocalShare(n))
	}
	e := &kept{key: key, b: b}
	k.byKey[key], k.byBudget[b] = e, e
	return b, nil
}

// Hold marks budgets (from Budget) as used by a configuration; nil
// entries are skipped.
func (k *Keeper) Hold(budgets []*budget.Budget) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, b := range budgets {
		if e := k.byBudget[b]; e != nil {
			e.holds++
		}
	}
}

// Release ends a Hold, then forgets every budget no configuration holds.
func (k *Keeper) Release(budgets []*budget.Budget) {
	k.mu.Lock()
	defer k.mu.Unlock()
	for _, b := range budgets {
		if e := k.byBudget[b]; e != nil && e.holds > 0 {
			e.holds--
		}
	}
	for b, e := range k.byBudget {
		if e.holds == 0 {
			delete(k.byBudget, b)
			delete(k.byKey, e.key)
		}
	}
}

// keyed spends a shared store under a fixed key, whatever key the budget
// asks for.
type keyed struct {
	s   budget.Store
	key string
}

func (k keyed) AllowN(ctx context.Context, _ string, l budget.Limit, n int) (budget.Result, error) {
	return k.s.AllowN(ctx, k.key, l, n)
}

func (k keyed) Hold(ctx context.Context, _ string, d time.Duration) error {
	return k.s.Hold(ctx, k.key, d)
}
