package config

import (
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
)

// WildcardID is the name of the wildcard merchant table,
// [merchants."*"]: the entry that serves every merchant id the registry
// has no table for.
const WildcardID = "*"

// MerchantPlaceholder is replaced by the merchant id in the string fields
// of the wildcard entry (organisation, scopes, audience), e.g.
// organisation = "{merchant}" when the app sends Nuapay's
// encodedOrganisationId as the merchant id.
const MerchantPlaceholder = "{merchant}"

// Defaults of the wildcard entry.
const (
	// DefaultMaxActive is the default max_active of the wildcard entry.
	DefaultMaxActive = 100_000
	// DefaultIdleTimeout is the default idle_timeout of the wildcard entry.
	DefaultIdleTimeout = 2 * time.Hour
	// DefaultOrganisationsRefresh is the default organisations_refresh.
	DefaultOrganisationsRefresh = 10 * time.Minute
	// maxMaxOrganisations bounds max_organisations.
	maxMaxOrganisations = 10_000_000
)

// Wildcard is a resolved [merchants."*"] table.
type Wildcard struct {
	// Merchant is the template: its Organisation, Scopes and Audience may
	// hold {merchant}. Its ID is "*".
	Merchant
	// MaxActive bounds the merchants served through the wildcard at one
	// time: a new merchant beyond it evicts merchants idle longer than
	// IdleTimeout, or is refused (503) when none is.
	MaxActive int
	// IdleTimeout is how long a merchant served through the wildcard must
	// have gone unused before it can be evicted.
	IdleTimeout time.Duration
	// OnlyListed restricts the wildcard to the organisations that the
	// provider's organisations list (Nuapay GET /organisations, all pages)
	// holds: any other merchant gets 403 without a token request.
	OnlyListed bool
	// OrganisationsRefresh is how often that list is read again.
	OrganisationsRefresh time.Duration
	// MaxOrganisations is the most organisations that list may hold (its
	// pages together may total MaxOrganisations × 1 KiB): a longer list is
	// an error, and the last good list stays in force.
	MaxOrganisations int
}

// wildcardTOML is the [merchants."*"] table: a merchant's keys and its
// own (the Wildcard fields of the same names).
type wildcardTOML struct {
	merchantTOML
	MaxActive               *int      `toml:"max_active"`
	IdleTimeout             *Duration `toml:"idle_timeout"`
	OnlyListedOrganisations bool      `toml:"only_listed_organisations"` // nuapay only
	OrganisationsRefresh    *Duration `toml:"organisations_refresh"`
	MaxOrganisations        *int      `toml:"max_organisations"`
}

// wildcardKeys are the keys of [merchants."*"].
var wildcardKeys = tomlKeys(wildcardTOML{})

// wildcard resolves what the [merchants."*"] table says by itself (see
// merchant); checkWildcard checks it against its provider.
func (p *parser) wildcard(md *toml.MetaData, prim toml.Primitive) (*Wildcard, uint8) {
	var raw wildcardTOML
	e, m, flags := p.merchant(md, WildcardID, prim, &raw, &raw.merchantTOML)
	w := &Wildcard{Merchant: m, MaxActive: DefaultMaxActive, MaxOrganisations: nuapay.DefaultMaxOrganisations}
	if flags != 0 {
		return w, flags
	}
	if raw.MaxActive != nil {
		if w.MaxActive = *raw.MaxActive; w.MaxActive < 1 {
			e.errf("max_active", "%d: must be at least 1", w.MaxActive)
		}
	}
	w.IdleTimeout = e.duration("idle_timeout", raw.IdleTimeout, DefaultIdleTimeout, time.Second, 30*24*time.Hour)
	w.OrganisationsRefresh = e.duration("organisations_refresh", raw.OrganisationsRefresh, DefaultOrganisationsRefresh, 10*time.Second, 24*time.Hour)
	w.OnlyListed = raw.OnlyListedOrganisations
	if raw.OrganisationsRefresh != nil && !w.OnlyListed {
		e.errf("organisations_refresh", "set only with only_listed_organisations = true")
	}
	if raw.MaxOrganisations != nil {
		if w.MaxOrganisations = *raw.MaxOrganisations; w.MaxOrganisations < 1 || w.MaxOrganisations > maxMaxOrganisations {
			e.errf("max_organisations", "%d: must be between 1 and %d", w.MaxOrganisations, maxMaxOrganisations)
		}
		if !w.OnlyListed {
			e.errf("max_organisations", "set only with only_listed_organisations = true")
		}
	}
	for _, f := range []struct{ field, v string }{{"organisation", m.Organisation}, {"audience", m.Audience}, {"scopes", strings.Join(m.Scopes, " ")}} {
		if s := strings.ReplaceAll(f.v, MerchantPlaceholder, ""); strings.ContainsAny(s, "{}") {
			e.errf(f.field, "%q: the only placeholder allowed here is {merchant} ({env.NAME} references are expanded when the file is read)", f.v)
		}
	}
	if e.bad {
		flags |= merchantBad
	}
	return w, flags
}

