package telemetry

import (
	"context"
	"sync"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/lograte"
)

// Holder says which merchants a binding table holds: bindings.Table
// implements it.
type Holder interface {
	// HoldsMerchant reports whether the table holds a binding of the
	// merchant, and whether that binding is a wildcard merchant's (false
	// when it holds none).
	HoldsMerchant(merchant string) (held, wild bool)
}

// Tap is told what a recorder's observers see, with the provider's name
// resolved: the operator's view (opstate.Tracker) implements it. Its
// methods are called on the token fetch path, not per request, and must
// be quick and safe for concurrent use.
type Tap interface {
	// Fetched is told of a call to a provider's token API for a binding
	// (its merchant and cache key) and how it ended (nil: a token; a
	// *broker.RetryNowError: no failure, the call is sent again at once).
	// table is the binding table that made b (nil: none, an operator's
	// check): whether it still holds a binding of b's merchant (the call
	// may end after b was evicted), and whether a wildcard merchant's.
	Fetched(provider string, b *broker.Binding, table Holder, err error)
	// SourceChanged is told when a source's backoff starts or ends
	// (Observer.SourceBackingOff) and when its breaker changes state
	// (Observer.BreakerChanged): br, the broker of the source (nil when
	// the recorder has none), holds its state now.
	SourceChanged(br *broker.Broker, provider, sourceID string)
	// RefreshBehind is told when a binding's planned refresh cannot get
	// budget before its token's end (Observer.RefreshBehind), once per token.
	RefreshBehind(provider string, b *broker.Binding, expiry time.Time)
}

// Recorder is what one handler counts and logs: the shared collectors
// and the observers of its bindings. A nil Recorder records nothing.
type Recorder struct {
	metrics *Metrics       // nil: nothing is counted
	tap     Tap            // nil: nobody else is told
	logger  *zap.Logger    // the token fetch and rejection logs
	broker  *broker.Broker // the broker of the sources; nil: unknown
	table   Holder         // the table of the bindings observed; nil: none

	mu        sync.Mutex           // guards observers
	observers map[string]*Observer // provider name -> the observer its bindings share, without the merchant label

	// nonceRefusals limits NonceRefused's lines: one per provider per
	// NonceRefusedLogInterval (a resource server can answer every request
	// with a nonce the key refuses).
	nonceRefusals *lograte.Limiter[string]
}

// NonceRefusedLogInterval is how often NonceRefused logs for one provider;
// the next line says how many were left out.
const NonceRefusedLogInterval = time.Minute

// ForRegistry returns the recorder of a handler whose providers are
// reg's (nil: none known) and whose bindings are in table (nil: none
// yet), and gives every binding of table its observer. With m, the
// rarely changing series of the providers of both are exported from now
// on, with br's breaker states (br nil: closed). tap (nil: none) is told
// of fetches, source backoffs and breaker changes too.
func ForRegistry(m *Metrics, tap Tap, logger *zap.Logger, table *bindings.Table, reg *config.Registry, br *broker.Broker) *Recorder {
	r := &Recorder{metrics: m, tap: tap, logger: logger, broker: br, observers: map[string]*Observer{},
		nonceRefusals: &lograte.Limiter[string]{Every: NonceRefusedLogInterval, Now: time.Now}}
	exported := map[string]bool{} // source IDs
	export := func(provider, sourceID string) {
		if m != nil && !exported[sourceID] {
			exported[sourceID] = true
			r.exportZero(provider, sourceID)
		}
	}
	if reg != nil {
		for name, p := range reg.Providers {
			export(name, p.ID)
		}
	}
	if table != nil {
		r.table = table
		table.Each(func(_ string, b *bindings.Binding) {
			export(b.Provider.Name, b.SourceID)
			b.Observer = r.observerFor(b, false)
		})
	}
	return r
}

