package module

import (
	"errors"
	"strings"
	"sync"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// binding is what the handler knows about one merchant on its route
// (package bindings holds and bounds them).
type binding = bindings.Binding

// bindingTable is the table of a registry's bindings for a route's
// scopes. Every token_broker handler of a config with the same registry
// and route scopes shares one (App.tables).
type bindingTable = bindings.Table

// errUnknownMerchant: the registry has no such merchant and no wildcard.
var errUnknownMerchant = errors.New("unknown merchant")

// newBindingTable returns the empty table of reg for a route's scopes
// (nil: the merchants' own), restricted to listing's organisations when
// it is not nil, on the clock now.
func newBindingTable(reg *config.Registry, scopes []string, listing *orgListing, now func() time.Time) *bindingTable {
	if len(scopes) > 0 {
		// Normalised once here, so that the bindings share this slice.
		scopes = broker.NormaliseScopes(scopes)
	}
	c := bindings.Config{Resolver: registryResolver{reg, scopes}, Now: now}
	if reg.Wildcard != nil {
		c.Limits = bindings.Limits{MaxActive: reg.Wildcard.MaxActive, IdleTimeout: reg.Wildcard.IdleTimeout}
	}
	if listing != nil {
		c.Allow = listing.allowed
	}
	return bindings.New(c)
}

// registryResolver resolves merchant ids in a registry, with the route's
// scopes.
type registryResolver struct {
	reg    *config.Registry
	scopes []string
}

// Resolve implements bindings.Resolver.
func (r registryResolver) Resolve(id string) (*broker.Binding, string, string, bool, error) {
	m, wild, ok := r.reg.Merchant(id)
	if !ok {
		return nil, "", "", false, errUnknownMerchant
	}
	if wild {
		// id is the request's header value: the binding must not keep
		// the request's header strings alive. An explicit merchant's
		// binding gets the registry's own id.
		id = strings.Clone(id)
	}
	bd, err := r.reg.Binding(id, r.scopes)
	if err != nil {
		return nil, "", "", false, err
	}
	typ := ""
	if p := r.reg.Providers[m.Provider]; p != nil {
		typ = p.Type
	}
	return bd, m.Provider, typ, wild, nil
}

// binding returns the binding of a valid merchant id, made on first use;
// a non-nil refusal says why the merchant is not served.
func (h *Handler) binding(id string) (*binding, *refusal) {
	b, err := h.bindings.Get(id, (*tableHooks)(h))
	if err == nil {
		return b, nil
	}
	var lr *listingRefusal
	switch {
	case errors.As(err, &lr):
		return nil, &refusal{code: lr.code, merchant: id}
	case errors.Is(err, bindings.ErrTooManyMerchants):
		return nil, &refusal{code: errcode.TooManyMerchants, merchant: id}
	case errors.Is(err, errUnknownMerchant):
		return nil, &refusal{code: errcode.UnknownMerchant, merchant: id}
	}
	return nil, &refusal{code: errcode.UnknownMerchant, merchant: id, cause: err}
}

// listingRefusal is the organisation listing's refusal of a wildcard
// merchant (orgListing.allows).
type listingRefusal struct{ code errcode.Code }

func (e *listingRefusal) Error() string { return "organisation refused: " + e.code.String() }

// allowed is allows as an error, for bindings.Config.Allow.
func (l *orgListing) allowed(org string) error {
	if code := l.allows(org); code != 0 {
		return &listingRefusal{code: code}
	}
	return nil
}

// tableHooks are a handler's bindings.Hooks: the observer of a new
// binding (its metrics series), their release, and the broker's Drop.
type tableHooks Handler

// Made implements bindings.Hooks: a wildcard binding holds its
// merchant's series when the merchant label is on.
func (th *tableHooks) Made(b *binding, hold bool) bool {
	h := (*Handler)(th)
	hold = hold && h.metrics != nil && h.metrics.tokenMetrics != nil && h.metrics.merchantLabel
	b.Observer = h.observerFor(b, hold)
	return hold
}

// Released implements bindings.Hooks.
func (th *tableHooks) Released(b *binding) {
	th.metrics.series.Release(b.Provider.Name, b.Merchant)
}

// Drop implements bindings.Hooks.
func (th *tableHooks) Drop(b *broker.Binding) { th.broker.Drop(b) }

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
	k := tableKey{reg, strings.Join(scopes, " ")}
	if t := ts.m[k]; t != nil {
		return t
	}
	t := newBindingTable(reg, scopes, listing, time.Now)
	ts.m[k] = t
	return t
}
