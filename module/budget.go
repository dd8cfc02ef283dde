package module

import (
	"strconv"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/budgets"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// budgetKeeper keeps the providers' token-request budgets across config
// reloads (budgets.Keeper): a reload that keeps a provider's rate_limit,
// endpoint, credential (client_id or API key), fleet_size and Redis
// settings keeps its budget, with its bucket, queue and plans.
var budgetKeeper = budgets.NewKeeper(nil)

// budgetsFor returns the config.Options.Budgets of the app's registries:
// with the shared tier, one budget per provider shared by the fleet through
// Redis (budgets.Store: redis_rate on the tier's client, each call through
// the tier's breaker and adaptive bound; this sidecar's share while Redis
// fails or the breaker is open); without it, this sidecar's share of each
// provider's rate_limit (divided by fleet_size).
func (a *App) budgetsFor() func(p *config.Provider) (*budget.Budget, error) {
	var shared budget.Store
	storeID := ""
	if a.fleet != nil {
		shared, storeID = budgets.New(a.fleet.Cache), a.fleetKey
	}
	n := a.FleetSize
	return func(p *config.Provider) (*budget.Budget, error) {
		return budgetKeeper.Budget(budgets.Spec{Provider: p.Name, Endpoint: p.Endpoint, Account: p.Account, Limit: p.RateLimit, FleetSize: n}, shared, storeID)
	}
}

// budgetKey is the part of a registry's pool key that its budgets depend
// on besides the Redis settings: a registry resolved for another
// fleet_size has other budgets.
func (a *App) budgetKey() string {
	return " fleet_size=" + strconv.Itoa(max(a.FleetSize, 1))
}

// useRegistry holds the budgets of reg's providers (the app's registry, a
// handler's own; nil is none) while this config uses them, and has the
// broker forget the failures of those whose secret changed (SecretsSeen).
func (a *App) useRegistry(reg *config.Registry) {
	held := reg.Budgets()
	budgetKeeper.Hold(held)
	a.budgets = append(a.budgets, held...)
	a.pooled.SecretsSeen(&a.owner, reg, a.logger)
}
