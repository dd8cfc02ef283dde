package bindings

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// ErrUnknownMerchant: the registry has no such merchant and no wildcard
// entry.
var ErrUnknownMerchant = errors.New("unknown merchant")

// ForRegistry returns the empty table of reg's merchants for a route's
// scopes (nil: the merchants' own), bounded by reg's wildcard entry, with
// allow as Config.Allow (nil: every organisation), on the clock now.
func ForRegistry(reg *config.Registry, scopes []string, allow func(organisation string) error, now func() time.Time) *Table {
	if len(scopes) > 0 {
		// Normalised once here, so that the bindings share this slice.
		scopes = broker.NormaliseScopes(scopes)
	}
	c := Config{Resolver: registryResolver{reg, scopes}, Allow: allow, Now: now}
	if reg.Wildcard != nil {
		c.Limits = Limits{MaxActive: reg.Wildcard.MaxActive, IdleTimeout: reg.Wildcard.IdleTimeout}
	}
	return New(c)
}

// registryResolver resolves merchant ids in a registry, with the route's
// scopes.
type registryResolver struct {
	reg    *config.Registry
	scopes []string
}

// Resolve implements Resolver.
func (r registryResolver) Resolve(id string) (*broker.Binding, string, string, bool, error) {
	m, wild, ok := r.reg.Merchant(id)
	if !ok {
		return nil, "", "", false, ErrUnknownMerchant
	}
	if wild {
		// m (a copy) has the request's header value as ID: the binding
		// must not keep the request's strings alive.
		m.ID = strings.Clone(m.ID)
	}
	bd, err := r.reg.MerchantBinding(m, r.scopes)
	if err != nil {
		return nil, "", "", false, err
	}
	typ := ""
	if p := r.reg.Providers[m.Provider]; p != nil {
		typ = p.Type
	}
	return bd, m.Provider, typ, wild, nil
}

// Tables are the tables of one configuration, by registry and route
// scopes: every route of the configuration with the same registry and
// scopes shares one. The zero value is ready to use.
type Tables struct {
	mu sync.Mutex
	m  map[tablesKey]*Table
}

// tablesKey names a table of Tables.
type tablesKey struct {
	reg    *config.Registry
	scopes string
}

// Table returns the table of reg for the route scopes (ForRegistry, on
// the wall clock), made by the first caller; allow is the first caller's.
// Scopes are compared as sets (broker.NormaliseScopes).
func (ts *Tables) Table(reg *config.Registry, scopes []string, allow func(organisation string) error) *Table {
	scopes = broker.NormaliseScopes(scopes)
	ts.mu.Lock()
	defer ts.mu.Unlock()
	if ts.m == nil {
		ts.m = map[tablesKey]*Table{}
	}
	k := tablesKey{reg, strings.Join(scopes, " ")}
	if t := ts.m[k]; t != nil {
		return t
	}
	t := ForRegistry(reg, scopes, allow, time.Now)
	ts.m[k] = t
	return t
}

// Bindings returns the bindings of merchant id that the tables of reg
// hold, those of the merchants' own scopes first, then by route scopes.
// A merchant not served yet has none.
func (ts *Tables) Bindings(reg *config.Registry, id string) []*Binding {
	ts.mu.Lock()
	keys := make([]tablesKey, 0, len(ts.m))
	for k := range ts.m {
		if k.reg == reg {
			keys = append(keys, k)
		}
	}
	tables := make([]*Table, 0, len(keys))
	slices.SortFunc(keys, func(a, b tablesKey) int { return strings.Compare(a.scopes, b.scopes) })
	for _, k := range keys {
		tables = append(tables, ts.m[k])
	}
	ts.mu.Unlock()
	var out []*Binding
	for _, t := range tables {
		if b := t.Peek(id); b != nil {
			out = append(out, b)
		}
	}
	return out
}

// Each calls f for every table, in no particular order.
func (ts *Tables) Each(f func(t *Table)) {
	ts.mu.Lock()
	tables := make([]*Table, 0, len(ts.m))
	for _, t := range ts.m {
		tables = append(tables, t)
	}
	ts.mu.Unlock()
	for _, t := range tables {
		f(t)
	}
}
