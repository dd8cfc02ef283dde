// Package telemetry holds what the broker counts, logs and traces: the
// Prometheus collectors kept across config reloads (Metrics, and
// ConsentSteps, the consent steps' counter; Register adds one to a
// config's registry), what one handler counts and logs (Recorder: the
// broker.Observer of each of its bindings, the upstream's rejections of
// its tokens) and the token span of a traced request (Token).
package telemetry

import (
	"errors"
	"fmt"
	"strings"

	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// OutcomeOK is the outcome of a successful token API call (metrics, logs
// and spans); a failed call's outcome is its error code.
const OutcomeOK = "ok"

// OutcomeRetryNow is the outcome of a token API call the provider asked
// to be sent again at once (a *broker.RetryNowError: a DPoP nonce
// challenge that brought a new nonce), which is no failure (metrics and
// logs).
const OutcomeRetryNow = "retry_now"

// Metrics are the broker's collectors. They are meant to be shared across
// config reloads, so counters keep counting; each config's metrics
// registry registers them once (Register).
type Metrics struct {
	merchantLabel bool
	// TokenRequests counts calls to a token API, by provider and outcome.
	TokenRequests *prometheus.CounterVec
	// Refreshes counts the token API calls of background refreshes
	// (refresh-ahead), by provider and outcome: a subset of TokenRequests.
	Refreshes *prometheus.CounterVec
	// FetchDuration is the histogram of token API call latency, by provider.
	FetchDuration *prometheus.HistogramVec
	// Lookups counts tokens handed out, by provider and broker.Result.
	Lookups *prometheus.CounterVec
	// Purges counts cached tokens dropped after an upstream 401.
	Purges *prometheus.CounterVec
	// PurgesKept counts upstream 401s that did not purge the token.
	PurgesKept *prometheus.CounterVec
	// SourcesBackingOff is the number of provider configurations backing off.
	SourcesBackingOff *prometheus.GaugeVec
	// Breaker is the breaker state of a provider's token API.
	Breaker *prometheus.GaugeVec
	// BackingOff is the number of cache keys in failure memory.
	BackingOff *prometheus.GaugeVec
	// NonceChallenges counts DPoP use_dpop_nonce challenges, by provider
	// and server (ServerToken, ServerResource).
	NonceChallenges *prometheus.CounterVec
	// BudgetUsed counts the token API calls that took a request from
	// their provider's budget (rate_limit), by provider and priority
	// (budget.Priority: foreground, background).
	BudgetUsed *prometheus.CounterVec
	// RefreshesPlanned counts refresh-ahead plans, by provider and when:
	// "ahead" (a token's refresh was planned in its refresh window),
	// "behind" (a planned refresh could not get budget before the token's
	// end, once per token).
	RefreshesPlanned *prometheus.CounterVec

	// series are the per-merchant series that exist, with the merchant
	// label on: a wildcard merchant's follow the wildcard's active set, an
	// explicit merchant's are kept (bindings.Series).
	series *bindings.Series[*LookupCounters]
}

// removeMerchant deletes the per-merchant series of a merchant of a
// provider (bindings.Series' remove), by name, as DeletePartialMatch
// would walk every series at each eviction.
func (m *Metrics) removeMerchant(provider, merchant string) {
	for r := range len(LookupCounters{}) {
		m.Lookups.DeleteLabelValues(provider, broker.Result(r).String(), merchant)
	}
	m.TokenRequests.DeleteLabelValues(provider, OutcomeOK, merchant)
	m.TokenRequests.DeleteLabelValues(provider, OutcomeRetryNow, merchant)
	for _, c := range errcode.FetchCodes() {
		m.TokenRequests.DeleteLabelValues(provider, c.String(), merchant)
	}
	m.Purges.DeleteLabelValues(provider, merchant)
	m.PurgesKept.DeleteLabelValues(provider, merchant)
}

// Destruct implements caddy.Destructor: the collectors hold nothing to
// release.
func (m *Metrics) Destruct() error { return nil }

// NewMetrics returns the collectors, with a merchant label on the
// per-request series when merchantLabel is true.
func NewMetrics(merchantLabel bool) *Metrics {
	const ns, sub = "caddy", "token_broker"
	perRequest := func(labels ...string) []string {
		if merchantLabel {
			labels = append(labels, "merchant")
		}
		return labels
	}
	m := &Metrics{
		merchantLabel: merchantLabel,
		TokenRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "token_requests_total",
			Help: "Calls to a provider's token API, by outcome (ok, retry_now or the error code).",
		}, perRequest("provider", "outcome")),
		Refreshes: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "refreshes_total",
			Help: "Calls to a provider's token API by a background refresh (refresh-ahead), by outcome (ok, retry_now or the error code); also counted in token_requests_total.",
		}, []string{"provider", "outcome"}),
		FetchDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "token_request_duration_seconds",
			Help:    "Latency of calls to a provider's token API.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"provider"}),
		Lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "cache_lookups_total",
			Help: "Tokens handed out to requests, by how the cache served them: hit, refresh, miss, shared (single-flight waiters).",
		}, perRequest("provider", "result")),
		Purges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "token_purges_total",
			Help: "Cached tokens dropped because the upstream rejected them (401).",
		}, perRequest("provider")),
		PurgesKept: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "token_purges_suppressed_total",
			Help: "Upstream rejections (401) that did not purge the token: the key's purges by rejection were on hold, as its replacement token was rejected too.",
		}, perRequest("provider")),
		SourcesBackingOff: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "sources_backing_off",
			Help: "Provider configurations whose token API is not called for any key: a 429 (with or without Retry-After), or a bad credential (invalid_client, Nuapay 401).",
		}, []string{"provider"}),
		Breaker: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "breaker_state",
			Help: "Circuit breaker of a provider's token API: 0 closed, 1 half-open, 2 open.",
		}, []string{"provider"}),
		BackingOff: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "keys_backing_off",
			Help: "Cache keys in failure memory after a failed fetch: their fetches answer the remembered error without calling the token API.",
		}, []string{"provider"}),
		NonceChallenges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "dpop_nonce_challenges_total",
			Help: "DPoP nonce challenges (use_dpop_nonce), by the server that sent them: token (the token or PAR endpoint: the challenges that brought a new nonce) or resource (an upstream: the challenges answered with a retry).",
		}, []string{"provider", "server"}),
		BudgetUsed: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "budget_used_total",
			Help: "Token API calls that took a request from their provider's budget (rate_limit), by priority: foreground (a caller waits), background (refresh-ahead).",
		}, []string{"provider", "priority"}),
		RefreshesPlanned: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "refreshes_planned_total",
			Help: "Refresh-ahead plans: when=ahead, the refresh of a token minted by this broker planned in its refresh window (adopted tokens are not counted); when=behind, a planned refresh that could not get budget before the token's end (its key goes cold; once per token).",
		}, []string{"provider", "when"}),
	}
	m.series = bindings.NewSeries(m.lookupCounters, m.removeMerchant)
	return m
}

