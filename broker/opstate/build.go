package opstate

import (
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Sources are what Build reads: nothing in them is called over the
// network.
type Sources struct {
	// Registry are the providers and the explicit merchants.
	Registry *config.Registry
	// Broker holds the cached tokens and the failure policy's state.
	Broker *broker.Broker
	// Tables are the binding tables whose wildcard merchants are active.
	Tables []*bindings.Table
	// Tracker is what the broker's observers told (required).
	Tracker *Tracker
}

// rank is a merchant state's index in States(): lower is worse.
type rank uint8

const (
	rankRefused rank = iota
	rankUnknownOrganisation
	rankNeedsConsent
	rankBackingOff
	rankRefreshing
	rankFresh
	rankIdle
)

// rankOf is the rank of a state; rankIdle for "".
func rankOf(state string) rank {
	if i := slices.Index(States(), state); i >= 0 {
		return rank(i)
	}
	return rankIdle
}

// keys is what the broker keeps for a merchant's keys: the worst of
// their cache states, the earliest expiry, and the backoff ending last.
type keys struct {
	rank         rank
	expiry       time.Time
	backoffUntil time.Time
	backoffErr   error
	backoffAt    time.Time
}

// registryIndex is a registry's explicit merchants sorted by id and
// counted by provider, made once per registry (Tracker.indexOf).
type registryIndex struct {
	reg       *config.Registry
	merchants []*config.Merchant
	count     map[string]int                 // provider name -> explicit merchants
	consent   map[string]*oauth.RefreshToken // refresh_token providers' sources
}

// indexOf returns the index of reg, made when reg is not the one indexed
// last.
func (t *Tracker) indexOf(reg *config.Registry) *registryIndex {
	if idx := t.index.Load(); idx != nil && idx.reg == reg {
		return idx
	}
	idx := &registryIndex{reg: reg, merchants: slices.Collect(maps.Values(reg.Merchants)),
		count: map[string]int{}, consent: map[string]*oauth.RefreshToken{}}
	slices.SortFunc(idx.merchants, func(a, b *config.Merchant) int { return strings.Compare(a.ID, b.ID) })
	for _, m := range idx.merchants {
		idx.count[m.Provider]++
	}
	for name, p := range reg.Providers {
		if src, ok := p.Source.(*oauth.RefreshToken); ok {
			idx.consent[name] = src
		}
	}
	t.index.Store(idx)
	return idx
}

// wild is an active wildcard merchant.
type wild struct {
	id, provider, organisation string
}

// merchantView is one merchant as a walk sees it.
type merchantView struct {
	id, provider, organisation string
	wildcard                   bool
	rank                       rank
	keys                       keys
	rec                        merchantRecord // zero when the tracker has none
}

// walk calls visit for every merchant of s (of provider only, when not
// ""), sorted by id: the registry's explicit merchants and the active
// wildcard ones, each with its state. One pass: each merchant costs a
// few map reads. It returns the tracker's snapshot, the registry's
// index and the active wildcard merchants by provider.
func walk(s Sources, provider string, now time.Time, visit func(v *merchantView)) (snapshot, *registryIndex, map[string]int) {
	t := s.Tracker
	idx := t.indexOf(s.Registry)
	snap := t.snapshot(now)

	byMerchant := map[string]keys{}
	for _, e := range s.Broker.Entries() {
		m := e.Binding().Merchant
		k, ok := byMerchant[m]
		if !ok {
			k.rank = rankIdle
		}
		r := rankFresh
		if !now.Before(e.RefreshAt()) {
			r = rankRefreshing
		}
		k.rank = min(k.rank, r)
		if exp := e.Token().Expiry; k.expiry.IsZero() || exp.Before(k.expiry) {
			k.expiry = exp
		}
		byMerchant[m] = k
	}
	s.Broker.Backoffs(func(b *broker.Binding, err error, at, until time.Time) {
		k, ok := byMerchant[b.Merchant]
		if !ok {
			k.rank = rankIdle
		}
		k.rank = min(k.rank, rankBackingOff)
		if until.After(k.backoffUntil) {
			k.backoffUntil, k.backoffErr, k.backoffAt = until, err, at
		}
		byMerchant[b.Merchant] = k
	})

	var wilds []wild
	for _, tb := range s.Tables {
		tb.Each(func(id string, b *bindings.Binding) {
			if b.Wild() {
				wilds = append(wilds, wild{id: id, provider: b.Provider.Name, organisation: b.Organisation})
			}
		})
	}
	slices.SortFunc(wilds, func(a, b wild) int { return strings.Compare(a.id, b.id) })
	wilds = slices.CompactFunc(wilds, func(a, b wild) bool { return a.id == b.id })
	activeBy := map[string]int{}
	for _, w := range wilds {
		activeBy[w.provider]++
	}

	var v merchantView
	one := func(id, prov, organisation string, wildcard bool) {
		if provider != "" && prov != provider {
			return
		}
		v = merchantView{id: id, provider: prov, organisation: organisation, wildcard: wildcard, rank: rankIdle}
		if k, ok := byMerchant[id]; ok {
			v.keys, v.rank = k, k.rank
		}
		if rec, ok := snap.merchants[id]; ok {
			v.rec = rec
			if fr := rankOf(rec.failure); fr < rankBackingOff {
				v.rank = min(v.rank, fr)
			}
		}
		if src := idx.consent[prov]; src != nil && v.rank > rankNeedsConsent && !src.ConsentStatus(id).ConsentRequiredSince.IsZero() {
			v.rank = rankNeedsConsent
		}
		visit(&v)
	}
	i, j := 0, 0
	for i < len(idx.merchants) || j < len(wilds) {
		if j == len(wilds) || (i < len(idx.merchants) && idx.merchants[i].ID < wilds[j].id) {
			m := idx.merchants[i]
			one(m.ID, m.Provider, m.Organisation, false)
			i++
			continue
		}
		w := wilds[j]
		if i < len(idx.merchants) && idx.merchants[i].ID == w.id {
			i++ // an explicit merchant's binding is not wild: never here
		}
		one(w.id, w.provider, w.organisation, true)
		j++
	}
	return snap, idx, activeBy
}

// Build computes the Report answering q at now: every provider of the
// registry, the fleet tier's health, and the page of merchants (explicit
// ones, including those without a cached token, and the wildcard's
// active ones) that q selects, with the counts by state over every
// merchant of q's provider. A merchant's state is the worst of its keys'.
// It runs in one pass over the merchants (walk); the explicit merchants'
// ids are sorted once per registry.
func Build(s Sources, q Query, now time.Time) Report {
	if q.Limit <= 0 || q.Limit > MaxLimit {
		q.Limit = min(max(q.Limit, DefaultLimit), MaxLimit)
	}
	rep := Report{GeneratedAt: now.UTC(), Counts: map[string]int{}, Merchants: []Merchant{}}
	for _, st := range States() {
		rep.Counts[st] = 0
	}
	states := States()
	more := false
	snap, idx, activeBy := walk(s, q.Provider, now, func(v *merchantView) {
		state := states[v.rank]
		rep.Counts[state]++
		if q.State != "" && state != q.State {
			return
		}
		rep.Total++
		if v.id <= q.After {
			return
		}
		if len(rep.Merchants) == q.Limit {
			more = true
			return
		}
		m := Merchant{Merchant: v.id, Provider: v.provider, Organisation: v.organisation, Wildcard: v.wildcard, State: state,
			Expiry: timePtr(v.keys.expiry), BackoffUntil: timePtr(v.keys.backoffUntil)}
		switch {
		case v.rec.lastErr != 0:
			m.LastError, m.LastErrorAt = v.rec.lastErr.String(), timePtr(v.rec.lastErrAt)
		case v.keys.backoffErr != nil:
			m.LastError, m.LastErrorAt = errcode.Classify(v.keys.backoffErr).String(), timePtr(v.keys.backoffAt)
		}
		rep.Merchants = append(rep.Merchants, m)
	})
	if more {
		rep.Next = rep.Merchants[len(rep.Merchants)-1].Merchant
	}
	rep.Providers = providers(s, idx, snap, activeBy)
	if snap.fleet.configured {
		f := snap.fleet
		rep.Fleet = &Fleet{Up: f.up, Since: timePtr(f.since), LastError: f.lastErr, LastErrorAt: timePtr(f.lastErrAt)}
	}
	return rep
}

// Counts returns the merchants of every provider of the registry by
// state (every state present, as in a Report's Counts), in one pass: for
// the merchants gauge.
func Counts(s Sources, now time.Time) map[string]map[string]int {
	out := map[string]map[string]int{}
	for name := range s.Registry.Providers {
		out[name] = map[string]int{}
		for _, st := range States() {
			out[name][st] = 0
		}
	}
	states := States()
	walk(s, "", now, func(v *merchantView) {
		if c := out[v.provider]; c != nil {
			c[states[v.rank]]++
		}
	})
	return out
}

// providers are the registry's providers' states, by name.
func providers(s Sources, idx *registryIndex, snap snapshot, activeBy map[string]int) []Provider {
	names := slices.Sorted(maps.Keys(s.Registry.Providers))
	ids := make([]string, len(names))
	for i, name := range names {
		ids[i] = s.Registry.Providers[name].ID
	}
	health := s.Broker.SourcesHealth(ids...)
	out := make([]Provider, 0, len(names))
	for i, name := range names {
		p := s.Registry.Providers[name]
		s.Tracker.retainSources(name, func(id string) bool { return id == ids[i] })
		h := health[ids[i]]
		rec := snap.providers[name]
		out = append(out, Provider{Name: name, Type: p.Type, Breaker: h.Breaker.String(), BackoffUntil: timePtr(h.BackoffUntil),
			Requests: rec.calls, Failures: rec.failures, Window: snap.window.String(),
			Merchants: idx.count[name] + activeBy[name]})
		o := &out[len(out)-1]
		switch {
		case rec.lastErr != 0:
			o.LastError, o.LastErrorAt = rec.lastErr.String(), timePtr(rec.lastErrAt)
		case h.LastError != nil:
			o.LastError, o.LastErrorAt = errcode.Classify(h.LastError).String(), timePtr(h.LastFailure)
		}
		switch {
		case h.Breaker == broker.BreakerOpen:
			o.Status = "open"
		case !h.BackoffUntil.IsZero():
			o.Status = "backing_off"
		case h.Breaker == broker.BreakerHalfOpen || rec.temporary > 0:
			o.Status = "failing"
		default:
			o.Status = "ok"
		}
	}
	return out
}

// snapshot is a copy of what a Tracker knows, for one Build.
type snapshot struct {
	window    time.Duration
	merchants map[string]merchantRecord
	providers map[string]providerView
	fleet     fleetRecord
}

// providerView is a provider's record summed up at a time.
type providerView struct {
	calls, failures, temporary int
	lastErr                    errcode.Code
	lastErrAt                  time.Time
}

// snapshot copies what t knows at now.
func (t *Tracker) snapshot(now time.Time) snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := snapshot{window: t.span, merchants: make(map[string]merchantRecord, len(t.merchants)),
		providers: make(map[string]providerView, len(t.providers)), fleet: t.fleet}
	for id, m := range t.merchants {
		s.merchants[id] = *m
	}
	for name, p := range t.providers {
		v := providerView{lastErr: p.lastErr, lastErrAt: p.lastErrAt}
		v.calls, v.failures, v.temporary = p.calls.sum(now)
		s.providers[name] = v
	}
	return s
}

// timePtr is t in UTC, nil when zero.
func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}
