package consentweb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// State is a merchant's consent state: never a token.
type State struct {
	// Merchant id.
	Merchant string `json:"merchant"`
	// Provider name.
	Provider string `json:"provider"`
	// HasRefreshToken says whether a refresh token is stored.
	HasRefreshToken bool `json:"has_refresh_token"`
	// LastRefresh is this instance's last successful refresh.
	LastRefresh *time.Time `json:"last_refresh,omitempty"`
	// ConsentRequired is true when the merchant must consent (again).
	ConsentRequired bool `json:"consent_required"`
	// ConsentRequiredSince is when this instance saw the provider refuse
	// the refresh token (invalid_grant) or found none.
	ConsentRequiredSince *time.Time `json:"consent_required_since,omitempty"`
	// ConsentFlow says whether the provider has a consent table (links
	// can be created).
	ConsentFlow bool `json:"consent_flow"`
	// Error says why the merchant's stored refresh token cannot be read
	// (never the token); HasRefreshToken is then false and
	// ConsentRequired says only whether the provider refused it. ""
	// when it can be read or none is stored.
	Error string `json:"error,omitempty"`
}

// CheckProvider returns an error when provider is neither "" nor one of
// reg's refresh_token providers (reg may be nil): it says whether the
// provider is not in the registry or uses another grant, and names the
// refresh_token providers to use instead.
func CheckProvider(reg *config.Registry, provider string) error {
	if provider == "" {
		return nil
	}
	var names []string
	var p *config.Provider
	if reg != nil {
		p = reg.Providers[provider]
		for name, q := range reg.Providers {
			if _, ok := q.RefreshToken(); ok {
				names = append(names, name)
			}
		}
	}
	if _, ok := p.RefreshToken(); ok {
		return nil
	}
	slices.Sort(names)
	what := "use one of " + strings.Join(names, ", ") + ", or leave provider out"
	if len(names) == 0 {
		what = "the registry has no refresh_token provider: leave provider out"
	}
	if p == nil {
		return fmt.Errorf("provider %.64q is not in the registry: %s", provider, what)
	}
	return fmt.Errorf("provider %.64q does not use the refresh_token grant: %s", provider, what)
}

// States are the consent states of page p of the merchants of the
// registry's refresh_token providers (of provider alone when it is not
// ""), sorted by merchant, and the After of the next page ("" on the
// last; opstate.Cut). Only the page's merchants' refresh tokens are read
// from their stores; a merchant whose refresh token cannot be read is
// listed with State.Error.
func States(ctx context.Context, reg *config.Registry, provider string, p opstate.Page) (states []State, next string) {
	var ids []string
	for id, m := range reg.Merchants {
		q := reg.Providers[m.Provider]
		if _, ok := q.RefreshToken(); ok && id > p.After && (provider == "" || provider == q.Name) {
			ids = append(ids, id)
		}
	}
	slices.Sort(ids)
	ids, next = opstate.Cut(p, ids, func(id string) string { return id })
	states = make([]State, 0, len(ids))
	for _, id := range ids {
		q := reg.Providers[reg.Merchants[id].Provider]
		src, _ := q.RefreshToken()
		_, lerr := src.Store().Load(ctx, src.StoreKey(id))
		none := errors.Is(lerr, oauth.ErrNoRefreshToken)
		st := src.ConsentStatus(id)
		row := State{Merchant: id, Provider: q.Name, HasRefreshToken: lerr == nil,
			LastRefresh: opstate.TimePtr(st.LastRefresh), ConsentRequired: none || !st.ConsentRequiredSince.IsZero(),
			ConsentRequiredSince: opstate.TimePtr(st.ConsentRequiredSince), ConsentFlow: q.Consent != nil}
		if lerr != nil && !none {
			row.Error = "its stored refresh token cannot be read: " + lerr.Error()
		}
		states = append(states, row)
	}
	return states, next
}