// Observer returns the observer of a binding that no handler made (an
// operator's check of a merchant no route has served): its fetches are
// counted, logged and told to the tap, and its backoffs and breaker
// changes recorded, as a handler binding's; its lookups are not counted.
// A nil Recorder's is nil.
func (r *Recorder) Observer() broker.Observer {
	if r == nil {
		return nil
	}
	return &Observer{r: r}
}

// exportZero exports the series of a source's provider that can stay
// unchanged for long (lookups and purges without the merchant label,
// backoffs, breaker, refreshes), so that dashboards and alerts see 0
// rather than nothing.
func (r *Recorder) exportZero(provider, sourceID string) {
	m := r.metrics
	if !m.merchantLabel {
		r.sharedObserver(provider)
		m.Purges.WithLabelValues(m.labels("", provider)...)
		m.PurgesKept.WithLabelValues(m.labels("", provider)...)
	}
	m.BackingOff.WithLabelValues(provider)
	m.Refreshes.WithLabelValues(provider, OutcomeOK)
	m.SourcesBackingOff.WithLabelValues(provider)
	state := broker.BreakerClosed
	if r.broker != nil {
		state = r.broker.SourceHealth(sourceID).Breaker
	}
	m.Breaker.WithLabelValues(provider).Set(float64(state))
}

// Made is bindings.Hooks.Made: it gives a new binding its observer. A
// wildcard binding (track) uses its merchant's series, and is counted
// among their users, when the merchant label is on; the result says
// whether it is.
func (r *Recorder) Made(b *bindings.Binding, track bool) bool {
	track = track && r != nil && r.metrics != nil && r.metrics.merchantLabel
	b.Observer = r.observerFor(b, track)
	return track
}

// Released is bindings.Hooks.Released: the binding stops using its
// merchant's series.
func (r *Recorder) Released(b *bindings.Binding) {
	r.metrics.series.Release(b.Provider.Name, b.Merchant)
}

// observerFor returns the observer of a binding, with the binding's
// lookup counters; a nil Recorder's is nil. Without the merchant label,
// the bindings of one provider share one observer (no heap object per
// binding). With it, a new wildcard binding (track) is counted among its
// merchant's users (bindings.Series.Use), which the table releases, and
// an explicit binding's series are kept for good (bindings.Series.Pin).
func (r *Recorder) observerFor(b *bindings.Binding, track bool) broker.Observer {
	if r == nil {
		return nil
	}
	if r.metrics == nil {
		return &Observer{r: r}
	}
	m := r.metrics
	switch {
	case !m.merchantLabel:
		return r.sharedObserver(b.Provider.Name)
	case track:
		return &Observer{r: r, lookups: m.series.Use(b.Provider.Name, b.Merchant)}
	case !b.Wild():
		return &Observer{r: r, lookups: m.series.Pin(b.Provider.Name, b.Merchant)}
	}
	return &Observer{r: r, lookups: m.lookupCounters(b.Provider.Name, b.Merchant)}
}

// sharedObserver returns the observer that the bindings of a provider
// share without the merchant label, made with its lookup counters on
// first use.
func (r *Recorder) sharedObserver(provider string) *Observer {
	r.mu.Lock()
	defer r.mu.Unlock()
	o := r.observers[provider]
	if o == nil {
		o = &Observer{r: r, lookups: r.metrics.lookupCounters(provider, "")}
		r.observers[provider] = o
	}
	return o
}

// Rejected counts and logs the broker's answer to an upstream's
// rejection of a token (broker.Broker.Reject).
func (r *Recorder) Rejected(b *broker.Binding, rejected broker.Token, outcome broker.Rejection) {
	if r == nil {
		return
	}
	switch outcome {
	case broker.RejectionPurged:
		r.metrics.Purged(config.ProviderName(b.SourceID), b.Merchant)
	case broker.RejectionKept:
		r.metrics.PurgeKept(config.ProviderName(b.SourceID), b.Merchant)
	}
	r.sweepEvicted(b)
	r.logger.Info("upstream rejected the token", zap.String("merchant", b.Merchant),
		zap.String("fingerprint", rejected.Fingerprint()), zap.Stringer("outcome", outcome))
}

