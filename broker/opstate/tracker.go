package opstate

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// DefaultMaxMerchants bounds the merchants a Tracker remembers.
const DefaultMaxMerchants = 250_000

// TrackerOptions configure a Tracker. The zero value gives the defaults.
type TrackerOptions struct {
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Emit, when set, is told of each transition someone must act on
	// (the Event* names), with data naming the merchant, the provider and
	// the error code, never a token or a secret. It is called outside the
	// tracker's lock, on the token fetch path: it must be quick.
	Emit func(event string, data map[string]any)
	// Window is the span of a provider's Requests and Failures. Default
	// DefaultWindow.
	Window time.Duration
	// MaxMerchants bounds the merchants remembered (only those whose
	// token requests failed are): beyond it, a new one replaces an
	// arbitrary other. Default DefaultMaxMerchants.
	MaxMerchants int
}

// Tracker learns from the broker's observer calls what the operator's
// view needs besides what the broker keeps: each merchant's last error
// (kept after a success) and whether its last token request was refused,
// for an unknown organisation, or for lack of consent; each provider's
// token requests over a sliding window and its last error; the fleet
// tier's health. It emits an event on each transition (TrackerOptions.Emit),
// never twice for the same state.
//
// It is told of token API calls (Fetched), not of requests: nothing runs
// per request. It is safe for concurrent use. It keeps a record only for
// merchants whose token requests failed; Forget drops one (a wildcard
// merchant the binding table evicts).
type Tracker struct {
	now    func() time.Time
	emit   func(event string, data map[string]any)
	span   time.Duration
	maxLen int

	mu        sync.Mutex
	merchants map[string]*merchantRecord
	providers map[string]*providerRecord
	fleet     fleetRecord

	index atomic.Pointer[registryIndex] // the last registry's, for Build
}

// merchantRecord is what a Tracker remembers of a merchant.
type merchantRecord struct {
	provider  string
	lastErr   errcode.Code
	lastErrAt time.Time
	// failure is the state the last token request's failure puts the
	// merchant in (StateRefused, StateUnknownOrganisation,
	// StateNeedsConsent, StateBackingOff); "" after a success.
	failure string
	// refusedTold: EventTokenRefused was emitted, and no success since.
	refusedTold bool
	// consentNeeded: EventConsentNeeded was emitted, and neither a
	// success nor a consent since.
	consentNeeded bool
}

// providerRecord is what a Tracker remembers of a provider.
type providerRecord struct {
	calls     window
	lastErr   errcode.Code
	lastErrAt time.Time
	held      map[string]bool // source IDs backing off
	open      map[string]bool // source IDs whose breaker is not closed
	failing   bool            // EventProviderFailing was emitted, not yet recovered
}

// fleetRecord is the fleet tier's health.
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
	if o.Window <= 0 {
		o.Window = DefaultWindow
	}
	if o.MaxMerchants <= 0 {
		o.MaxMerchants = DefaultMaxMerchants
	}
	return &Tracker{now: o.Now, emit: o.Emit, span: o.Window, maxLen: o.MaxMerchants,
		merchants: map[string]*merchantRecord{}, providers: map[string]*providerRecord{}}
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
		p = &providerRecord{calls: newWindow(t.span), held: map[string]bool{}, open: map[string]bool{}}
		t.providers[name] = p
	}
	return p
}

// merchant returns the record of a merchant, made on first use (an
// arbitrary other is dropped beyond MaxMerchants). Called with t.mu
// held.
func (t *Tracker) merchant(id, provider string) *merchantRecord {
	m := t.merchants[id]
	if m == nil {
		if len(t.merchants) >= t.maxLen {
			for other := range t.merchants {
				delete(t.merchants, other)
				break
			}
		}
		m = &merchantRecord{provider: provider}
		t.merchants[id] = m
	}
	m.provider = provider
	return m
}

// FailureState returns the merchant state a failed token request puts
// its merchant in: StateNeedsConsent (consent_required),
// StateUnknownOrganisation (broker.ErrUnknownOrganisation), StateRefused
// (token_refused: invalid credentials, a permanent refusal) or
// StateBackingOff (the provider or the network failed).
func FailureState(err error) string {
	switch code := errcode.Classify(err); {
	case code == errcode.ConsentRequired:
		return StateNeedsConsent
	case errors.Is(err, broker.ErrUnknownOrganisation):
		return StateUnknownOrganisation
	case code == errcode.TokenRefused:
		return StateRefused
	}
	return StateBackingOff
}

