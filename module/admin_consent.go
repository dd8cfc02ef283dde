package module

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// ConsentState is a merchant's consent in the admin API: never a token.
type ConsentState struct {
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

func timePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}

// merchants serves GET /token_broker/consent/merchants.
func (adminAPI) merchants(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	out := []ConsentState{}
	if app.registry == nil {
		return writeJSON(w, map[string]any{"merchants": out})
	}
	want := r.URL.Query().Get("provider")
	for id, m := range app.registry.Merchants {
		p := app.registry.Providers[m.Provider]
		src, ok := p.Source.(*oauth.RefreshToken)
		if !ok || want != "" && want != p.Name {
			continue
		}
		_, lerr := src.Store().Load(r.Context(), src.StoreKey(id))
		if lerr != nil && !errors.Is(lerr, oauth.ErrNoRefreshToken) {
			return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("merchant %q: reading the refresh-token store: %w", id, lerr)}
		}
		st := src.ConsentStatus(id)
		out = append(out, ConsentState{Merchant: id, Provider: p.Name, HasRefreshToken: lerr == nil,
			LastRefresh: timePtr(st.LastRefresh), ConsentRequired: lerr != nil || !st.ConsentRequiredSince.IsZero(),
			ConsentRequiredSince: timePtr(st.ConsentRequiredSince), ConsentFlow: p.Consent != nil})
	}
	slices.SortFunc(out, func(a, b ConsentState) int { return strings.Compare(a.Merchant, b.Merchant) })
	return writeJSON(w, map[string]any{"merchants": out})
}

// links serves POST /token_broker/consent/links.
func (adminAPI) links(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use POST")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	var req LinkRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<10)).Decode(&req); err != nil || req.Merchant == "" {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New(`the body must be {"merchant": "...", "return_url": "..."}`)}
	}
	if app.registry == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("merchant %q is not in the registry: the app has none", req.Merchant)}
	}
	link, status, err := createLink(r.Context(), app.registry, req)
	if err != nil {
		setRetryAfter(w, err)
		return caddy.APIError{HTTPStatus: status, Err: err}
	}
	app.logger.Info("consent link created", zapMerchant(req.Merchant), zapProvider(link.Provider))
	return writeJSON(w, link)
}
