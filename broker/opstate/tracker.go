package opstate

import (
	"context"
	"errors"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/scrub"
)

// DefaultMaxMerchants bounds the merchants a Tracker remembers.
const DefaultMaxMerchants = 250_000

// TrackerOptions configure a Tracker. The zero value gives the defaults.
type TrackerOptions struct {
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Emit, when set, is told of each transition someone must act on
	// (the Event* names), with data that never holds a token or a secret.
	// It is called outside the tracker's lock, on the token fetch path:
	// it must be quick.
	Emit func(event string, data map[string]any)
	// MaxMerchants bounds the merchants remembered (only those whose
	// token requests failed are): beyond it, a new merchant's record
	// replaces a wildcard merchant's; when none is, a new explicit
	// merchant's replaces an arbitrary other, and a new wildcard merchant
	// is not remembered. Each record so lost is counted
	// (Report.RecordsDropped). Default DefaultMaxMerchants.
	MaxMerchants int
}

// Tracker learns from the broker's observer calls what the operator's
// view needs besides what the broker keeps: each merchant's last error
// (kept after a success) and the failure state of each of its cache keys
// (until a request of the key succeeds, whichever merchant made it);
// each provider's token requests over a sliding window and its last
// error; the fleet tier's health. Whether a provider fails it reads from
// the broker (SourceChanged, Reconcile). It emits an event on each
// transition (TrackerOptions.Emit), never twice for the same state.
//
// It is told of token API calls, not of requests, and is safe for
// concurrent use. It keeps records only of merchants whose token
// requests failed. A wildcard merchant's record lives as long as its
// binding in the table (Forget); an explicit merchant's is never
// forgotten. Records outlive a reload, up to MaxMerchants, so that a
// merchant still failing is not announced again.
type Tracker struct {
	now    func() time.Time
	emit   func(event string, data map[string]any)
	maxLen int

	mu        sync.Mutex
	merchants map[string]*merchantRecord
	// wild are the merchants of t.merchants whose records only wildcard
	// bindings made: the first to go when the records are full, and the
	// only ones Forget drops.
	wild map[string]struct{}
	// dropped counts the records lost to MaxMerchants.
	dropped uint64
	// failing maps a cache key to the merchants whose records hold a
	// failure of it: a success of the key, through any merchant's
	// request, ends their failures of it.
	failing   map[string][]string
	providers map[string]*providerRecord
	fleet     fleetRecord
}

// maxKeyFailures bounds the cache keys of a merchant whose failures a
// Tracker remembers: beyond it, a new key's failure replaces the oldest.
const maxKeyFailures = 8

// merchantRecord is what a Tracker remembers of a merchant.
type merchantRecord struct {
	// id is the merchant's id, the record's key in Tracker.merchants.
	id        string
	lastErr   errcode.Code
	lastErrAt time.Time
	// failures are the states that the last token request of each of the
	// merchant's cache keys that failed puts it in (StateRefused,
	// StateUnknownOrganisation, StateNeedsConsent, StateBackingOff), at
	// most maxKeyFailures; a success of a key drops its failure.
	failures []keyFailure
	// refusedTold: EventTokenRefused was emitted, and no success since.
	refusedTold bool
	// consentNeeded: EventConsentNeeded was emitted, and neither a
	// success nor a consent since.
	consentNeeded bool
}

// keyFailure is the state a cache key's failed token request puts its
// merchant in, with the source ID and organisation of the key's binding:
// Reconcile drops a failure whose merchant no registry serves from them
// any more.
type keyFailure struct {
	key, state string
	from       origin
}

// failure returns the worst state of m's keys' failures; "" when none.
func (m *merchantRecord) failure() string {
	worst := ""
	for _, f := range m.failures {
		if worst == "" || rankOf(f.state) < rankOf(worst) {
			worst = f.state
		}
	}
	return worst
}