// Register adds the collectors to a config's registry; registering them
// twice in one registry is not an error.
func (m *Metrics) Register(registry *prometheus.Registry) error {
	for _, c := range []prometheus.Collector{m.TokenRequests, m.Refreshes, m.FetchDuration, m.Lookups, m.Purges, m.PurgesKept, m.SourcesBackingOff, m.Breaker, m.BackingOff, m.NonceChallenges,
		m.BudgetUsed, m.RefreshesPlanned} {
		if err := Register(registry, c); err != nil {
			return fmt.Errorf("token_broker: registering metrics: %w", err)
		}
	}
	return nil
}

// Register adds c to registry; c registered there already (a config
// reloaded with collectors kept across reloads) is no error.
func Register(registry *prometheus.Registry, c prometheus.Collector) error {
	err := registry.Register(c)
	var are prometheus.AlreadyRegisteredError
	if errors.As(err, &are) && are.ExistingCollector == c {
		return nil
	}
	return err
}

// ConsentSteps counts the merchants' consent steps:
// caddy_token_broker_consent_steps_total{provider, step, outcome}, step
// link, start or callback, outcome ok or a refusal reason. Like Metrics,
// it is meant to be shared across config reloads and registered in each
// config's metrics registry (Register).
type ConsentSteps struct {
	// Steps is the counter.
	Steps *prometheus.CounterVec
}