// Kept logs a 401 to a request whose token header a later handler
// changed or removed: it says nothing about the token, which is kept.
func (r *Recorder) Kept(b *broker.Binding, rejected broker.Token) {
	if r == nil {
		return
	}
	r.logger.Warn("upstream answered 401 to a request whose token header a later handler changed or removed; the token is kept",
		zap.String("merchant", b.Merchant), zap.String("fingerprint", rejected.Fingerprint()))
}

// NonceChallenged counts a resource server's DPoP nonce challenge to a
// request of b that was answered with a retry (telemetry.ServerResource).
func (r *Recorder) NonceChallenged(b *broker.Binding) {
	if r == nil {
		return
	}
	r.metrics.NonceChallenged(config.ProviderName(b.SourceID), ServerResource)
}

// NonceRefused logs a resource server's DPoP nonce challenge to a request
// of b that was passed on to the caller, not retried, because the key
// refused the challenge's nonce (outbound.Retry.NonceRefused): refused
// says which server, the nonce's size and what to do, never the nonce.
// It logs once per provider per NonceRefusedLogInterval; the next line
// logged says how many were left out ("suppressed", "suppressed_since").
func (r *Recorder) NonceRefused(b *broker.Binding, refused error) {
	if r == nil {
		return
	}
	provider := config.ProviderName(b.SourceID)
	ok, left := r.nonceRefusals.Allow(provider)
	if !ok {
		return
	}
	fields := []zap.Field{zap.String("provider", provider), zap.String("merchant", b.Merchant), zap.Error(refused)}
	if left.Count > 0 {
		fields = append(fields, zap.Int("suppressed", left.Count), zap.Time("suppressed_since", left.Since))
	}
	r.logger.Warn("a resource server's DPoP nonce challenge was passed on to the caller, not retried: the DPoP key refused its nonce", fields...)
}

// sweepEvicted deletes the merchant series that b just counted into when
// its table holds no binding of b's merchant (it evicted b while a request
// held it), unless a binding uses them (bindings.Series.Sweep): those of
// a binding the table holds are deleted when it leaves the table.
func (r *Recorder) sweepEvicted(b *broker.Binding) {
	if r.metrics == nil || !r.metrics.merchantLabel || r.table == nil {
		return
	}
	if held, _ := r.table.HoldsMerchant(b.Merchant); !held {
		r.metrics.series.Sweep(config.ProviderName(b.SourceID), b.Merchant)
	}
}

// Observer is the broker.Observer of a handler's bindings: it counts
// lookups on its pre-resolved counters and hands everything else to the
// handler's Recorder (fetch logs, fetch metrics, breaker and backoff
// gauges).
type Observer struct {
	r       *Recorder       // never nil
	lookups *LookupCounters // nil: lookups are not counted
}

// Lookup counts a token handed out. It allocates nothing.
func (o *Observer) Lookup(_ *broker.Binding, res broker.Result) {
	if o.lookups != nil && int(res) < len(o.lookups) {
		o.lookups[res].Inc()
	}
}

// Fetched counts a token API call (token_requests_total, the duration
// histogram, a background refresh's refreshes_total, a budgeted call's
// budget_used_total) and tells the tap; FetchDone logs the fetch it
// belongs to.
func (o *Observer) Fetched(_ context.Context, b *broker.Binding, _ broker.Token, elapsed time.Duration, background bool, err error) {
	provider := config.ProviderName(b.SourceID)
	if m := o.r.metrics; m != nil {
		outcome := fetchOutcome(err)
		m.TokenRequests.WithLabelValues(m.labels(b.Merchant, provider, outcome)...).Inc()
		m.FetchDuration.WithLabelValues(provider).Observe(elapsed.Seconds())
		if background {
			m.Refreshes.WithLabelValues(provider, outcome).Inc()
		}
		if b.Budget != nil {
			priority := budget.Foreground
			if background {
				priority = budget.Background
			}
			m.BudgetUsed.WithLabelValues(provider, priority.String()).Inc()
		}
		o.r.sweepEvicted(b)
	}
	if o.r.tap != nil {
		o.r.tap.Fetched(provider, b, o.r.table, err)
	}
}