// failed notes the state a failure of b's key puts m in, and indexes it
// in t.failing. Called with t.mu held.
func (t *Tracker) failed(m *merchantRecord, b *broker.Binding, state string) {
	key := b.Key()
	for i := range m.failures {
		if m.failures[i].key == key {
			m.failures[i].state = state
			return
		}
	}
	if len(m.failures) == maxKeyFailures {
		oldest := m.failures[0].key
		t.dropFailures(m, func(f keyFailure) bool { return f.key == oldest })
	}
	// Copies: the key, source ID and organisation of an explicit
	// merchant's binding point into its registry, which must not stay
	// alive after a reload replaced it.
	key = strings.Clone(key)
	m.failures = append(m.failures, keyFailure{key: key, state: state,
		from: origin{strings.Clone(b.SourceID), strings.Clone(b.Organisation)}})
	t.failing[key] = append(t.failing[key], m.id)
}

// dropFailures drops the failures of m that drop selects, and their
// entries in t.failing. Called with t.mu held.
func (t *Tracker) dropFailures(m *merchantRecord, drop func(keyFailure) bool) {
	m.failures = slices.DeleteFunc(m.failures, func(f keyFailure) bool {
		if !drop(f) {
			return false
		}
		ids := slices.DeleteFunc(t.failing[f.key], func(id string) bool { return id == m.id })
		if len(ids) == 0 {
			delete(t.failing, f.key)
		} else {
			t.failing[f.key] = ids
		}
		return true
	})
}

// succeeded drops every merchant's failure of key (a token of a key is
// served to all the merchants sharing it), and every needs-consent
// failure of merchant: a success proves that its consent holds. It
// returns merchant's record, nil when it has none. Called with t.mu held.
func (t *Tracker) succeeded(merchant, key string) *merchantRecord {
	ids := t.failing[key]
	delete(t.failing, key)
	for _, id := range ids {
		o := t.merchants[id]
		if o == nil {
			continue
		}
		o.failures = slices.DeleteFunc(o.failures, func(f keyFailure) bool { return f.key == key })
		if id != merchant {
			o.refusedTold = o.refusedTold && o.refused()
		}
	}
	m := t.merchants[merchant]
	if m != nil {
		t.dropFailures(m, func(f keyFailure) bool { return f.state == StateNeedsConsent })
	}
	return m
}

// refused reports whether a key of m is refused (StateRefused or
// StateUnknownOrganisation).
func (m *merchantRecord) refused() bool {
	return slices.ContainsFunc(m.failures, func(f keyFailure) bool {
		return f.state == StateRefused || f.state == StateUnknownOrganisation
	})
}

// providerRecord is what a Tracker remembers of a provider.
type providerRecord struct {
	calls     window
	lastErr   errcode.Code
	lastErrAt time.Time
	// lastFailAt is the time of the last failure of the provider's (not
	// a refusal of one merchant's).
	lastFailAt time.Time
	// sources are the IDs of the provider's sources whose health says
	// whether it fails: those its registries name (Reconcile) and those
	// told of since (SourceChanged).
	sources []string
	// failing: at the last read of the broker, a source was backing off
	// or its breaker was not closed.
	failing bool
	// announce: failing started, and EventProviderFailing waits for the
	// failure that caused it (the broker tells a backoff or a breaker
	// change before the call's Fetched), to name its error.
	announce bool
	// lastCallFailed: the last call's outcome was a failure of the
	// provider (not of one merchant: a refusal leaves it unchanged).
	lastCallFailed bool
	// behind counts the planned refreshes that could not get budget
	// before their token's end.
	behind int
}

// fleetRecord is the shared tier's health.
type fleetRecord struct {
	configured bool
	up         bool
	since      time.Time
	lastErr    string
	lastErrAt  time.Time
}

// event is an Emit call made once the tracker's lock is released.
type event struct {
	name string
	data map[string]any
}

// NewTracker returns an empty Tracker.
func NewTracker(o TrackerOptions) *Tracker {
	if o.Now == nil {
		o.Now = time.Now
	}
	if o.MaxMerchants <= 0 {
		o.MaxMerchants = DefaultMaxMerchants
	}
	return &Tracker{now: o.Now, emit: o.Emit, maxLen: o.MaxMerchants, merchants: map[string]*merchantRecord{},
		wild: map[string]struct{}{}, failing: map[string][]string{}, providers: map[string]*providerRecord{}}
}

