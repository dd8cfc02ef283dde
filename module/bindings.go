package module

import (
	"hash/maphash"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/slab"
)

// bindingTable holds the bindings of one merchant registry for one scope
// set, created on first use: memory follows the merchants actually seen,
// not the size of the registry. Every token_broker handler of a config
// with the same registry and route scopes shares one table (App.table).
//
// The table is sharded maps from merchant id to binding, each under a
// read-write lock: a hit is one read lock of its shard and one map read,
// no allocation. A map keyed by string keeps the key inline (a sync.Map
// costs three or more heap objects per key, boxed key included), and the
// key is the binding's own merchant id (the registry's string, or a copy
// for a wildcard id), never the request's header. A miss (a merchant's
// first request) resolves the merchant in the registry, explicit entry
// first, then the wildcard entry, under the table's lock.
//
// Bindings served through the wildcard are bounded by its max_active: a
// new one evicts those unused for idle_timeout, else the oldest one that
// was never served a token (evictUnserved: a merchant id whose token
// requests fail, or whose first one is still in flight, keeps no slot from
// one that can get a token), or is refused (503) when there is neither.
// Eviction for idleness removes a binding from the table (a request in
// flight keeps its pointer and its token) and parks it: the tokens of the
// last max_active merchants evicted stay in the broker's cache, so that a
// merchant that comes back soon gets its token again without a token
// request; an older one's is dropped (park). The tokens cached for
// wildcard merchants are so bounded by twice max_active, however many
// merchant ids the wildcard serves over time.
type bindingTable struct {
	reg     *config.Registry // nil for a table filled by hand (tests)
	scopes  []string         // the route's scopes, normalised; nil: the merchants' own
	listing *listing.Listing // nil unless the wildcard is restricted
	now     func() time.Time

	seed   maphash.Seed
	shards [tableShards]tableShard
	mu     sync.Mutex   // serialises creations and evictions
	active atomic.Int64 // wildcard bindings in the table
	// noIdleUntil (unix ns, under mu) is the first moment a binding can be
	// idle past idle_timeout, as the last eviction scan found it: while the
	// table is full and nobody can be idle yet, a new merchant is refused
	// without walking every binding under the lock.
	noIdleUntil int64
	scans       int // eviction scans, for tests
	// parked are the evicted wildcard bindings whose token is still
	// cached, oldest first, at most max_active (under mu): see park.
	// lastParked is the number of each parked merchant's latest parking
	// (parkings counts them): a merchant evicted, back and evicted again
	// is dropped only when its latest parking leaves.
	parked     []parking
	lastParked map[string]uint64
	parkings   uint64
	// unserved (under mu) are the wildcard bindings made, oldest first,
	// among which those never served a token are evicted first
	// (evictUnserved). A binding served since, or no longer in the table,
	// is skipped when reached and dropped when the slice is compacted
	// (queueUnserved), so that it holds at most twice the active bindings.
	unserved []*binding
	// provs (under mu) are the providers' names and types, shared by
	// their bindings (provider).
	provs map[string]*bindingProvider
	// held (under mu) is set, with the merchant label on, once a wildcard
	// binding holds its merchant's series (tokenMetrics.holdMerchant):
	// they are released when it is evicted (evictIdle) or its config is
	// discarded (discard), which also stops holding new ones (discarded).
	held      *tokenMetrics
	discarded bool

	// packed holds the bindings of explicit registry merchants
	// (newPacked), 128 of 96 bytes a chunk: the table's own, so
	// that a chunk never holds bindings of two configs (a live config's
	// chunk would keep a discarded one alive through its bindings'
	// observers, which point at their handlers and tables).
	packed slab.Of[binding]
}

// tableShards is the number of shards of a binding table: enough that
// concurrent hits rarely share a lock word.
const tableShards = 64

// tableShard is one shard of a binding table, padded to its own cache
// lines.
type tableShard struct {
	mu sync.RWMutex
	m  map[string]*binding // merchant id -> binding
	_  [64 - 8]byte
}

