package module

import (
	"net/http"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// bindingTable holds the bindings of one merchant registry for one scope
// set, created on first use: memory follows the merchants actually seen,
// not the size of the registry. Every token_broker handler of a config
// with the same registry and route scopes shares one table (App.table).
//
// A hit is a sync.Map read: no lock, no allocation. A miss (a merchant's
// first request) resolves the merchant in the registry, explicit entry
// first, then the wildcard entry, under the table's lock.
//
// Bindings served through the wildcard are bounded by its max_active: a
// new one evicts those unused for idle_timeout, or is refused (503) when
// none is idle. Eviction only removes a binding from the table: a request
// in flight keeps its pointer, and the token stays in the broker's cache
// until it expires, so a merchant that comes back gets it again without a
// token request.
type bindingTable struct {
	reg     *config.Registry // nil for a table filled by hand (tests)
	scopes  []string         // the route's scopes; nil: the merchants' own
	listing *orgListing      // nil unless the wildcard is restricted
	now     func() time.Time

	m      sync.Map // merchant id -> *binding
	mu     sync.Mutex
	active atomic.Int64 // wildcard bindings in m
	// noIdleUntil (unix ns, under mu) is the first moment a binding can be
	// idle past idle_timeout, as the last eviction scan found it: while the
	// table is full and nobody can be idle yet, a new merchant is refused
	// without walking every binding under the lock.
	noIdleUntil int64
	scans       int // eviction scans, for tests
}

func newBindingTable(reg *config.Registry, scopes []string, listing *orgListing) *bindingTable {
	return &bindingTable{reg: reg, scopes: scopes, listing: listing, now: time.Now}
}

// set stores a binding made by hand (tests, benchmarks).
func (t *bindingTable) set(id string, b *binding) { t.m.Store(id, b) }

// peek returns the binding of a merchant if it exists.
func (t *bindingTable) peek(id string) *binding {
	if v, ok := t.m.Load(id); ok {
		return v.(*binding)
	}
	return nil
}

// each calls f for every binding in the table.
func (t *bindingTable) each(f func(id string, b *binding)) {
	t.m.Range(func(k, v any) bool {
		f(k.(string), v.(*binding))
		return true
	})
}

// touchEvery is the granularity of a wildcard binding's last use: the
// hot path writes the shared word at most this often.
const touchEvery = int64(time.Second)

// get returns the binding of a valid merchant id, creating it on first
// use; a non-nil refusal says why the merchant is not served.
func (t *bindingTable) get(h *Handler, id string) (*binding, *refusal) {
	if v, ok := t.m.Load(id); ok {
		b := v.(*binding)
		if b.wild {
			now := t.now().UnixNano()
			if now-b.lastUsed.Load() >= touchEvery {
				b.lastUsed.Store(now)
			}
			if t.listing != nil {
				if status, code := t.listing.allows(b.Request.Organisation); status != 0 {
					return nil, &refusal{status: status, code: code, merchant: id}
				}
			}
		}
		return b, nil
	}
	return t.create(h, id)
}

func (t *bindingTable) create(h *Handler, id string) (*binding, *refusal) {
	if t.reg == nil {
		return nil, &refusal{status: http.StatusForbidden, code: "unknown_merchant", merchant: id}
	}
	m, wild, ok := t.reg.Merchant(id)
	if !ok {
		return nil, &refusal{status: http.StatusForbidden, code: "unknown_merchant", merchant: id}
	}
	if wild && t.listing != nil {
		if status, code := t.listing.allows(m.Organisation); status != 0 {
			return nil, &refusal{status: status, code: code, merchant: id}
		}
	}
	t.mu.Lock()
	defer t.mu.Unlock()
	if v, ok := t.m.Load(id); ok {
		return v.(*binding), nil
	}
	now := t.now().UnixNano()
	if wild && t.active.Load() >= int64(t.reg.Wildcard.MaxActive) {
		if now >= t.noIdleUntil {
			t.evictIdle(now)
		}
		if t.active.Load() >= int64(t.reg.Wildcard.MaxActive) {
			return nil, &refusal{status: http.StatusServiceUnavailable, code: "too_many_merchants", merchant: id}
		}
	}
	bd, err := t.reg.Binding(id, t.scopes)
	if err != nil {
		return nil, &refusal{status: http.StatusForbidden, code: "unknown_merchant", merchant: id, cause: err}
	}
	b := newBinding(bd, m.Provider)
	if p := t.reg.Providers[m.Provider]; p != nil {
		b.providerType = p.Type
	}
	b.wild = wild
	b.lastUsed.Store(now)
	bd.Observer = h.observerFor(id, b)
	t.m.Store(id, b)
	if wild {
		t.active.Add(1)
	}
	return b, nil
}

// evictIdle removes the wildcard bindings unused for the wildcard's
// idle_timeout, and notes when the oldest one left can first be evicted
// (lastUsed only grows, and new bindings are newer: none is evictable
// before). Called with t.mu held.
func (t *bindingTable) evictIdle(now int64) int {
	idle := int64(t.reg.Wildcard.IdleTimeout)
	n := 0
	oldest := int64(-1)
	t.scans++
	t.m.Range(func(k, v any) bool {
		b := v.(*binding)
		if !b.wild {
			return true
		}
		if used := b.lastUsed.Load(); now-used > idle {
			t.m.Delete(k)
			t.active.Add(-1)
			n++
		} else if oldest < 0 || used < oldest {
			oldest = used
		}
		return true
	})
	t.noIdleUntil = 0
	if oldest >= 0 {
		t.noIdleUntil = oldest + idle + 1
	}
	return n
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
func (ts *tables) table(reg *config.Registry, scopes []string, listing *orgListing) *bindingTable {
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
