package fleet

import (
	"fmt"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
)

// Metrics counts what the shared tier does. Its collectors live as long
// as the tier; Register adds them to a registry. No label carries a key,
// a merchant or a token:
//
//	caddy_token_broker_l2_lookups_total{result="hit|miss"}
//	caddy_token_broker_l2_errors_total{op}
//	caddy_token_broker_l2_lock_waits_total
//	caddy_token_broker_l2_adopted_total
//	caddy_token_broker_l2_invalidations_received_total
//	caddy_token_broker_l2_undecryptable_total
//	caddy_token_broker_l2_bypassed_total
//	caddy_token_broker_l2_rolled_back_total
//	caddy_token_broker_l2_timeouts_total{op}
//	caddy_token_broker_l2_breaker_openings_total
//
// op names a Redis call: get, set, del, lock, repair (an expiry given to a
// lock without one), unlock, pttl, publish, purge, starts (a consent
// link's start count), or a Run caller's name.
type Metrics struct {
	lookups       *prometheus.CounterVec
	errors        *prometheus.CounterVec
	lockWaits     prometheus.Counter
	adopted       prometheus.Counter
	invalidations prometheus.Counter
	undecryptable prometheus.Counter
	bypassed      prometheus.Counter
	rolledBack    prometheus.Counter
	timeouts      *prometheus.CounterVec
	openings      prometheus.Counter
}

// newMetrics creates the collectors.
func newMetrics() *Metrics {
	const ns, sub = "caddy", "token_broker"
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	return &Metrics{
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "l2_lookups_total",
			Help: "Reads of the shared (Redis) tier after a memory miss, by result: hit (a usable token) or miss."}, []string{"result"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "l2_errors_total",
			Help: "Redis calls that failed or timed out, by operation."}, []string{"op"}),
		lockWaits:     counter("l2_lock_waits_total", "Lookups that waited for another broker of the fleet to mint."),
		adopted:       counter("l2_adopted_total", "Lookups that used a token another broker minted instead of minting."),
		invalidations: counter("l2_invalidations_received_total", "Purges announced by other brokers of the fleet."),
		undecryptable: counter("l2_undecryptable_total", "Values in Redis that did not open with the configured keys (ignored)."),
		bypassed:      counter("l2_bypassed_total", "Lookups that minted without the shared tier because Redis was unavailable, or without the key's lock after waiting lock_ttl for it."),
		rolledBack:    counter("l2_rolled_back_total", "Values in Redis older than one this broker had seen for their key (an old value written back), ignored."),
		timeouts: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "l2_timeouts_total",
			Help: "Redis calls that ran out of their adaptive bound, by operation (also in l2_errors_total); they open the breaker only once they have lasted 5s (or twice timeout_max) without an answer."}, []string{"op"}),
		openings: counter("l2_breaker_openings_total", "Times the Redis breaker opened: lookups then mint without the shared tier for the cooldown."),
	}
}

// Register adds the collectors to registry; registering them again is
// not an error.
func (m *Metrics) Register(registry *prometheus.Registry) error {
	for _, c := range []prometheus.Collector{m.lookups, m.errors, m.lockWaits, m.adopted, m.invalidations, m.undecryptable, m.bypassed, m.rolledBack, m.timeouts, m.openings} {
		if err := telemetry.Register(registry, c); err != nil {
			return fmt.Errorf("registering redis metrics: %w", err)
		}
	}
	return nil
}