func newBindingTable(reg *config.Registry, scopes []string, listing *listing.Listing) *bindingTable {
	if len(scopes) > 0 {
		// Normalised once here, so that the bindings share this slice.
		scopes = broker.NormaliseScopes(scopes)
	}
	return &bindingTable{reg: reg, scopes: scopes, listing: listing, now: time.Now, seed: maphash.MakeSeed()}
}

func (t *bindingTable) shard(id string) *tableShard {
	return &t.shards[maphash.String(t.seed, id)%tableShards]
}

// load returns the binding of a merchant, or nil.
func (t *bindingTable) load(id string) *binding {
	s := t.shard(id)
	s.mu.RLock()
	b := s.m[id]
	s.mu.RUnlock()
	return b
}

// store adds a binding under its own merchant id.
func (t *bindingTable) store(b *binding) {
	id := b.Merchant
	s := t.shard(id)
	s.mu.Lock()
	if s.m == nil {
		s.m = make(map[string]*binding)
	}
	s.m[id] = b
	s.mu.Unlock()
}

// peek returns the binding of a merchant if it exists.
func (t *bindingTable) peek(id string) *binding { return t.load(id) }

// each calls f for every binding in the table, a shard at a time under
// its read lock: f must not change the table.
func (t *bindingTable) each(f func(id string, b *binding)) {
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.RLock()
		for id, b := range s.m {
			f(id, b)
		}
		s.mu.RUnlock()
	}
}

// touchEvery is the granularity of a wildcard binding's last use: the
// hot path writes the shared word at most this often.
const touchEvery = int64(time.Second)

// get returns the binding of a valid merchant id, creating it on first
// use; a non-nil refusal says why the merchant is not served.
func (t *bindingTable) get(h *Handler, id string) (*binding, *refusal) {
	if b := t.load(id); b != nil {
		if used := b.lastUsed.Load(); used != 0 { // wild
			if now := t.now().UnixNano(); now-used >= touchEvery {
				// A lost race is another touch or markServed: either
				// is as good (the use is coarse), and the served bit
				// is kept.
				b.lastUsed.CompareAndSwap(used, useStamp(now)|used&servedBit)
			}
			if t.listing != nil {
				if code := t.listing.Allows(b.Organisation); code != 0 {
					return nil, &refusal{code: code, merchant: id}
				}
			}
		}
		return b, nil
	}
	return t.create(h, id)
}

