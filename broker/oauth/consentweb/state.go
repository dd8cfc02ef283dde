package consentweb

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
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
}

// States are the consent states of the merchants of the registry's
// refresh_token providers (of provider alone when it is not ""), sorted
// by merchant. The error is a failed read of a refresh-token store.
func States(ctx context.Context, reg *config.Registry, provider string) ([]State, error) {
	out := []State{}
	for id, m := range reg.Merchants {
		p := reg.Providers[m.Provider]
		src, ok := p.RefreshToken()
		if !ok || provider != "" && provider != p.Name {
			continue
		}
		_, lerr := src.Store().Load(ctx, src.StoreKey(id))
		if lerr != nil && !errors.Is(lerr, oauth.ErrNoRefreshToken) {
			return nil, fmt.Errorf("merchant %q: reading the refresh-token store: %w", id, lerr)
		}
		st := src.ConsentStatus(id)
		out = append(out, State{Merchant: id, Provider: p.Name, HasRefreshToken: lerr == nil,
			LastRefresh: timePtr(st.LastRefresh), ConsentRequired: lerr != nil || !st.ConsentRequiredSince.IsZero(),
			ConsentRequiredSince: timePtr(st.ConsentRequiredSince), ConsentFlow: p.Consent != nil})
	}
	slices.SortFunc(out, func(a, b State) int { return strings.Compare(a.Merchant, b.Merchant) })
	return out, nil
}

// timePtr is t in UTC, nil when zero.
func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}
