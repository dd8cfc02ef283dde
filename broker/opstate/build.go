package opstate

import (
	"maps"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
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
	// Index keeps what is computed once per registry (nil: computed
	// on each Build).
	Index *Index
	// Others are the registries whose token requests the tracker is told
	// of besides Registry's (handlers' own): Reconcile covers their
	// providers' sources; Build and Counts do not report them.
	Others []*config.Registry
}

// Registries returns Registry, then Others, each once; nil ones left out.
func (s Sources) Registries() []*config.Registry {
	var regs []*config.Registry
	for _, r := range append([]*config.Registry{s.Registry}, s.Others...) {
		if r != nil && !slices.Contains(regs, r) {
			regs = append(regs, r)
		}
	}
	return regs
}

// Index keeps what Build computes once per registry: its merchants
// sorted by id. Keep one with the registry (an app's), so that it goes
// with it. The zero value is ready to use; it is safe for concurrent use.
type Index struct {
	last atomic.Pointer[registryIndex]
}

// rank is a merchant state's index in stateOrder: lower is worse. The
// constants name the ranks in that order.
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

// rankOf is the rank of a state; rankIdle for "" or an unknown one.
func rankOf(state string) rank {
	if i := slices.Index(stateOrder[:], state); i >= 0 {
		return rank(i)
	}
	return rankIdle
}

// byRank counts merchants by rank.
type byRank [rankIdle + 1]int

// counts returns c by state name, every state present.
func (c *byRank) counts() map[string]int {
	out := make(map[string]int, len(c))
	for i, st := range States() {
		out[st] = c[i]
	}
	return out
}

// registryIndex is a registry's explicit merchants sorted by id, with
// their counts by provider and the cache keys they share, made once per
// registry (Index).
type registryIndex struct {
	reg       *config.Registry
	merchants []*config.Merchant
	count     map[string]int                 // provider name -> explicit merchants
	consent   map[string]*oauth.RefreshToken // refresh_token providers' sources
	// shared maps the cache key of the binding without route scopes
	// (config.Registry.Binding) that two explicit merchants or more have
	// (the same organisation at one provider, or none) to their
	// positions: a token cached or a failure remembered under it is
	// theirs alike.
	shared map[string][]int32
}

// of returns the index of reg, made when reg is not the one indexed
// last (every time on a nil Index).
func (x *Index) of(reg *config.Registry) *registryIndex {
	if x != nil {
		if idx := x.last.Load(); idx != nil && idx.reg == reg {
			return idx
		}
	}
	idx := &registryIndex{reg: reg, merchants: slices.Collect(maps.Values(reg.Merchants)),
		count: map[string]int{}, consent: map[string]*oauth.RefreshToken{}}
	slices.SortFunc(idx.merchants, func(a, b *config.Merchant) int { return strings.Compare(a.ID, b.ID) })
	byKey := make(map[string][]int32, len(idx.merchants))
	for i, m := range idx.merchants {
		idx.count[m.Provider]++
		if b, err := reg.Binding(m.ID, nil); err == nil {
			byKey[b.Key()] = append(byKey[b.Key()], int32(i))
		}
	}
	idx.shared = map[string][]int32{}
	for key, at := range byKey {
		if len(at) > 1 {
			idx.shared[key] = at
		}
	}
	for name, p := range reg.Providers {
		if src, ok := p.RefreshToken(); ok {
			idx.consent[name] = src
		}
	}
	if x != nil {
		x.last.Store(idx)
	}
	return idx
}

// wild is an active wildcard merchant.
type wild struct {
	id, provider, organisation string
}

// known is what the broker and the tracker know of one merchant: the
// worst of its keys' cache states, their earliest expiry, the backoff
// ending last, and the tracker's record. Times are unix nanoseconds (0:
// none).
type known struct {
	rank         rank // of its keys
	failure      rank // the tracker's failure state; rankIdle: none
	lastErr      errcode.Code
	expiry       int64
	backoffUntil int64
	backoffAt    int64
	lastErrAt    int64
	backoffErr   error
}

