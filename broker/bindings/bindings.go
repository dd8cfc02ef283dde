// Package bindings maps merchant ids to their broker bindings, each made
// on the merchant's first request: memory follows the merchants seen, not
// the size of the registry.
//
// A Table holds the bindings of one registry for one set of route
// scopes. A hit is a read lock and a map read, without allocation (for a
// wildcard merchant, also the table's lock at most once a second). The
// merchants served through the registry's wildcard entry are bounded:
//
//   - at most Limits.MaxActive at a time; a new one evicts those unused
//     for Limits.IdleTimeout, else the oldest one never served a token,
//     else it is refused (ErrTooManyMerchants);
//   - the tokens of the last MaxActive merchants evicted for idleness stay
//     cached (parked); an older one's is dropped (Hooks.Drop) unless its
//     merchant is in the table again: at most twice MaxActive tokens.
//
// A request in flight keeps its binding (and its token) when the binding
// is evicted meanwhile.
//
// ForRegistry makes the table of a config.Registry, Tables shares them
// between the routes of a configuration, and Series tracks the
// per-merchant metrics series that the bindings count into.
package bindings

import (
	"container/list"
	"errors"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// ErrTooManyMerchants: the wildcard's active set is full of merchants
// that were served a token and are not idle.
var ErrTooManyMerchants = errors.New("too many wildcard merchants active")

// Resolver finds what serves a merchant id (a registry).
type Resolver interface {
	// Resolve returns the broker binding of a merchant, its provider's
	// name and type, and whether the registry's wildcard entry serves
	// it; an error when the merchant cannot be served. A wildcard
	// binding must not keep the string id (a request's header) alive:
	// it gets a copy.
	Resolve(id string) (bd *broker.Binding, provider, providerType string, wild bool, err error)
}

// Hooks is what a table tells its user about bindings.
type Hooks interface {
	// Made is called, under the table's lock, with a new binding before
	// it is shared (to set its Observer); track says that a wildcard
	// binding may have per-merchant series tracked for it (Series). It
	// reports whether it did: Released is then called on these Hooks when
	// such a binding leaves.
	Made(b *Binding, track bool) (tracked bool)
	// Released is called for a wildcard binding whose series are tracked
	// when it is evicted or its table discarded.
	Released(b *Binding)
	// Drop drops the cached token of a parked binding that leaves the
	// parked set.
	Drop(b *broker.Binding)
	// Evicted is called, under the table's lock, for every wildcard
	// binding evicted from the table (idle, or never served a token),
	// whether its series are tracked or not, so that what is kept per
	// merchant follows the merchants kept.
	Evicted(b *Binding)
}

// Limits bound the merchants served through the wildcard entry.
type Limits struct {
	// MaxActive is the most wildcard merchants in the table at one time.
	MaxActive int
	// IdleTimeout is how long a wildcard merchant must have gone unused
	// before it can be evicted.
	IdleTimeout time.Duration
}

// Provider is a registry provider as its bindings share it.
type Provider struct {
	// Name is the provider's name in the registry; Type its type
	// ("nuapay", "oauth2").
	Name, Type string
	nameValue  any
}

// NameValue is Name as an interface value made once.
func (p *Provider) NameValue() any { return p.nameValue }

// Binding is a merchant's broker binding as a table holds it. Its fields
// are set before it is shared, and never after (but Observer, see
// broker.Binding).
//
// A hit reads wild and the broker binding's first fields: they come
// first.
type Binding struct {
	wild *wildState // nil for an explicit merchant
	broker.Binding
	// Provider is the provider's name and type, shared by the table's
	// bindings of that provider.
	Provider *Provider

	values atomic.Pointer[values] // made on first use (Values)
}

// values are a binding's strings as interface values.
type values struct{ merchant, organisation any }

// Values returns Merchant and Organisation as interface values, boxed on
// the first call only: later calls do not allocate.
func (b *Binding) Values() (merchant, organisation any) {
	v := b.values.Load()
	if v == nil {
		v = &values{b.Merchant, b.Organisation}
		if !b.values.CompareAndSwap(nil, v) {
			v = b.values.Load()
		}
	}
	return v.merchant, v.organisation
}

// Wild reports whether the binding is served through the wildcard entry.
func (b *Binding) Wild() bool { return b.wild != nil }

// wildState is what a wildcard binding has besides a binding.
type wildState struct {
	lastUsed atomic.Int64 // unix ns, coarse (touchEvery)
	served   atomic.Bool
	// Under Table.wmu: the binding's elements in the table's lists, nil
	// when not in them.
	inLRU, inUnserved *list.Element
}

// touchEvery is the granularity of a wildcard binding's last use: a hit
// takes the table's lock at most this often per merchant.
const touchEvery = int64(time.Second)

// Table maps merchant ids to bindings. Make it with New.
type Table struct {
	res    Resolver
	limits Limits
	allow  func(organisation string) error
	now    func() time.Time

	mu sync.RWMutex
	m  map[string]*Binding // merchant id (the binding's own string) -> binding

	wmu       sync.Mutex // serialises creations, evictions, touches; guards what follows
	lru       list.List  // wildcard bindings in the table, most recently used first
	unserved  list.List  // wildcard bindings in the table never served a token, oldest first
	parked    list.List  // wildcard bindings evicted for idleness, oldest first
	parkedBy  map[string]*Binding
	provs     map[string]*Provider
	tracking  Hooks // the hooks that track their bindings' series; nil if none do
	discarded bool
	// block holds the bindings of explicit merchants, which stay as long
	// as the table, blockSize to a heap object.
	block []Binding
}

// blockSize is the number of explicit merchants' bindings in a block.
const blockSize = 256

// Config configures a Table.
type Config struct {
	// Resolver finds what serves a merchant id.
	Resolver Resolver
	// Limits bound the wildcard merchants.
	Limits Limits
	// Allow, when set, is asked about a wildcard merchant's organisation
	// before its binding is made and on every lookup: a non-nil error
	// refuses the merchant, and is returned by Get unchanged.
	Allow func(organisation string) error
	// Now is the clock (time.Now when nil).
	Now func() time.Time
}

// New returns an empty table.
func New(c Config) *Table {
	if c.Now == nil {
		c.Now = time.Now
	}
	return &Table{res: c.Resolver, limits: c.Limits, allow: c.Allow, now: c.Now,
		m: map[string]*Binding{}, parkedBy: map[string]*Binding{}, provs: map[string]*Provider{}}
}

// Get returns the binding of a merchant id, making it on first use. A
// wildcard merchant's lookup that Allow refuses is no use of its binding:
// it goes idle, and makes room for another merchant.
func (t *Table) Get(id string, h Hooks) (*Binding, error) {
	if b := t.Peek(id); b != nil {
		if b.wild != nil {
			if t.allow != nil {
				if err := t.allow(b.Organisation); err != nil {
					return nil, err
				}
			}
			if now := t.now().UnixNano(); now-b.wild.lastUsed.Load() >= touchEvery {
				t.touch(b, now)
			}
		}
		return b, nil
	}
	return t.create(id, h)
}

// Peek returns the binding of a merchant if the table has it.
func (t *Table) Peek(id string) *Binding {
	t.mu.RLock()
	b := t.m[id]
	t.mu.RUnlock()
	return b
}

// HoldsMerchant reports whether the table holds a binding of the
// merchant, and whether that binding is a wildcard merchant's (false when
// it holds none). Only wildcard merchants' bindings are ever evicted.
func (t *Table) HoldsMerchant(id string) (held, wild bool) {
	b := t.Peek(id)
	return b != nil, b != nil && b.wild != nil
}

// Each calls f for every binding in the table, under its read lock: f
// must not change the table.
func (t *Table) Each(f func(id string, b *Binding)) {
	t.mu.RLock()
	defer t.mu.RUnlock()
	for id, b := range t.m {
		f(id, b)
	}
}

// Served notes that b was served a token: a wildcard binding is then no
// longer evicted before its idle timeout. One atomic load once noted.
func (t *Table) Served(b *Binding) {
	w := b.wild
	if w == nil || w.served.Load() {
		return
	}
	t.wmu.Lock()
	defer t.wmu.Unlock()
	w.served.Store(true)
	if w.inUnserved != nil {
		t.unserved.Remove(w.inUnserved)
		w.inUnserved = nil
	}
}

// touch notes a use of a wildcard binding at now (unix ns).
func (t *Table) touch(b *Binding, now int64) {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	b.wild.lastUsed.Store(now)
	if e := b.wild.inLRU; e != nil {
		t.lru.MoveToFront(e)
	}
}

func (t *Table) create(id string, h Hooks) (*Binding, error) {
	bd, provider, providerType, wild, err := t.res.Resolve(id)
	if err != nil {
		return nil, err
	}
	if wild && t.allow != nil {
		if err := t.allow(bd.Organisation); err != nil {
			return nil, err
		}
	}
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if b := t.Peek(id); b != nil {
		return b, nil
	}
	now := t.now().UnixNano()
	if wild && t.lru.Len() >= t.limits.MaxActive {
		t.evictIdle(now, h, id)
		if t.lru.Len() >= t.limits.MaxActive && !t.evictUnserved(h) {
			return nil, ErrTooManyMerchants
		}
	}
	var b *Binding
	if wild {
		b = new(Binding) // evicted at any time: an object of its own
	} else {
		if len(t.block) == cap(t.block) {
			t.block = make([]Binding, 0, blockSize)
		}
		t.block = t.block[:len(t.block)+1]
		b = &t.block[len(t.block)-1]
	}
	b.Provider = t.provider(provider, providerType)
	b.InitFor(bd.Profile, bd.Merchant, bd.Organisation)
	b.Observer = bd.Observer
	if wild {
		b.wild = &wildState{}
		b.wild.lastUsed.Store(now)
	}
	if h.Made(b, wild && !t.discarded) {
		t.tracking = h
	}
	t.mu.Lock()
	t.m[b.Merchant] = b
	t.mu.Unlock()
	if wild {
		b.wild.inLRU = t.lru.PushFront(b)
		b.wild.inUnserved = t.unserved.PushBack(b)
	}
	return b, nil
}

// provider returns the table's Provider of that name, made on first use.
// Called with t.wmu held.
func (t *Table) provider(name, typ string) *Provider {
	p := t.provs[name]
	if p == nil {
		p = &Provider{Name: name, Type: typ, nameValue: name}
		t.provs[name] = p
	}
	return p
}

// remove takes a wildcard binding out of the table and its lists. Called
// with t.wmu held.
func (t *Table) remove(b *Binding) {
	t.mu.Lock()
	if t.m[b.Merchant] == b {
		delete(t.m, b.Merchant)
	}
	t.mu.Unlock()
	w := b.wild
	if w.inLRU != nil {
		t.lru.Remove(w.inLRU)
		w.inLRU = nil
	}
	if w.inUnserved != nil {
		t.unserved.Remove(w.inUnserved)
		w.inUnserved = nil
	}
}

// evictIdle evicts the wildcard bindings unused for the idle timeout and
// parks them (coming is the merchant whose arrival evicts: its parked
// token is kept). Called with t.wmu held.
func (t *Table) evictIdle(now int64, h Hooks, coming string) {
	var evicted []*Binding
	for e := t.lru.Back(); e != nil; e = t.lru.Back() {
		b := e.Value.(*Binding)
		if now-b.wild.lastUsed.Load() <= int64(t.limits.IdleTimeout) {
			break
		}
		t.remove(b)
		evicted = append(evicted, b)
	}
	t.evicted(evicted, h)
	t.park(evicted, h, coming)
}

// evictUnserved evicts the oldest wildcard binding never served a token,
// and reports whether there was one. It is not parked: it has no token
// to keep (a token its request in flight gets stays cached until it
// expires). Called with t.wmu held.
func (t *Table) evictUnserved(h Hooks) bool {
	e := t.unserved.Front()
	if e == nil {
		return false
	}
	b := e.Value.(*Binding)
	t.remove(b)
	t.evicted([]*Binding{b}, h)
	return true
}

// evicted tells the hooks tracking series that evicted bindings left
// (after Discard, nothing is tracked), then h that they were evicted.
// Called with t.wmu held.
func (t *Table) evicted(bs []*Binding, h Hooks) {
	for _, b := range bs {
		if t.tracking != nil && !t.discarded {
			t.tracking.Released(b)
		}
		h.Evicted(b)
	}
}

// park keeps the tokens of the last MaxActive bindings evicted for
// idleness cached; the token of one that so leaves the parked set is
// dropped (h.Drop), unless its merchant is in the table again, is the one
// coming, or was parked again since (its latest parking decides). The
// whole batch is parked before any token is dropped. Called with t.wmu
// held.
func (t *Table) park(evicted []*Binding, h Hooks, coming string) {
	for _, b := range evicted {
		t.parked.PushBack(b)
		t.parkedBy[b.Merchant] = b
	}
	for t.parked.Len() > t.limits.MaxActive {
		old := t.parked.Remove(t.parked.Front()).(*Binding)
		if t.parkedBy[old.Merchant] != old {
			continue
		}
		delete(t.parkedBy, old.Merchant)
		if old.Merchant != coming && t.Peek(old.Merchant) == nil {
			h.Drop(&old.Binding)
		}
	}
}

// Discard tells the hooks tracking series that every wildcard binding
// left (the table's configuration is being discarded). Bindings made
// afterwards have none tracked. Once for a table shared by several users.
func (t *Table) Discard() {
	t.wmu.Lock()
	defer t.wmu.Unlock()
	if t.discarded {
		return
	}
	if t.tracking != nil {
		for e := t.lru.Front(); e != nil; e = e.Next() {
			t.tracking.Released(e.Value.(*Binding))
		}
	}
	t.discarded = true
}
