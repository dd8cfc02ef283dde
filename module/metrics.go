package module

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/prometheus/client_golang/prometheus"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// MetricsConfig configures the broker's Prometheus metrics, shown on Caddy's
// /metrics (admin endpoint or `metrics` handler). The series are:
//
// Series | Labels | What
// -------|--------|-----
// `caddy_token_broker_token_requests_total` | provider, outcome | calls to a token API: outcome ok, or the error code a request would get (errcode.FetchCodes: client_gone, consent_required, token_api_down, token_timeout, token_rate_limited, token_bad_response, token_refused, token_unavailable)
// `caddy_token_broker_token_request_duration_seconds` | provider | histogram of token API call latency
// `caddy_token_broker_cache_lookups_total` | provider, result | tokens handed out: hit, refresh (a hit that started the background refresh), miss (waited on a fetch it started), shared (waited on a fetch another request started: the single-flight waiters), adopted (a fetch it started took the token from the shared tier)
// `caddy_token_broker_token_purges_total` | provider | cached tokens dropped after the upstream rejected them (401)
// `caddy_token_broker_token_purges_suppressed_total` | provider | upstream rejections (401) that did not purge the token: the key's purges by rejection were on hold, as the token that replaced a rejected one was rejected too (the 401 is not about the token)
// `caddy_token_broker_sources_backing_off` | provider | provider configurations whose token API is not called for any key: a 429 with Retry-After (until it has passed) or a bad credential (invalid_client, Nuapay 401; backoff doubling up to the failure memory's maximum)
// `caddy_token_broker_breaker_state` | provider | circuit breaker of the token API: 0 closed, 1 half-open, 2 open
// `caddy_token_broker_keys_backing_off` | provider | cache keys whose last fetch failed and which are held in failure memory (their fetches answer the remembered error without calling the token API until their backoff ends)
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

// tokenMetrics are the broker's collectors. They are kept in a
// caddy.UsagePool across config reloads, so counters keep counting; each
// config's metrics registry registers them once.
type tokenMetrics struct {
	merchantLabel bool
	tokenRequests *prometheus.CounterVec
	fetchDuration *prometheus.HistogramVec
	lookups       *prometheus.CounterVec
	purges        *prometheus.CounterVec
	purgesKept    *prometheus.CounterVec
	sourcesHeld   *prometheus.GaugeVec
	breaker       *prometheus.GaugeVec
	backingOff    *prometheus.GaugeVec

	// series are the per-merchant series that exist, with the merchant
	// label on: a wildcard merchant's follow the wildcard's active set, an
	// explicit merchant's are kept (bindings.Series).
	series *bindings.Series[*lookupCounters]
}

// removeMerchant deletes the per-merchant series of a merchant of a
// provider (bindings.Series' remove), by name, as DeletePartialMatch
// would walk every series at each eviction.
func (m *tokenMetrics) removeMerchant(provider, merchant string) {
	for r := range len(lookupCounters{}) {
		m.lookups.DeleteLabelValues(provider, broker.Result(r).String(), merchant)
	}
	m.tokenRequests.DeleteLabelValues(provider, outcomeOK, merchant)
	for _, c := range errcode.FetchCodes() {
		m.tokenRequests.DeleteLabelValues(provider, c.String(), merchant)
	}
	m.purges.DeleteLabelValues(provider, merchant)
	m.purgesKept.DeleteLabelValues(provider, merchant)
}

// metricsPool holds one tokenMetrics per label set.
var metricsPool = caddy.NewUsagePool()

func (m *tokenMetrics) Destruct() error { return nil }

func metricsPoolKey(merchantLabel bool) string {
	return fmt.Sprintf("metrics merchant_label=%t", merchantLabel)
}

// loadMetrics returns the shared collectors for the label set and registers
// them in registry. Release them with metricsPool.Delete(metricsPoolKey(...)).
func loadMetrics(registry *prometheus.Registry, merchantLabel bool) (*tokenMetrics, error) {
	val, _, err := metricsPool.LoadOrNew(metricsPoolKey(merchantLabel), func() (caddy.Destructor, error) {
		return newTokenMetrics(merchantLabel), nil
	})
	if err != nil {
		return nil, err
	}
	m := val.(*tokenMetrics)
	if registry != nil {
		if err := m.register(registry); err != nil {
			metricsPool.Delete(metricsPoolKey(merchantLabel))
			return nil, err
		}
	}
	return m, nil
}