// knowledge is what the broker and the tracker know, by merchant id.
type knowledge struct {
	idx *registryIndex
	by  map[string]known
}

// update calls f with what is known of merchant id, made empty on first
// use.
func (k knowledge) update(id string, f func(*known)) {
	v, ok := k.by[id]
	if !ok {
		v = known{rank: rankIdle, failure: rankIdle}
	}
	f(&v)
	k.by[id] = v
}

// each calls update for b's merchant and the explicit merchants sharing
// b's key (registryIndex.shared).
func (k knowledge) each(b *broker.Binding, f func(*known)) {
	k.update(b.Merchant, f)
	for _, p := range k.idx.shared[b.Key()] {
		if id := k.idx.merchants[p].ID; id != b.Merchant {
			k.update(id, f)
		}
	}
}

// merchantView is one merchant as a walk sees it.
type merchantView struct {
	id, provider, organisation string
	wildcard                   bool
	rank                       rank
	known
}

// outage is the state that a provider whose source is in backoff or
// whose breaker is open puts its merchants in when they have neither a
// cached token nor a state of their own: their token requests answer the
// source's error without calling its token API.
type outage struct {
	rank      rank
	until, at int64 // unix nanoseconds; 0: none
	err       error
}

// sourcesHealth returns the health of the source of every provider of
// the registry, by provider name.
func sourcesHealth(s Sources) map[string]broker.SourceHealth {
	ids := make([]string, 0, len(s.Registry.Providers))
	for _, p := range s.Registry.Providers {
		ids = append(ids, p.ID)
	}
	health := s.Broker.SourcesHealth(ids...)
	out := make(map[string]broker.SourceHealth, len(s.Registry.Providers))
	for name, p := range s.Registry.Providers {
		out[name] = health[p.ID]
	}
	return out
}

// outages returns the outages of the providers whose source is in
// backoff (its state from its error: refused for a refused credential,
// backing_off for a 429) or whose breaker is open (backing_off).
func outages(health map[string]broker.SourceHealth) map[string]outage {
	out := map[string]outage{}
	for name, h := range health {
		switch {
		case !h.BackoffUntil.IsZero():
			out[name] = outage{rank: rankOf(failureState(h.BackoffError, errcode.Classify(h.BackoffError))),
				until: h.BackoffUntil.UnixNano(), at: h.BackoffAt.UnixNano(), err: h.BackoffError}
		case h.Breaker == broker.BreakerOpen:
			o := outage{rank: rankBackingOff, err: h.LastError}
			if !h.LastFailure.IsZero() {
				o.at = h.LastFailure.UnixNano()
			}
			out[name] = o
		}
	}
	return out
}