// FetchDone logs a fetch once, with its calls to the token API (attempts,
// and the outcome of each), its outcome and how long it took: "token
// fetched" or "token fetch failed".
func (o *Observer) FetchDone(_ context.Context, b *broker.Binding, f broker.Fetch) {
	outcomes := make([]string, len(f.Attempts))
	for i, a := range f.Attempts {
		outcomes[i] = fetchOutcome(a.Err)
	}
	fields := []zap.Field{
		zap.String("merchant", b.Merchant),
		zap.String("provider", config.ProviderName(b.SourceID)),
		zap.String("source", b.SourceID),
		zap.String("outcome", fetchOutcome(f.Err)),
		zap.Int("attempts", len(f.Attempts)),
		zap.Strings("attempt_outcomes", outcomes),
		zap.Strings("scopes", b.Scopes),
		zap.Duration("duration", f.Elapsed),
		zap.Bool("background", f.Background),
	}
	if f.Err != nil {
		if ra := broker.RetryAfterOf(f.Err); ra > 0 {
			fields = append(fields, zap.Duration("retry_in", ra))
		}
		o.r.logger.Warn("token fetch failed", append(fields, zap.Error(f.Err))...)
		return
	}
	o.r.logger.Info("token fetched", append(fields, zap.String("fingerprint", f.Token.Fingerprint()),
		zap.Time("expiry", f.Token.Expiry))...)
}

// BackingOff counts the keys in failure memory, by provider.
func (o *Observer) BackingOff(b *broker.Binding, on bool) {
	if o.r.metrics != nil {
		count(o.r.metrics.BackingOff.WithLabelValues(config.ProviderName(b.SourceID)), on)
	}
}

// SourceBackingOff counts the provider configurations backing off after a 429
// with Retry-After or a bad credential, and tells the tap.
func (o *Observer) SourceBackingOff(sourceID string, on bool) {
	if o.r.tap != nil {
		o.r.tap.SourceChanged(o.r.broker, config.ProviderName(sourceID), sourceID)
	}
	if o.r.metrics != nil {
		count(o.r.metrics.SourcesBackingOff.WithLabelValues(config.ProviderName(sourceID)), on)
	}
}

// count adds one to g when on, else takes one away.
func count(g prometheus.Gauge, on bool) {
	if on {
		g.Inc()
	} else {
		g.Dec()
	}
}

// BreakerChanged sets the breaker gauge of the source's provider, and
// tells the tap.
func (o *Observer) BreakerChanged(sourceID string, state broker.BreakerState) {
	if o.r.tap != nil {
		o.r.tap.SourceChanged(o.r.broker, config.ProviderName(sourceID), sourceID)
	}
	if o.r.metrics != nil {
		o.r.metrics.Breaker.WithLabelValues(config.ProviderName(sourceID)).Set(float64(state))
	}
}

// RefreshPlanned counts the planned refresh-ahead of a token the broker
// minted.
func (o *Observer) RefreshPlanned(b *broker.Binding, _ time.Time) {
	o.r.metrics.planned(config.ProviderName(b.SourceID), PlannedAhead)
}

// RefreshBehind counts a planned refresh that cannot get budget before
// its token's end, and tells the tap.
func (o *Observer) RefreshBehind(b *broker.Binding, expiry time.Time) {
	provider := config.ProviderName(b.SourceID)
	o.r.metrics.planned(provider, PlannedBehind)
	if o.r.tap != nil {
		o.r.tap.RefreshBehind(provider, b, expiry)
	}
}

// Interface guard.
var _ broker.Observer = (*Observer)(nil)
