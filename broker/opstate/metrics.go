package opstate

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// countsMaxAge is how long a Collector reuses the merchants' counts: a
// scrape then costs one pass over the merchants at most this often,
// whatever the number of scrapers.
const countsMaxAge = 5 * time.Second

// Collector exports, at scrape time, the merchants of each provider by
// state, the shared tier's health and the providers' budgets:
//
//	caddy_token_broker_merchants{provider,state}  merchants in each state (Counts)
//	caddy_token_broker_l2_up                      1 while the shared tier (Redis) is used, 0 while it is
//	                                              unavailable; absent without a shared tier
//	caddy_token_broker_budget_rate{provider}      token requests per second the budget spends now
//	                                              (its rate, or lower while the provider's headers say so)
//	caddy_token_broker_budget_remaining{provider} requests the budget's bucket held at its last answer
//	caddy_token_broker_budget_queue_length{provider}        callers waiting for their turn
//	caddy_token_broker_budget_exhausted_total{provider}     token requests the budget refused
//	caddy_token_broker_budget_queue_wait_seconds_total{provider}  time the served callers waited in all
//
// The budget series exist for providers with a rate_limit (the app's
// registry and the handlers' own), from the budget's State. No label
// names a merchant.
type Collector struct {
	sources func() Sources

	merchants, l2Up                            *prometheus.Desc
	budgetRate, budgetRemaining, budgetWaiting *prometheus.Desc
	budgetExhausted, budgetWait                *prometheus.Desc

	mu     sync.Mutex
	at     time.Time
	counts map[string]map[string]int
}

// NewCollector returns the collector of the state that sources give. The
// merchants' counts are computed again at most every countsMaxAge (5 s),
// on the clock of the sources' tracker (TrackerOptions.Now).
func NewCollector(sources func() Sources) *Collector {
	const ns, sub = "caddy", "token_broker"
	perProvider := func(name, help string) *prometheus.Desc {
		return prometheus.NewDesc(prometheus.BuildFQName(ns, sub, name), help, []string{"provider"}, nil)
	}
	return &Collector{sources: sources,
		budgetRate: perProvider("budget_rate",
			"Token requests per second the provider's budget (rate_limit) spends now: its rate (this sidecar's share without Redis), or lower while the provider's rate-limit headers say so (0 while none is left)."),
		budgetRemaining: perProvider("budget_remaining", "Token requests the provider's budget held at its last answer."),
		budgetWaiting:   perProvider("budget_queue_length", "Callers waiting for their turn at the provider's budget."),
		budgetExhausted: perProvider("budget_exhausted_total",
			"Token requests the provider's budget refused without calling the token API: callers answered 503 budget_exhausted, refreshes deferred."),
		budgetWait: perProvider("budget_queue_wait_seconds_total",
			"Time the callers served by the provider's budget waited for their turn, in all (divide by budget_used_total{priority=\"foreground\"} for the mean)."),
		merchants: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "merchants"),
			"Merchants by state (refused, unknown_organisation, needs_consent, backing_off, refreshing, fresh, idle): the registry's explicit merchants and the wildcard's active ones.",
			[]string{"provider", "state"}, nil),
		l2Up: prometheus.NewDesc(prometheus.BuildFQName(ns, sub, "l2_up"),
			"1 while the shared (Redis) tier is used, 0 while it is unavailable (its breaker is open: the broker mints alone).",
			nil, nil),
	}
}

// Describe implements prometheus.Collector.
func (c *Collector) Describe(ch chan<- *prometheus.Desc) {
	for _, d := range []*prometheus.Desc{c.merchants, c.l2Up, c.budgetRate, c.budgetRemaining, c.budgetWaiting, c.budgetExhausted, c.budgetWait} {
		ch <- d
	}
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.sources()
	c.collectBudgets(s, ch)
	if s.Tracker == nil || s.Registry == nil || s.Broker == nil {
		return
	}
	for provider, byState := range c.countsOf(s) {
		for state, n := range byState {
			ch <- prometheus.MustNewConstMetric(c.merchants, prometheus.GaugeValue, float64(n), provider, state)
		}
	}
	if configured, up := s.Tracker.Fleet(); configured {
		v := 0.0
		if up {
			v = 1
		}
		ch <- prometheus.MustNewConstMetric(c.l2Up, prometheus.GaugeValue, v)
	}
}

// collectBudgets exports the state of the budgets of s's registries, once
// per provider name (the app's registry first).
func (c *Collector) collectBudgets(s Sources, ch chan<- prometheus.Metric) {
	seen := map[string]bool{}
	for _, reg := range s.Registries() {
		for name, p := range reg.Providers {
			if p.Budget == nil || seen[name] {
				continue
			}
			seen[name] = true
			st := p.Budget.State()
			ch <- prometheus.MustNewConstMetric(c.budgetRate, prometheus.GaugeValue, st.Effective, name)
			ch <- prometheus.MustNewConstMetric(c.budgetRemaining, prometheus.GaugeValue, float64(st.Remaining), name)
			ch <- prometheus.MustNewConstMetric(c.budgetWaiting, prometheus.GaugeValue, float64(st.Waiting), name)
			ch <- prometheus.MustNewConstMetric(c.budgetExhausted, prometheus.CounterValue, float64(st.Exhausted), name)
			ch <- prometheus.MustNewConstMetric(c.budgetWait, prometheus.CounterValue, st.WaitTotal.Seconds(), name)
		}
	}
}

// countsOf returns the counts of s, computed again when older than
// countsMaxAge, after the tracker is reconciled with the broker
// (Reconcile).
func (c *Collector) countsOf(s Sources) map[string]map[string]int {
	now := s.Tracker.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.counts == nil || now.Sub(c.at) >= countsMaxAge || now.Before(c.at) {
		Reconcile(s)
		c.counts, c.at = Counts(s, now), now
	}
	return c.counts
}

// Interface guard.
var _ prometheus.Collector = (*Collector)(nil)
