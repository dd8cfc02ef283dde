package opstate

import (
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
)

// DefaultCountsMaxAge is how long a Collector reuses the merchants'
// counts: a scrape then costs one pass over the merchants at most this
// often, whatever the number of scrapers.
const DefaultCountsMaxAge = 5 * time.Second

// Collector exports, at scrape time, the merchants of each provider by
// state and the fleet tier's health:
//
//	caddy_token_broker_merchants{provider,state}  merchants in each state (Counts)
//	caddy_token_broker_l2_up                      1 while the fleet (Redis) tier is used, 0 while it is
//	                                              unavailable; absent without a fleet tier
//
// No label names a merchant.
type Collector struct {
	sources func() Sources
	now     func() time.Time
	maxAge  time.Duration

	merchants, l2Up *prometheus.Desc

	mu     sync.Mutex
	at     time.Time
	counts map[string]map[string]int
}

// NewCollector returns the collector of the state that sources give; now
// is the clock (time.Now when nil). The counts are computed again at
// most every maxAge (DefaultCountsMaxAge when 0).
func NewCollector(sources func() Sources, now func() time.Time, maxAge time.Duration) *Collector {
	if now == nil {
		now = time.Now
	}
	if maxAge <= 0 {
		maxAge = DefaultCountsMaxAge
	}
	const ns, sub = "caddy", "token_broker"
	return &Collector{sources: sources, now: now, maxAge: maxAge,
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
	ch <- c.merchants
	ch <- c.l2Up
}

// Collect implements prometheus.Collector.
func (c *Collector) Collect(ch chan<- prometheus.Metric) {
	s := c.sources()
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

// countsOf returns the counts of s, computed again when older than
// maxAge, after the tracker is reconciled with the broker (Reconcile).
func (c *Collector) countsOf(s Sources) map[string]map[string]int {
	now := c.now()
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.counts == nil || now.Sub(c.at) >= c.maxAge || now.Before(c.at) {
		Reconcile(s)
		c.counts, c.at = Counts(s, now), now
	}
	return c.counts
}

// Fleet reports whether a fleet tier is configured and whether it is up.
func (t *Tracker) Fleet() (configured, up bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.fleet.configured, t.fleet.up
}

// Interface guard.
var _ prometheus.Collector = (*Collector)(nil)