func newTokenMetrics(merchantLabel bool) *tokenMetrics {
	const ns, sub = "caddy", "token_broker"
	perRequest := func(labels ...string) []string {
		if merchantLabel {
			labels = append(labels, "merchant")
		}
		return labels
	}
	m := &tokenMetrics{
		merchantLabel: merchantLabel,
		tokenRequests: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "token_requests_total",
			Help: "Calls to a provider's token API, by outcome (ok or the error code).",
		}, perRequest("provider", "outcome")),
		fetchDuration: prometheus.NewHistogramVec(prometheus.HistogramOpts{
			Namespace: ns, Subsystem: sub, Name: "token_request_duration_seconds",
			Help:    "Latency of calls to a provider's token API.",
			Buckets: []float64{.005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30},
		}, []string{"provider"}),
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "cache_lookups_total",
			Help: "Tokens handed out to requests, by how the cache served them: hit, refresh, miss, shared (single-flight waiters).",
		}, perRequest("provider", "result")),
		purges: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "token_purges_total",
			Help: "Cached tokens dropped because the upstream rejected them (401).",
		}, perRequest("provider")),
		purgesKept: prometheus.NewCounterVec(prometheus.CounterOpts{
			Namespace: ns, Subsystem: sub, Name: "token_purges_suppressed_total",
			Help: "Upstream rejections (401) that did not purge the token: the key's purges by rejection were on hold, as its replacement token was rejected too.",
		}, perRequest("provider")),
		sourcesHeld: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "sources_backing_off",
			Help: "Provider configurations whose token API is not called for any key: a 429 with Retry-After, or a bad credential (invalid_client, Nuapay 401).",
		}, []string{"provider"}),
		breaker: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "breaker_state",
			Help: "Circuit breaker of a provider's token API: 0 closed, 1 half-open, 2 open.",
		}, []string{"provider"}),
		backingOff: prometheus.NewGaugeVec(prometheus.GaugeOpts{
			Namespace: ns, Subsystem: sub, Name: "keys_backing_off",
			Help: "Cache keys held in failure memory after a failed fetch: their fetches answer the remembered error without calling the token API.",
		}, []string{"provider"}),
	}
	m.series = bindings.NewSeries(m.lookupCounters, m.removeMerchant)
	return m
}

// register adds the collectors to a config's registry; registering them
// twice in one registry is not an error.
func (m *tokenMetrics) register(registry *prometheus.Registry) error {
	for _, c := range []prometheus.Collector{m.tokenRequests, m.fetchDuration, m.lookups, m.purges, m.purgesKept, m.sourcesHeld, m.breaker, m.backingOff} {
		if err := registry.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) && are.ExistingCollector == c {
				continue
			}
			return fmt.Errorf("token_broker: registering metrics: %w", err)
		}
	}
	return nil
}

// Purged counts a cached token dropped because the upstream rejected it.
// merchant is ignored unless the merchant label is on.
func (m *tokenMetrics) Purged(provider, merchant string) {
	if m == nil {
		return
	}
	m.purges.WithLabelValues(m.labels(merchant, provider)...).Inc()
}

// PurgeKept counts an upstream rejection that did not purge the token
// (broker.RejectionKept). merchant is ignored unless the merchant label is
// on.
func (m *tokenMetrics) PurgeKept(provider, merchant string) {
	if m == nil {
		return
	}
	m.purgesKept.WithLabelValues(m.labels(merchant, provider)...).Inc()
}

// SetBreakerState sets the breaker gauge of a provider (0 closed,
// 1 half-open, 2 open: the values of broker.BreakerState).
func (m *tokenMetrics) SetBreakerState(provider string, state int) {
	if m == nil {
		return
	}
	m.breaker.WithLabelValues(provider).Set(float64(state))
}

// fetched counts one token API call.
func (m *tokenMetrics) fetched(provider, merchant, outcome string, elapsed time.Duration) {
	if m == nil {
		return
	}
	m.tokenRequests.WithLabelValues(m.labels(merchant, provider, outcome)...).Inc()
	m.fetchDuration.WithLabelValues(provider).Observe(elapsed.Seconds())
}