// walk calls visit for every merchant of s (of provider only, when not
// ""), sorted by id: the registry's explicit merchants and the active
// wildcard ones, each with its state. It reads the cached entries, the
// keys in backoff, the sources' health and the tracker's merchants once
// each, then passes over the merchants. It returns the registry's index,
// the active wildcard merchants by provider and the health of the
// providers' sources by name.
func walk(s Sources, provider string, now time.Time, visit func(v *merchantView)) (*registryIndex, map[string]int, map[string]broker.SourceHealth) {
	t := s.Tracker
	idx := s.Index.of(s.Registry)
	health := sourcesHealth(s)
	down := outages(health)

	entries := s.Broker.Entries()
	kn := knowledge{idx: idx, by: make(map[string]known, len(entries)+64)}
	for _, e := range entries {
		r := rankFresh
		if !now.Before(e.RefreshAt()) {
			r = rankRefreshing
		}
		exp := e.Token().Expiry.UnixNano()
		kn.each(e.Binding(), func(k *known) {
			k.rank = min(k.rank, r)
			if k.expiry == 0 || exp < k.expiry {
				k.expiry = exp
			}
		})
	}
	s.Broker.Backoffs(func(b *broker.Binding, err error, at, until time.Time) {
		u := until.UnixNano()
		kn.each(b, func(k *known) {
			k.rank = min(k.rank, rankBackingOff)
			if u > k.backoffUntil {
				k.backoffUntil, k.backoffErr, k.backoffAt = u, err, at.UnixNano()
			}
		})
	})
	t.eachMerchant(func(id string, rec *merchantRecord) {
		kn.update(id, func(k *known) {
			k.failure, k.lastErr = rankOf(rec.failure()), rec.lastErr
			if !rec.lastErrAt.IsZero() {
				k.lastErrAt = rec.lastErrAt.UnixNano()
			}
		})
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
		if k, ok := kn.by[id]; ok {
			v.known, v.rank = k, k.rank
			if k.failure < rankBackingOff {
				v.rank = min(v.rank, k.failure)
			}
		}
		if src := idx.consent[prov]; src != nil && v.rank > rankNeedsConsent && !src.ConsentStatus(id).ConsentRequiredSince.IsZero() {
			v.rank = rankNeedsConsent
		}
		if v.rank == rankIdle && len(down) > 0 {
			if h, ok := down[prov]; ok {
				v.rank, v.backoffUntil, v.backoffAt, v.backoffErr = h.rank, h.until, h.at, h.err
				if h.err != nil {
					v.lastErr, v.lastErrAt = errcode.Classify(h.err), h.at
				}
			}
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
	return idx, activeBy, health
}

// Build computes the Report answering q at now: every provider of the
// registry, the shared tier's health, and the page of merchants (explicit
// ones, including those without a cached token, and the wildcard's
// active ones) that q selects, with the counts by state over every
// merchant of q's provider. A merchant's state is the worst of its keys'
// (those it shares with other merchants included); one without a token
// or a state of its own takes its provider's outage (see outage). It only
// reads: it emits no event (Reconcile does).
func Build(s Sources, q Query, now time.Time) Report {
	q.Limit = q.size()
	rep := Report{GeneratedAt: now.UTC(), Merchants: []Merchant{}}
	var counts byRank
	states := States()
	want := rank(len(states)) // every state
	if q.State != "" {
		want = rankOf(q.State)
	}
	more := false
	idx, activeBy, health := walk(s, q.Provider, now, func(v *merchantView) {
		counts[v.rank]++
		if want < rank(len(states)) && v.rank != want {
			return
		}
		state := states[v.rank]
		rep.Total++
		if v.id <= q.After {
			return
		}
		if len(rep.Merchants) == q.Limit {
			more = true
			return
		}
		m := Merchant{Merchant: v.id, Provider: v.provider, Organisation: v.organisation, Wildcard: v.wildcard, State: state,
			Expiry: unixPtr(v.expiry), BackoffUntil: unixPtr(v.backoffUntil)}
		switch {
		case v.lastErr != 0:
			m.LastError, m.LastErrorAt = v.lastErr.String(), unixPtr(v.lastErrAt)
		case v.backoffErr != nil:
			m.LastError, m.LastErrorAt = errcode.Classify(v.backoffErr).String(), unixPtr(v.backoffAt)
		}
		rep.Merchants = append(rep.Merchants, m)
	})
	rep.Counts = counts.counts()
	if more {
		rep.Next = rep.Merchants[len(rep.Merchants)-1].Merchant
	}
	snap := s.Tracker.snapshot(now)
	rep.Providers, rep.RecordsDropped = providers(s, idx, snap, activeBy, health), snap.dropped
	if snap.fleet.configured {
		f := snap.fleet
		rep.Fleet = &Fleet{Up: f.up, Since: TimePtr(f.since), LastError: f.lastErr, LastErrorAt: TimePtr(f.lastErrAt)}
	}
	return rep
}

// Counts returns the merchants of every provider of the registry by
// state (every state present, as in a Report's Counts), in one pass: for
// the merchants gauge.
func Counts(s Sources, now time.Time) map[string]map[string]int {
	by := map[string]*byRank{}
	for name := range s.Registry.Providers {
		by[name] = &byRank{}
	}
	walk(s, "", now, func(v *merchantView) {
		if c := by[v.provider]; c != nil {
			c[v.rank]++
		}
	})
	out := make(map[string]map[string]int, len(by))
	for name, c := range by {
		out[name] = c.counts()
	}
	return out
}

// providers are the registry's providers' states, by name, from their
// sources' health.
func providers(s Sources, idx *registryIndex, snap snapshot, activeBy map[string]int, health map[string]broker.SourceHealth) []Provider {
	names := slices.Sorted(maps.Keys(s.Registry.Providers))
	out := make([]Provider, 0, len(names))
	for _, name := range names {
		p := s.Registry.Providers[name]
		h := health[name]
		rec := snap.providers[name]
		out = append(out, Provider{Name: name, Type: p.Type, Breaker: h.Breaker.String(), BackoffUntil: TimePtr(h.BackoffUntil),
			Requests: rec.calls, Failures: rec.failures, Window: RequestsWindow.String(),
			Merchants: idx.count[name] + activeBy[name]})
		o := &out[len(out)-1]
		if db, ok := p.Source.(broker.DPoPBound); ok {
			if k := db.DPoPKey(); k != nil {
				o.DPoP = &DPoPKey{Alg: k.Alg(), JKT: k.Thumbprint()}
			}
		}
		if p.Budget != nil {
			o.Budget = budgetOf(p.Budget.State(), rec.behind)
		}
		switch {
		case rec.lastErr != 0:
			o.LastError, o.LastErrorAt = rec.lastErr.String(), TimePtr(rec.lastErrAt)
		case h.LastError != nil:
			o.LastError, o.LastErrorAt = errcode.Classify(h.LastError).String(), TimePtr(h.LastFailure)
		}
		switch {
		case h.Breaker == broker.BreakerOpen:
			o.Status = "open"
		case !h.BackoffUntil.IsZero():
			o.Status = "backing_off"
		case h.Breaker == broker.BreakerHalfOpen || rec.lastCallFailed:
			o.Status = "failing"
		default:
			o.Status = "ok"
		}
	}
	return out
}

// budgetOf is the report of a budget's state.
func budgetOf(st budget.State, behind int) *Budget {
	return &Budget{Rate: st.Rate, Burst: st.Burst, Effective: st.Effective, LoweredUntil: TimePtr(st.LoweredUntil),
		Remaining: st.Remaining, Waiting: st.Waiting, Used: st.Used, Exhausted: st.Exhausted, RefreshesBehind: behind}
}

// snapshot is a copy of what a Tracker knows of providers and the fleet
// tier, for one Build.
type snapshot struct {
	providers map[string]providerView
	fleet     fleetRecord
	dropped   uint64 // Tracker.dropped
}

// providerView is a provider's record summed up at a time.
type providerView struct {
	calls, failures int
	lastErr         errcode.Code
	lastErrAt       time.Time
	// lastCallFailed: the provider's last call failed for a reason of
	// the provider's (not one merchant's refusal), within the window.
	lastCallFailed bool
	// behind counts the refreshes behind plan (providerRecord.behind).
	behind int
}

// snapshot copies what t knows at now.
func (t *Tracker) snapshot(now time.Time) snapshot {
	t.mu.Lock()
	defer t.mu.Unlock()
	s := snapshot{providers: make(map[string]providerView, len(t.providers)), fleet: t.fleet, dropped: t.dropped}
	for name, p := range t.providers {
		v := providerView{lastErr: p.lastErr, lastErrAt: p.lastErrAt,
			lastCallFailed: p.lastCallFailed && now.Sub(p.lastFailAt) < RequestsWindow, behind: p.behind}
		v.calls, v.failures = p.calls.sum(now)
		s.providers[name] = v
	}
	return s
}

// eachMerchant calls f, under the tracker's lock, for every merchant it
// remembers: f must be quick and not call the tracker.
func (t *Tracker) eachMerchant(f func(id string, rec *merchantRecord)) {
	t.mu.Lock()
	defer t.mu.Unlock()
	for id, m := range t.merchants {
		f(id, m)
	}
}

// unixPtr is the time of unix nanoseconds ns in UTC, nil when 0.
func unixPtr(ns int64) *time.Time {
	if ns == 0 {
		return nil
	}
	t := time.Unix(0, ns).UTC()
	return &t
}