// NewConsentSteps returns the consent steps' counter.
func NewConsentSteps() *ConsentSteps {
	return &ConsentSteps{Steps: prometheus.NewCounterVec(prometheus.CounterOpts{
		Namespace: "caddy", Subsystem: "token_broker", Name: "consent_steps_total",
		Help: "Merchant consent steps (link, start, callback) by outcome: ok or the refusal reason.",
	}, []string{"provider", "step", "outcome"})}
}

// Register registers the counter in registry, once.
func (c *ConsentSteps) Register(registry *prometheus.Registry) error {
	if err := Register(registry, c.Steps); err != nil {
		return fmt.Errorf("token_broker_consent: registering metrics: %w", err)
	}
	return nil
}

// Destruct implements caddy.Destructor: the counter holds nothing to
// release.
func (c *ConsentSteps) Destruct() error { return nil }

// Purged counts a cached token dropped because the upstream rejected it.
// merchant is ignored unless the merchant label is on.
func (m *Metrics) Purged(provider, merchant string) {
	if m == nil {
		return
	}
	m.Purges.WithLabelValues(m.labels(merchant, provider)...).Inc()
}

// PurgeKept counts an upstream rejection that did not purge the token
// (broker.RejectionKept). merchant is ignored unless the merchant label is
// on.
func (m *Metrics) PurgeKept(provider, merchant string) {
	if m == nil {
		return
	}
	m.PurgesKept.WithLabelValues(m.labels(merchant, provider)...).Inc()
}

// The servers of a DPoP nonce challenge (NonceChallenged).
const (
	// ServerToken is a provider's token or PAR endpoint.
	ServerToken = "token"
	// ServerResource is an upstream behind a token_broker route.
	ServerResource = "resource"
)

// NonceChallenged counts a DPoP nonce challenge of a provider's server
// (ServerToken or ServerResource).
func (m *Metrics) NonceChallenged(provider, server string) {
	if m == nil {
		return
	}
	m.NonceChallenges.WithLabelValues(provider, server).Inc()
}

// Refresh plans (the when label of refreshes_planned_total).
const (
	PlannedAhead  = "ahead"
	PlannedBehind = "behind"
)

// planned counts a refresh plan of a provider's token.
func (m *Metrics) planned(provider, when string) {
	if m == nil {
		return
	}
	m.RefreshesPlanned.WithLabelValues(provider, when).Inc()
}

// labels appends the merchant to the label values when the label is on:
// a copy, as a series it creates keeps its label values, and an explicit
// merchant's id points into its registry's file, which must not stay
// alive after its config is discarded. Called when a binding is made or
// a token fetched or purged, not per request.
func (m *Metrics) labels(merchant string, values ...string) []string {
	if m.merchantLabel {
		values = append(values, strings.Clone(merchant))
	}
	return values
}

// LookupCounters are a binding's cache_lookups_total counters, one per
// broker.Result, resolved at provision time so that counting a lookup is
// one atomic add. Bindings of one provider share them unless the merchant
// label is on.
type LookupCounters [broker.Adopted + 1]prometheus.Counter

func (m *Metrics) lookupCounters(provider, merchant string) *LookupCounters {
	var c LookupCounters
	for r := range c {
		c[r] = m.Lookups.WithLabelValues(m.labels(merchant, provider, broker.Result(r).String())...)
	}
	return &c
}

// fetchOutcome is the outcome label of a token API call.
func fetchOutcome(err error) string {
	switch {
	case err == nil:
		return OutcomeOK
	case broker.IsRetryNow(err):
		return OutcomeRetryNow
	}
	return errcode.Classify(err).String()
}