// labels appends the merchant to the label values when the label is on:
// a copy, as a series it creates keeps its label values, and an explicit
// merchant's id points into its registry's file, which must not stay
// alive after its config is discarded. Called when a binding is made or
// a token fetched or purged, not per request.
func (m *tokenMetrics) labels(merchant string, values ...string) []string {
	if m.merchantLabel {
		values = append(values, strings.Clone(merchant))
	}
	return values
}

// lookupCounters are a binding's cache_lookups_total counters, one per
// broker.Result, resolved at provision time so that counting a lookup is
// one atomic add. Bindings of one provider share them unless the merchant
// label is on.
type lookupCounters [broker.Adopted + 1]prometheus.Counter

func (m *tokenMetrics) lookupCounters(provider, merchant string) *lookupCounters {
	var c lookupCounters
	for r := range c {
		c[r] = m.lookups.WithLabelValues(m.labels(merchant, provider, broker.Result(r).String())...)
	}
	return &c
}

// observer is the broker.Observer of a handler's bindings: it counts
// lookups on its pre-resolved counters and hands everything else to the
// handler (logs, fetch metrics, breaker and backoff gauges).
type observer struct {
	h       *Handler
	lookups *lookupCounters // nil: lookups are not counted
}

// Lookup counts a token handed out. It allocates nothing.
func (o *observer) Lookup(_ *broker.Binding, r broker.Result) {
	if o.lookups != nil && int(r) < len(o.lookups) {
		o.lookups[r].Inc()
	}
}

// Fetched logs and counts a token API call.
func (o *observer) Fetched(ctx context.Context, b *broker.Binding, tok broker.Token, elapsed time.Duration, background bool, err error) {
	o.h.fetched(ctx, b, tok, elapsed, background, err)
}

// BackingOff counts the keys held in failure memory.
func (o *observer) BackingOff(b *broker.Binding, on bool) { o.h.backingOff(b, on) }

// SourceBackingOff counts the provider configurations held.
func (o *observer) SourceBackingOff(sourceID string, on bool) { o.h.sourceBackingOff(sourceID, on) }

// BreakerChanged sets the breaker gauge of the source's provider.
func (o *observer) BreakerChanged(sourceID string, state broker.BreakerState) {
	o.h.breakerChanged(sourceID, state)
}

// handlerMetrics is what a handler needs to count: the shared collectors
// and the provider name of each source.
type handlerMetrics struct {
	*tokenMetrics
	providers map[string]string          // SourceID -> provider name
	shared    map[string]*lookupCounters // provider name -> counters, without the merchant label

	mu        sync.Mutex           // guards observers
	observers map[string]*observer // provider name -> the observer its bindings share, without the merchant label
}

// instrument gives every binding of the handler an observer with its
// counters resolved. Called at the end of Provision.
func (h *Handler) instrument(m *tokenMetrics) {
	h.metrics = &handlerMetrics{tokenMetrics: m, providers: make(map[string]string), shared: map[string]*lookupCounters{},
		observers: map[string]*observer{}}
	if m != nil && h.registry != nil {
		for name, p := range h.registry.Providers {
			h.metrics.providers[p.ID] = name
			if !m.merchantLabel {
				h.metrics.shared[name] = m.lookupCounters(name, "")
			}
			h.exportZero(name, p.ID)
		}
	}
	if h.bindings != nil {
		h.bindings.Each(func(id string, b *binding) {
			if m != nil {
				if _, known := h.metrics.providers[b.SourceID]; !known {
					h.exportZero(b.Provider.Name, b.SourceID)
				}
				h.metrics.providers[b.SourceID] = b.Provider.Name
			}
			b.Observer = h.observerFor(b, false)
		})
	}
}

// exportZero exports the series of a provider that change rarely from
// provisioning on, so that dashboards and alerts see 0 rather than nothing.
func (h *Handler) exportZero(provider, sourceID string) {
	m := h.metrics.tokenMetrics
	if !m.merchantLabel {
		m.purges.WithLabelValues(m.labels("", provider)...)
		m.purgesKept.WithLabelValues(m.labels("", provider)...)
	}
	m.backingOff.WithLabelValues(provider)
	m.sourcesHeld.WithLabelValues(provider)
	state := broker.BreakerClosed
	if h.broker != nil {
		state = h.broker.BreakerState(sourceID)
	}
	m.breaker.WithLabelValues(provider).Set(float64(state))
}