// send emits the events, outside the lock.
func (t *Tracker) send(evs []event) {
	if t.emit == nil {
		return
	}
	for _, e := range evs {
		t.emit(e.name, e.data)
	}
}

// provider returns the record of a provider, made on first use. Called
// with t.mu held.
func (t *Tracker) provider(name string) *providerRecord {
	p := t.providers[name]
	if p == nil {
		p = &providerRecord{}
		t.providers[strings.Clone(name)] = p
	}
	return p
}

// merchant returns the record of a merchant (wild: a wildcard binding's
// failure), made on first use; beyond MaxMerchants, a wildcard merchant's
// record goes for it, else an arbitrary other for an explicit merchant's,
// and nil is returned for a wildcard merchant's. Called with t.mu held.
func (t *Tracker) merchant(id string, wild bool) *merchantRecord {
	if m := t.merchants[id]; m != nil {
		if !wild {
			delete(t.wild, id)
		}
		return m
	}
	if len(t.merchants) >= t.maxLen {
		t.dropped++
		victim, ok := anyKey(t.wild)
		if !ok {
			if wild {
				return nil
			}
			victim, _ = anyKey(t.merchants)
		}
		t.forget(victim)
	}
	// A copy: an explicit merchant's id points into its registry's
	// file, which must not stay alive after a reload replaced it.
	m := &merchantRecord{id: strings.Clone(id)}
	t.merchants[m.id] = m
	if wild {
		t.wild[m.id] = struct{}{}
	}
	return m
}

// anyKey returns a key of m; false when m is empty.
func anyKey[V any](m map[string]V) (string, bool) {
	for k := range m {
		return k, true
	}
	return "", false
}

// forget drops the record of a merchant and its failures' entries in
// t.failing. Called with t.mu held.
func (t *Tracker) forget(merchant string) {
	if m := t.merchants[merchant]; m != nil {
		t.dropFailures(m, func(keyFailure) bool { return true })
		delete(t.merchants, merchant)
		delete(t.wild, merchant)
	}
}

// failureState returns the merchant state a failed token request puts
// its merchant in, from its error and the error's code:
// StateNeedsConsent (consent_required), StateUnknownOrganisation
// (broker.ErrUnknownOrganisation), StateRefused (token_refused: invalid
// credentials, a permanent refusal) or StateBackingOff (the provider or
// the network failed).
func failureState(err error, code errcode.Code) string {
	switch {
	case code == errcode.ConsentRequired:
		return StateNeedsConsent
	case errors.Is(err, broker.ErrUnknownOrganisation):
		return StateUnknownOrganisation
	case code == errcode.TokenRefused:
		return StateRefused
	}
	return StateBackingOff
}

// Fetched notes a call to a provider's token API for a binding made by
// table (nil: none, an operator's check) and how it ended (nil: a
// token). A cancelled call, and one to be sent again at once
// (broker.RetryNowError), count as calls and say nothing else. A
// failure of a merchant the table no longer holds (evicted while the
// call was in flight) makes no record: it would outlive its binding. A
// failure without a table makes a wildcard merchant's record, or leaves
// an existing record's class as it is. It implements telemetry.Tap.
func (t *Tracker) Fetched(provider string, b *broker.Binding, table telemetry.Holder, err error) {
	now := t.now()
	merchant := b.Merchant
	var code errcode.Code
	var state string
	if err != nil && !errors.Is(err, context.Canceled) && !broker.IsRetryNow(err) {
		code = errcode.Classify(err)
		state = failureState(err, code)
	}
	var evs []event
	defer func() { t.send(evs) }()
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.provider(provider)
	if err == nil {
		p.calls.add(now, false)
		p.lastCallFailed = false
		m := t.succeeded(merchant, b.Key())
		if m == nil {
			return
		}
		m.refusedTold = m.refusedTold && m.refused()
		if m.consentNeeded {
			// A success after consent_required: the consent was granted
			// where this process did not see it (another broker of the
			// fleet, or an operator's refresh token).
			m.consentNeeded = false
			evs = append(evs, event{EventConsentGranted, map[string]any{"merchant": merchant, "provider": provider}})
		}
		return
	}
	if code == 0 { // cancelled, or to be sent again at once
		p.calls.add(now, false)
		return
	}
	p.calls.add(now, true)
	p.lastErr, p.lastErrAt = code, now
	if state == StateBackingOff {
		p.lastCallFailed, p.lastFailAt = true, now
	}
	if p.announce {
		p.announce = false
		evs = append(evs, event{EventProviderFailing, map[string]any{"provider": provider, "error": code.String()}})
	}
	held, wild := true, true
	if table != nil {
		// Under t.mu: the table's eviction forgets after it lets b go.
		held, wild = table.HoldsMerchant(merchant)
	}
	if !held {
		return
	}
	m := t.merchant(merchant, wild)
	if m == nil {
		return
	}
	m.lastErr, m.lastErrAt = code, now
	t.failed(m, b, state)
	told := func(name string) {
		evs = append(evs, event{name, map[string]any{"merchant": merchant, "provider": provider, "error": code.String(), "state": state}})
	}
	switch state {
	case StateRefused, StateUnknownOrganisation:
		if !m.refusedTold {
			m.refusedTold = true
			told(EventTokenRefused)
		}
	case StateNeedsConsent:
		if !m.consentNeeded {
			m.consentNeeded = true
			told(EventConsentNeeded)
		}
	}
}