// checkWildcard checks the wildcard entry against its provider (of
// providers, the valid ones). A provider with grant refresh_token is
// refused: each of its merchants needs a refresh token of its own, and
// consent links, the admin API and the consent states serve only the
// merchants with their own table.
func (p *parser) checkWildcard(w *Wildcard, flags uint8, defined map[string]string, providers map[string]*Provider) {
	if !p.checkMerchant(&w.Merchant, flags, defined) {
		return
	}
	e := p.entry("merchants", WildcardID)
	if w.OnlyListed && defined[w.Provider] != "nuapay" {
		e.errf("only_listed_organisations", "provider %q is of type %s: only nuapay providers list their organisations", w.Provider, defined[w.Provider])
	}
	if pv := providers[w.Provider]; pv != nil {
		if _, ok := pv.RefreshToken(); ok {
			e.errf("provider", "provider %q uses grant %s: each of its merchants needs a refresh token of its own, which consent links and the admin API give only to merchants with their own table, so a merchant served through the wildcard would never get a token: give each merchant of this provider its own [merchants.ID] table, and point the wildcard entry at a provider of another grant or remove it", w.Provider, GrantRefreshToken)
		}
	}
}

// resolve returns the merchant the wildcard entry makes of a merchant id,
// which must be valid (ValidMerchantID): {merchant} replaced by the id.
func (w *Wildcard) resolve(id string) *Merchant {
	m := w.Merchant
	m.ID = id
	m.Organisation = strings.ReplaceAll(m.Organisation, MerchantPlaceholder, id)
	inScopes := slices.ContainsFunc(m.Scopes, func(s string) bool { return strings.Contains(s, MerchantPlaceholder) })
	if inScopes || strings.Contains(m.Audience, MerchantPlaceholder) {
		// The template's Terms are shared: the merchant gets its own.
		t := *m.Terms
		t.Audience = strings.ReplaceAll(t.Audience, MerchantPlaceholder, id)
		if inScopes {
			t.Scopes = slices.Clone(t.Scopes)
			for i, s := range t.Scopes {
				t.Scopes[i] = strings.ReplaceAll(s, MerchantPlaceholder, id)
			}
		}
		m.Terms = &t
	}
	return &m
}

// Merchant returns the merchant with this id: its explicit entry, or the
// wildcard entry resolved for it. ok is false when neither serves it (or
// the id is not a valid merchant id).
func (r *Registry) Merchant(id string) (m *Merchant, wildcard bool, ok bool) {
	if m, ok := r.Merchants[id]; ok {
		return m, false, true
	}
	if r.Wildcard == nil || !ValidMerchantID(id) {
		return nil, false, false
	}
	return r.Wildcard.resolve(id), true, true
}

// sharesProfile reports whether the binding of a merchant resolved from
// the wildcard entry can use a profile shared in the registry: false when
// the entry's audience, or its scopes unless the route's replace them,
// hold {merchant}, so that the registry does not keep one profile per
// merchant id ever seen.
func (w *Wildcard) sharesProfile(routeScopes bool) bool {
	if strings.Contains(w.Audience, MerchantPlaceholder) {
		return false
	}
	return routeScopes || !slices.ContainsFunc(w.Scopes, func(s string) bool { return strings.Contains(s, MerchantPlaceholder) })
}

// profiles are the broker profiles of a registry's bindings, one per
// provider, scope set, audience and lifetime, shared by every merchant
// binding with the same ones. They live as long as the registry.
type profiles struct {
	mu sync.Mutex
	m  map[termsKey]*broker.Profile // by provider name, scopes, lifetime, audience
}

// profile returns the registry's profile of p for the scopes (valid,
// normalised or not), audience and lifetime, made on first use.
func (r *Registry) profile(p *Provider, scopes []string, audience string, lifetime time.Duration) *broker.Profile {
	scopes = broker.NormaliseScopes(scopes)
	k := keyOf(p.Name, scopes, lifetime, audience)
	r.profiles.mu.Lock()
	defer r.profiles.mu.Unlock()
	if pr := r.profiles.m[k]; pr != nil {
		return pr
	}
	if r.profiles.m == nil {
		r.profiles.m = make(map[termsKey]*broker.Profile)
	}
	// A copy of the scopes: the profile outlives the caller's slice (a
	// route's, a handler's configuration).
	pr := p.newProfile(slices.Clone(scopes), audience, lifetime)
	r.profiles.m[k] = pr
	return pr
}

// newProfile is a broker profile of p for the scopes, audience and
// lifetime, which spends p's budget.
func (p *Provider) newProfile(scopes []string, audience string, lifetime time.Duration) *broker.Profile {
	pr := broker.NewProfile(p.ID, p.Source, scopes, audience, lifetime)
	pr.Budget = p.Budget
	return pr
}
