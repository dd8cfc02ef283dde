package module

import (
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
)

// MetricsConfig configures the broker's Prometheus metrics, shown on Caddy's
// /metrics (admin endpoint or `metrics` handler). The series are:
//
// Series | Labels | What
// -------|--------|-----
// `caddy_token_broker_token_requests_total` | provider, outcome | calls to a token API: outcome ok, retry_now (the provider asked for the call to be sent again at once: a DPoP nonce challenge that brought a new nonce, no failure), or the error code a request would get (errcode.FetchCodes: client_gone, consent_required, token_api_down, token_timeout, token_rate_limited, token_bad_response, token_refused, token_unavailable)
// `caddy_token_broker_token_request_duration_seconds` | provider | histogram of token API call latency
// `caddy_token_broker_cache_lookups_total` | provider, result | tokens handed out: hit, refresh (a hit that started the background refresh), miss (waited on a fetch it started), shared (waited on a fetch another request started: the single-flight waiters), adopted (a fetch it started took the token from the shared tier)
// `caddy_token_broker_token_purges_total` | provider | cached tokens dropped after the upstream rejected them (401)
// `caddy_token_broker_token_purges_suppressed_total` | provider | upstream rejections (401) that did not purge the token: the key's purges by rejection were paused, as the token that replaced a rejected one was rejected too (the 401 is not about the token)
// `caddy_token_broker_sources_backing_off` | provider | provider configurations whose token API is not called for any key: a 429 with Retry-After (until it has passed) or a bad credential (invalid_client, Nuapay 401; backoff doubling up to the failure memory's maximum)
// `caddy_token_broker_breaker_state` | provider | circuit breaker of the token API: 0 closed, 1 half-open, 2 open
// `caddy_token_broker_keys_backing_off` | provider | cache keys whose last fetch failed and which are in failure memory (their fetches answer the remembered error without calling the token API until their backoff ends)
// `caddy_token_broker_merchants` | provider, state | merchants by state (refused, unknown_organisation, needs_consent, backing_off, refreshing, fresh, idle: opstate.States), the registry's explicit merchants and the wildcard's active ones, computed at scrape time (at most every 5s) from the state GET /token_broker/state reports
// `caddy_token_broker_l2_up` | | with redis only: 1 while the shared tier is used, 0 while its breaker keeps Redis out
// `caddy_token_broker_dpop_nonce_challenges_total` | provider, server | DPoP nonce challenges (use_dpop_nonce): server token (the provider's token or PAR endpoint: the challenges that brought a new nonce) or resource (an upstream behind a token_broker route: the challenges answered with a retry)
// `caddy_token_broker_budget_used_total` | provider, priority | token API calls that took a request from the provider's budget (rate_limit): priority foreground (a caller waits) or background (refresh-ahead)
// `caddy_token_broker_refreshes_planned_total` | provider, when | refresh plans: ahead (the refresh of a token this broker minted, planned in its window), behind (a planned refresh that cannot get budget before the token's end)
// `caddy_token_broker_budget_rate`, `..._budget_remaining`, `..._budget_queue_length` | provider | the budget's rate in force, the requests its bucket held at its last answer, the callers waiting (opstate.Collector, at scrape time)
// `caddy_token_broker_budget_exhausted_total`, `..._budget_queue_wait_seconds_total` | provider | token requests the budget refused; the time its served callers waited in all
//
// token_purges_total, token_purges_suppressed_total, breaker_state,
// keys_backing_off and sources_backing_off are exported (as 0)
// for every provider from provisioning, not only after a first change.
// With MerchantLabel, token_requests_total, cache_lookups_total,
// token_purges_total and token_purges_suppressed_total also carry a
// merchant label; a wildcard merchant's series are deleted when its last
// binding is evicted or discarded with its config, an explicit merchant's
// kept (bindings.Series).
type MetricsConfig struct {
	// MerchantLabel adds a merchant label to the per-request series. Off by
	// default: with many merchants it multiplies the number of series.
	MerchantLabel bool `json:"merchant_label,omitempty"`
}

// metricsPool holds one telemetry.Metrics per label set, and the consent
// steps' counter, kept across config reloads so that counters keep
// counting (loadCollectors).
var metricsPool = caddy.NewUsagePool()

// collectors are what metricsPool holds: collectors registered in each
// config's metrics registry.
type collectors interface {
	caddy.Destructor
	Register(*prometheus.Registry) error
}

// loadCollectors returns the collectors of key in metricsPool, made by
// newCollectors when none are, registered in registry (nil: none). A
// failed registration releases them.
func loadCollectors[C collectors](registry *prometheus.Registry, key string, newCollectors func() C) (C, error) {
	var none C
	val, _, err := metricsPool.LoadOrNew(key, func() (caddy.Destructor, error) {
		return newCollectors(), nil
	})
	if err != nil {
		return none, err
	}
	c := val.(C)
	if registry != nil {
		if err := c.Register(registry); err != nil {
			metricsPool.Delete(key)
			return none, err
		}
	}
	return c, nil
}

// instrument gives the handler its telemetry.Recorder and every binding
// of the handler an observer with its counters resolved. Called at the
// end of Provision.
func (h *Handler) instrument(m *telemetry.Metrics) {
	h.metrics = telemetry.ForRegistry(m, tapOf(h.tracker), h.logger, h.bindings, h.registry, h.broker)
	h.retry = outbound.Retry{Incremental: caddyhttp.IsIncremental, Isolate: isolateVars,
		Tokens:          (*hooks)(h),
		NonceChallenged: h.metrics.NonceChallenged, NonceRefused: h.metrics.NonceRefused}
}

// instrument gives the app the telemetry.Recorder of the bindings no
// handler made (a check of a merchant no route has served), on the
// app's metrics, tracker and logger.
func (a *App) instrument() {
	a.recorder = telemetry.ForRegistry(a.metrics, tapOf(a.tracker), a.logger, nil, a.registry, a.broker)
}

// tapOf returns tracker as the recorders' tap; nil (none) without one.
func tapOf(tracker *opstate.Tracker) telemetry.Tap {
	if tracker == nil {
		return nil
	}
	return tracker
}

// registerStateCollector adds the collector of the app's operator's view
// (opstate.Collector: the merchants by state, the shared tier's health) to
// the config's metrics registry.
func (a *App) registerStateCollector(registry *prometheus.Registry) error {
	if registry == nil {
		return nil
	}
	if err := registry.Register(opstate.NewCollector(a.stateSources)); err != nil {
		return fmt.Errorf("token_broker: registering the merchants and l2_up gauges: %w", err)
	}
	return nil
}