func (t *bindingTable) create(h *Handler, id string) (*binding, *refusal) {
	if t.reg == nil {
		return nil, &refusal{code: errcode.UnknownMerchant, merchant: id}
	}
	m, wild, ok := t.reg.Merchant(id)
	if !ok {
		return nil, &refusal{code: errcode.UnknownMerchant, merchant: id}
	}
	if wild && t.listing != nil {
		if code := t.listing.Allows(m.Organisation); code != 0 {
			return nil, &refusal{code: code, merchant: id}
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if b := t.load(id); b != nil {
		return b, nil
	}
	now := t.now().UnixNano()
	if wild && t.active.Load() >= int64(t.reg.Wildcard.MaxActive) {
		if now >= t.noIdleUntil {
			t.evictIdle(now, h.broker, id)
		}
		if t.active.Load() >= int64(t.reg.Wildcard.MaxActive) && !t.evictUnserved() {
			return nil, &refusal{code: errcode.TooManyMerchants, merchant: id}
		}
	}
	if wild {
		// id is the request's header value: the binding must not keep
		// the request's header strings alive. An explicit merchant's
		// binding gets the registry's own id.
		id = strings.Clone(id)
	}
	bd, err := t.reg.Binding(id, t.scopes)
	if err != nil {
		return nil, &refusal{code: errcode.UnknownMerchant, merchant: id, cause: err}
	}
	prov := t.provider(m.Provider)
	var b *binding
	if wild {
		// An object of its own: it can be evicted at any time.
		b = new(binding)
		initBinding(b, bd, prov)
		b.lastUsed.Store(useStamp(now)) // wild, not served yet
	} else {
		b = t.newPacked(bd, prov)
	}
	hold := wild && !t.discarded && h.metrics != nil && h.metrics.tokenMetrics != nil && h.metrics.merchantLabel
	b.Observer = h.observerFor(b, hold)
	if hold {
		t.held = h.metrics.tokenMetrics
	}
	t.store(b)
	if wild {
		t.active.Add(1)
		t.queueUnserved(b)
	}
	return b, nil
}

// servedBit is the bit of a wildcard binding's lastUsed that is set once
// the binding was served a token (markServed). The use is coarse (a
// second), so its lowest bit is free; keeping the mark in the same word
// keeps a binding at 96 bytes (TestBindingSize).
const servedBit = 1

// useStamp is lastUsed's value for a use at now (unix ns) without the
// served bit: never 0 (0 marks an explicit merchant's binding).
func useStamp(now int64) int64 { return max(now&^servedBit, 2) }

// markServed notes that a wildcard binding was served a token: it is no
// longer evicted before its idle_timeout (evictUnserved). Nothing for an
// explicit merchant's binding; one atomic load once marked.
func (b *binding) markServed() {
	for {
		u := b.lastUsed.Load()
		if u == 0 || u&servedBit != 0 || b.lastUsed.CompareAndSwap(u, u|servedBit) {
			return
		}
	}
}

// served reports whether a wildcard binding was ever served a token.
func (b *binding) served() bool { return b.lastUsed.Load()&servedBit != 0 }

// queueUnserved adds a new wildcard binding to the unserved queue,
// compacting the queue first when it has grown to twice the active
// bindings (so each binding is looked at a bounded number of times, and
// the queue keeps no evicted binding alive for long). Called with t.mu
// held.
func (t *bindingTable) queueUnserved(b *binding) {
	if len(t.unserved) >= 2*int(t.active.Load())+16 {
		kept := t.unserved[:0]
		for _, q := range t.unserved {
			if !q.served() && t.load(q.Merchant) == q {
				kept = append(kept, q)
			}
		}
		clear(t.unserved[len(kept):])
		t.unserved = kept
	}
	t.unserved = append(t.unserved, b)
}

// evictUnserved removes from the table the oldest wildcard binding that
// was never served a token, and reports whether there was one. Its
// merchant's token requests failed, or its first one is still in flight:
// a request holding the binding completes, and a token it gets stays
// cached (until it expires) for the merchant's next request. It is not
// parked: it has no token to keep. Called with t.mu held.
func (t *bindingTable) evictUnserved() bool {
	for len(t.unserved) > 0 {
		b := t.unserved[0]
		t.unserved[0] = nil
		t.unserved = t.unserved[1:]
		if b.served() {
			continue
		}
		s := t.shard(b.Merchant)
		s.mu.Lock()
		in := s.m[b.Merchant] == b
		if in {
			delete(s.m, b.Merchant)
		}
		s.mu.Unlock()
		if !in {
			continue // evicted as idle already
		}
		t.active.Add(-1)
		t.release([]*binding{b})
		return true
	}
	return false
}

// release releases the metrics series that evicted wildcard bindings
// hold. After discard, every binding held was released by it, and those
// made since hold nothing: then it releases nothing. Called with t.mu
// held.
func (t *bindingTable) release(evicted []*binding) {
	if t.held != nil && !t.discarded {
		for _, b := range evicted {
			t.held.releaseMerchant(b.prov.name, b.Merchant)
		}
	}
}

// evictIdle removes the wildcard bindings unused for the wildcard's
// idle_timeout and parks them (park; coming is the merchant whose
// arrival evicts, which keeps its parked token), and notes when the
// oldest one left can first be evicted (lastUsed only grows, and new
// bindings are newer: none is evictable before). Called with t.mu held.
func (t *bindingTable) evictIdle(now int64, br *broker.Broker, coming string) {
	idle := int64(t.reg.Wildcard.IdleTimeout)
	oldest := int64(-1)
	t.scans++
	var evicted []*binding
	for i := range t.shards {
		s := &t.shards[i]
		s.mu.Lock()
		for id, b := range s.m {
			if !b.wild() {
				continue
			}
			if used := b.lastUsed.Load(); now-used > idle {
				delete(s.m, id)
				t.active.Add(-1)
				evicted = append(evicted, b)
			} else if oldest < 0 || used < oldest {
				oldest = used
			}
		}
		s.mu.Unlock()
	}
	t.noIdleUntil = 0
	if oldest >= 0 {
		t.noIdleUntil = oldest + idle + 1
	}
	t.release(evicted)
	t.park(evicted, br, coming)
}

// park keeps an evicted wildcard binding's token cached while it is one
// of the last max_active evicted; the token of a binding that so leaves
// the parked set is dropped from the broker's cache (broker.Drop: this
// process only, not revoked), unless its merchant is in the table again
// or coming back (the merchant being added). Without it the cache would
// hold a token for every merchant id seen within a token's lifetime:
// 1 000 000 ids an hour with one-hour tokens are a million tokens,
// whatever max_active says. The whole batch is parked before any is
// dropped, so that a merchant parked earlier and again in this batch is
// judged by this parking (the order of a batch is the map's, random).
// Called with t.mu held.
func (t *bindingTable) park(evicted []*binding, br *broker.Broker, coming string) {
	if t.lastParked == nil {
		t.lastParked = map[string]uint64{}
	}
	for _, b := range evicted {
		t.parkings++
		t.parked = append(t.parked, parking{b, t.parkings})
		t.lastParked[b.Merchant] = t.parkings
	}
	for len(t.parked) > t.reg.Wildcard.MaxActive {
		old := t.parked[0]
		t.parked[0] = parking{}
		t.parked = t.parked[1:]
		if t.lastParked[old.b.Merchant] != old.n {
			continue // parked again since: its latest parking decides
		}
		delete(t.lastParked, old.b.Merchant)
		if br != nil && old.b.Merchant != coming && t.load(old.b.Merchant) == nil {
			br.Drop(&old.b.Binding)
		}
	}
}

// parking is a parked binding and the number of its parking.
type parking struct {
	b *binding
	n uint64
}

// newPacked returns the binding of an explicit registry merchant, which
// stays in the table as long as its config: a value in the table's slab
// (packed) and its cache key in the broker's slab of keys
// (broker.Binding.Pack), so that the GC marks a chunk rather than two
// objects per warm merchant.
func (t *bindingTable) newPacked(bd *broker.Binding, prov *bindingProvider) *binding {
	b := t.packed.New()
	initBinding(b, bd, prov)
	b.Pack()
	return b
}

// provider returns the table's bindingProvider of a registry provider,
// made on first use. Called with t.mu held.
func (t *bindingTable) provider(name string) *bindingProvider {
	if p := t.provs[name]; p != nil {
		return p
	}
	p := &bindingProvider{name: name}
	if rp := t.reg.Providers[name]; rp != nil {
		p.typ = rp.Type
	}
	if t.provs == nil {
		t.provs = make(map[string]*bindingProvider)
	}
	t.provs[name] = p
	return p
}

// unpin unpins every binding's last served token (broker.Binding.Unpin):
// the table's config is being discarded.
func (t *bindingTable) unpin() {
	t.each(func(_ string, b *binding) { b.Unpin() })
}

// discard releases the metrics series its wildcard bindings hold (see
// held): its config is being discarded. Once for a table shared by
// several handlers; bindings made after it hold none.
func (t *bindingTable) discard() {
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.discarded {
		return
	}
	t.discarded = true
	if t.held == nil {
		return
	}
	t.each(func(_ string, b *binding) {
		if b.wild() {
			t.held.releaseMerchant(b.prov.name, b.Merchant)
		}
	})
}

// tables are the binding tables of a config, by registry and scope set.
type tables struct {
	mu sync.Mutex
	m  map[tableKey]*bindingTable
}

type tableKey struct {
	reg    *config.Registry
	scopes string
}

// table returns the table of reg for the route scopes, shared by every
// handler of the config asking for the same.
func (ts *tables) table(reg *config.Registry, scopes []string, listing *listing.Listing) *bindingTable {
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.m == nil {
		ts.m = map[tableKey]*bindingTable{}
	}
	var key string
	for _, s := range scopes {
		key += s + " "
	}
	k := tableKey{reg, key}
	if t := ts.m[k]; t != nil {
		return t
	}
	t := newBindingTable(reg, scopes, listing)
	ts.m[k] = t
	return t
}