// RefreshBehind notes that a binding's planned refresh cannot get its
// provider's budget before its token's end, and emits
// EventRefreshBehind. It implements telemetry.Tap.
func (t *Tracker) RefreshBehind(provider string, b *broker.Binding, _ time.Time) {
	t.mu.Lock()
	t.provider(provider).behind++
	t.mu.Unlock()
	t.send([]event{{EventRefreshBehind, map[string]any{"merchant": b.Merchant, "provider": provider,
		"error": errcode.BudgetExhausted.String()}}})
}

// ConsentGranted notes that a merchant completed consent at a provider
// (its refresh token was stored): it emits EventConsentGranted and ends
// the merchant's needs-consent state.
func (t *Tracker) ConsentGranted(provider, merchant string) {
	t.mu.Lock()
	if m := t.merchants[merchant]; m != nil {
		m.consentNeeded = false
		t.dropFailures(m, func(f keyFailure) bool { return f.state == StateNeedsConsent })
	}
	t.mu.Unlock()
	t.send([]event{{EventConsentGranted, map[string]any{"merchant": merchant, "provider": provider}}})
}

// Forget drops what the tracker remembers of a wildcard merchant that
// left a binding table. The record of a merchant that an explicit binding
// failed for stays: the merchant is explicit in a registry (another
// handler's, say), where its binding stays as long as its table.
func (t *Tracker) Forget(merchant string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	if _, ok := t.wild[merchant]; ok {
		t.forget(merchant)
	}
}

// SourceChanged notes that a source of a provider started or ended a
// backoff, or that its breaker changed state, and reads from br (nil:
// nothing to read) whether the provider fails now (see setFailing). It
// implements telemetry.Tap.
func (t *Tracker) SourceChanged(br *broker.Broker, provider, sourceID string) {
	if br == nil {
		return
	}
	var evs []event
	defer func() { t.send(evs) }()
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.provider(provider)
	if !slices.Contains(p.sources, sourceID) {
		p.sources = append(p.sources, sourceID)
	}
	evs = p.setFailing(provider, br)
}

// setFailing sets whether p fails from the health of its sources as br
// tells it (one backing off, or its breaker not closed) and returns the
// event of the change: EventProviderRecovered, or none when it starts
// failing, as EventProviderFailing waits for the failure that caused it
// (Fetched), which the broker tells after the change. Called with the
// tracker's lock held, which it keeps while it reads br: of two
// concurrent calls, the one that read the broker last sets p last.
func (p *providerRecord) setFailing(provider string, br *broker.Broker) []event {
	failing := false
	for _, id := range p.sources {
		h := br.SourceHealth(id)
		failing = failing || h.Breaker != broker.BreakerClosed || !h.BackoffUntil.IsZero()
	}
	var evs []event
	switch {
	case failing && !p.failing:
		p.announce = true
	case !failing && p.failing && p.announce:
		p.announce = false // recovered before its failure was told: nothing to tell
	case !failing && p.failing:
		evs = append(evs, event{EventProviderRecovered, map[string]any{"provider": provider}})
	}
	p.failing = failing
	return evs
}