// Fetched notes a call to a provider's token API for a merchant and how
// it ended (nil: a token). A cancelled call counts as a call, and says
// nothing about the merchant. It implements telemetry.Tap.
func (t *Tracker) Fetched(provider, merchant string, err error) {
	now := t.now()
	var evs []event
	defer func() { t.send(evs) }()
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.provider(provider)
	if err == nil {
		p.calls.add(now, false, false)
		m := t.merchants[merchant]
		if m == nil {
			return
		}
		m.failure, m.refusedTold = "", false
		if m.consentNeeded {
			// A success after consent_required: the consent was granted
			// where this process did not see it (another broker of the
			// fleet, or an operator's refresh token).
			m.consentNeeded = false
			evs = append(evs, event{EventConsentGranted, map[string]any{"merchant": merchant, "provider": provider}})
		}
		return
	}
	if errors.Is(err, context.Canceled) {
		p.calls.add(now, false, false)
		return
	}
	code := errcode.Classify(err)
	state := FailureState(err)
	p.calls.add(now, true, state == StateBackingOff)
	p.lastErr, p.lastErrAt = code, now
	m := t.merchant(merchant, provider)
	m.lastErr, m.lastErrAt, m.failure = code, now, state
	data := map[string]any{"merchant": merchant, "provider": provider, "error": code.String()}
	switch state {
	case StateRefused, StateUnknownOrganisation:
		if !m.refusedTold {
			m.refusedTold = true
			evs = append(evs, event{EventTokenRefused, data})
		}
	case StateNeedsConsent:
		if !m.consentNeeded {
			m.consentNeeded = true
			evs = append(evs, event{EventConsentNeeded, data})
		}
	}
}

// ConsentGranted notes that a merchant completed consent at a provider
// (its refresh token was stored): it emits EventConsentGranted and ends
// the merchant's needs-consent state.
func (t *Tracker) ConsentGranted(provider, merchant string) {
	t.mu.Lock()
	if m := t.merchants[merchant]; m != nil {
		m.consentNeeded = false
		if m.failure == StateNeedsConsent {
			m.failure = ""
		}
	}
	t.mu.Unlock()
	t.send([]event{{EventConsentGranted, map[string]any{"merchant": merchant, "provider": provider}}})
}

// Forget drops what the tracker remembers of a merchant: a wildcard
// merchant that left the binding table.
func (t *Tracker) Forget(merchant string) {
	t.mu.Lock()
	defer t.mu.Unlock()
	delete(t.merchants, merchant)
}

// SourceBackingOff notes that a source of a provider starts (on) or
// ends a backoff. It implements telemetry.Tap.
func (t *Tracker) SourceBackingOff(provider, sourceID string, on bool) {
	t.changeProvider(provider, func(p *providerRecord) {
		if on {
			p.held[sourceID] = true
		} else {
			delete(p.held, sourceID)
		}
	})
}

// BreakerChanged notes a change of the breaker of a source of a provider.
// It implements telemetry.Tap.
func (t *Tracker) BreakerChanged(provider, sourceID string, state broker.BreakerState) {
	t.changeProvider(provider, func(p *providerRecord) {
		if state == broker.BreakerClosed {
			delete(p.open, sourceID)
		} else {
			p.open[sourceID] = true
		}
	})
}

// changeProvider applies change to a provider's record and emits
// EventProviderFailing or EventProviderRecovered when whether it fails
// (a breaker not closed, a source backing off) changed.
func (t *Tracker) changeProvider(provider string, change func(p *providerRecord)) {
	var evs []event
	defer func() { t.send(evs) }()
	t.mu.Lock()
	defer t.mu.Unlock()
	p := t.provider(provider)
	change(p)
	failing := len(p.held) > 0 || len(p.open) > 0
	switch {
	case failing && !p.failing:
		evs = append(evs, event{EventProviderFailing, map[string]any{"provider": provider, "error": p.lastErr.String()}})
	case !failing && p.failing:
		evs = append(evs, event{EventProviderRecovered, map[string]any{"provider": provider}})
	}
	p.failing = failing
}

// retainSources forgets the backoffs and breakers of a provider's source
// IDs that keep does not keep (an older configuration of the provider,
// whose state the broker dropped without telling), emitting
// EventProviderRecovered if the provider so stops failing.
func (t *Tracker) retainSources(provider string, keep func(sourceID string) bool) {
	t.mu.Lock()
	p := t.providers[provider]
	stale := false
	if p != nil {
		for _, m := range []map[string]bool{p.held, p.open} {
			for id := range m {
				stale = stale || !keep(id)
			}
		}
	}
	t.mu.Unlock()
	if !stale {
		return
	}
	t.changeProvider(provider, func(p *providerRecord) {
		for _, m := range []map[string]bool{p.held, p.open} {
			for id := range m {
				if !keep(id) {
					delete(m, id)
				}
			}
		}
	})
}

// SetFleet says whether a fleet (Redis) tier is configured and, when it
// is, whether it is up now; the time of the last change is kept when the
// tier's health does not change.
func (t *Tracker) SetFleet(configured, up bool) {
	t.mu.Lock()
	defer t.mu.Unlock()
	f := &t.fleet
	if !configured {
		*f = fleetRecord{}
		return
	}
	if !f.configured || f.up != up {
		f.configured, f.up, f.since = true, up, t.now()
	}
}

// FleetChanged notes that the fleet tier became unavailable (up false,
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
			f.lastErr = err.Error()
		}
		ev = event{EventFleetDown, map[string]any{"error": f.lastErr}}
	}
	t.mu.Unlock()
	t.send([]event{ev})
}