// backingOff counts the keys held in failure memory, by provider.
func (h *Handler) backingOff(b *broker.Binding, on bool) {
	if h.metrics == nil || h.metrics.tokenMetrics == nil {
		return
	}
	g := h.metrics.backingOff.WithLabelValues(h.providerOf(b))
	if on {
		g.Inc()
	} else {
		g.Dec()
	}
}

// sourceBackingOff counts the provider configurations held after a 429
// with Retry-After or a bad credential.
func (h *Handler) sourceBackingOff(sourceID string, on bool) {
	if h.metrics == nil || h.metrics.tokenMetrics == nil {
		return
	}
	provider, ok := h.metrics.providers[sourceID]
	if !ok {
		provider, _, _ = strings.Cut(sourceID, "#")
	}
	g := h.metrics.sourcesHeld.WithLabelValues(provider)
	if on {
		g.Inc()
	} else {
		g.Dec()
	}
}

// observerFor returns the observer of a binding: the handler's, with the
// binding's lookup counters. Without the merchant label, the bindings of
// one provider share one observer (no heap object per binding). With it,
// a new wildcard binding (hold) is counted among its merchant's holders
// (bindings.Series.Hold), which the table releases, and an explicit
// binding's series are kept for good (bindings.Series.Keep).
func (h *Handler) observerFor(b *binding, hold bool) broker.Observer {
	m := h.metrics
	if m == nil || m.tokenMetrics == nil {
		return &observer{h: h}
	}
	if m.merchantLabel {
		switch {
		case hold:
			return &observer{h: h, lookups: m.series.Hold(b.Provider.Name, b.Merchant)}
		case !b.Wild():
			return &observer{h: h, lookups: m.series.Keep(b.Provider.Name, b.Merchant)}
		}
		return &observer{h: h, lookups: m.lookupCounters(b.Provider.Name, b.Merchant)}
	}
	m.mu.Lock()
	defer m.mu.Unlock()
	if o := m.observers[b.Provider.Name]; o != nil {
		return o
	}
	c := m.shared[b.Provider.Name]
	if c == nil {
		// A provider added by hand (tests): counters made once here,
		// before the handler serves.
		c = m.lookupCounters(b.Provider.Name, "")
		m.shared[b.Provider.Name] = c
	}
	o := &observer{h: h, lookups: c}
	m.observers[b.Provider.Name] = o
	return o
}

// breakerChanged sets the breaker gauge of the source's provider.
func (h *Handler) breakerChanged(sourceID string, state broker.BreakerState) {
	if h.metrics == nil {
		return
	}
	provider, ok := h.metrics.providers[sourceID]
	if !ok {
		provider, _, _ = strings.Cut(sourceID, "#")
	}
	h.metrics.SetBreakerState(provider, int(state))
}

// fetchOutcome is the outcome label of a token API call.
func fetchOutcome(err error) string {
	if err == nil {
		return outcomeOK
	}
	return errcode.Classify(err).String()
}

// observeFetch counts a token API call; fetched calls it.
func (h *Handler) observeFetch(_ context.Context, b *broker.Binding, provider string, elapsed time.Duration, err error) string {
	outcome := fetchOutcome(err)
	if h.metrics != nil {
		h.metrics.fetched(provider, b.Merchant, outcome, elapsed)
	}
	return outcome
}

// providerOf returns the provider name of a binding of this handler.
func (h *Handler) providerOf(b *broker.Binding) string {
	if h.metrics != nil {
		if p, ok := h.metrics.providers[b.SourceID]; ok {
			return p
		}
	}
	if h.bindings != nil {
		if hb := h.bindings.Peek(b.Merchant); hb != nil {
			return hb.Provider.Name
		}
	}
	p, _, _ := strings.Cut(b.SourceID, "#")
	return p
}

// Interface guards.
var (
	_ broker.Observer        = (*observer)(nil)
	_ broker.BreakerObserver = (*observer)(nil)
	_ broker.BackoffObserver = (*observer)(nil)
	_ broker.SourceObserver  = (*observer)(nil)
	_ caddy.Destructor       = (*tokenMetrics)(nil)
)