// Reconcile sets the sources of each provider the tracker was told of
// to those s's registries (Registry and Others) name for it (none when
// removed or renamed), and reads from the broker whether the provider
// fails now, emitting EventProviderRecovered when it stops. It drops the
// key failures of a merchant that no registry serves from that source
// and organisation any more: no request would end them. Events already
// told stay told. The broker forgets a source's state without telling (a
// rotated secret), so call it when registries are loaded and
// periodically (the Collector does); Build does not, so that a read has
// no side effect.
func Reconcile(s Sources) {
	regs := s.Registries()
	sources := map[string][]string{} // provider name -> its source IDs
	for _, reg := range regs {
		for name, p := range reg.Providers {
			sources[name] = append(sources[name], p.ID)
		}
	}
	t := s.Tracker
	var evs []event
	defer func() { t.send(evs) }()
	t.mu.Lock()
	defer t.mu.Unlock()
	// Only the providers told of: one that no registry names any more
	// has no source left, so it stops failing.
	for name, p := range t.providers {
		p.sources = sources[name]
		evs = append(evs, p.setFailing(name, s.Broker)...)
	}
	// The failing merchants only (t.failing), each once.
	var failing []string
	for _, ids := range t.failing {
		failing = append(failing, ids...)
	}
	slices.Sort(failing)
	for _, id := range slices.Compact(failing) {
		if m := t.merchants[id]; m != nil {
			served := servedFrom(regs, id)
			t.dropFailures(m, func(f keyFailure) bool { return !slices.Contains(served, f.from) })
		}
	}
}

// origin is the source ID and organisation a merchant is served from.
type origin struct{ source, organisation string }

// servedFrom returns where the registries of regs serve merchant id from
// (its entry, or the wildcard's), one origin per registry that serves it.
func servedFrom(regs []*config.Registry, id string) []origin {
	var served []origin
	for _, reg := range regs {
		if m, _, ok := reg.Merchant(id); ok {
			if p := reg.Providers[m.Provider]; p != nil {
				served = append(served, origin{p.ID, m.Organisation})
			}
		}
	}
	return served
}

// SetFleet says whether a shared tier (Redis) is configured and, when it
// is, whether it is up now. A configured tier's state, once known (an
// earlier SetFleet or FleetChanged), is left alone: a change FleetChanged
// told is newer than the availability read before it by a caller that
// registered FleetChanged first.
func (t *Tracker) SetFleet(configured, up bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f := &t.fleet
	switch {
	case !configured:
		*f = fleetRecord{}
	case !f.configured:
		f.configured, f.up, f.since = true, up, t.now()
	}
}

// Fleet reports whether a shared tier is configured and whether it is up.
func (t *Tracker) Fleet() (configured, up bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.fleet.configured, t.fleet.up
}

// maxFleetError is the length the shared tier's last error is cut to.
const maxFleetError = 200

// fleetErrorClass names the kind of a shared tier failure for an event:
// "timeout", "refused" (the connection was refused) or "error".
func fleetErrorClass(err error) string {
	switch {
	case broker.IsTimeout(err):
		return "timeout"
	case errors.Is(err, syscall.ECONNREFUSED):
		return "refused"
	}
	return "error"
}

// FleetChanged notes that the shared tier became unavailable (up false,
// err the failure) or available again, and emits EventFleetDown or
// EventFleetRecovered. It is fleet.Cache.OnAvailability's function.
func (t *Tracker) FleetChanged(up bool, err error) {
	now := t.now()
	t.mu.Lock()
	f := &t.fleet
	if f.configured && f.up == up {
		t.mu.Unlock()
		return
	}
	f.configured, f.up, f.since = true, up, now
	ev := event{EventFleetRecovered, map[string]any{}}
	if !up {
		f.lastErr, f.lastErrAt = "redis unavailable", now
		if err != nil {
			f.lastErr = scrub.Truncate(err.Error(), maxFleetError)
		}
		ev = event{EventFleetDown, map[string]any{"error": fleetErrorClass(err)}}
	}
	t.mu.Unlock()
	t.send([]event{ev})
}
