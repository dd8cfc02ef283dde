package module

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

func init() {
	caddy.RegisterModule(adminAPI{})
}

// current is the running token_broker app, for the admin API.
var current atomic.Pointer[App]

// adminAPI serves the token broker's admin routes under Caddy's admin
// endpoint. Nothing it answers holds a token or a secret: tokens are shown
// by fingerprint, refresh tokens are only said to exist.
//
//	GET  /token_broker/tokens                      cached tokens
//	POST /token_broker/merchants/{id}/purge        drop a merchant's cached tokens
//	POST /token_broker/merchants/{id}/revoke       revoke them at the provider, then drop them
//	GET  /token_broker/providers/{name}/organisations  the partner's organisations (Nuapay)
//	POST /token_broker/providers/{name}/organisations  read again the list restricting the wildcard merchant entry
//	PUT  /token_broker/merchants/{id}/refresh_token {"refresh_token": "..."}: load a merchant's
//	                                               refresh token (authorization-code merchants)
//	GET  /token_broker/health                      readiness: 200 ready, 503 not (health.go)
//	GET  /token_broker/health/live                 liveness: 200 when the app runs
//	POST /token_broker/consent/links               {"merchant": "acme", "return_url": "…", "callback_host": "…"}:
//	                                               a one-time consent link (see Consent)
//	GET  /token_broker/consent/merchants           the merchants of refresh_token providers and their
//	                                               consent state (?provider=NAME to filter)
type adminAPI struct{}

// CaddyModule returns the Caddy module information.
func (adminAPI) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "admin.api.token_broker",
		New: func() caddy.Module { return new(adminAPI) },
	}
}

// Routes returns the admin routes.
func (a adminAPI) Routes() []caddy.AdminRoute {
	return []caddy.AdminRoute{
		{Pattern: "/token_broker/tokens", Handler: caddy.AdminHandlerFunc(a.tokens)},
		{Pattern: "/token_broker/merchants/", Handler: caddy.AdminHandlerFunc(a.merchant)},
		{Pattern: "/token_broker/providers/", Handler: caddy.AdminHandlerFunc(a.provider)},
		{Pattern: "/token_broker/health", Handler: caddy.AdminHandlerFunc(a.health)},
		{Pattern: "/token_broker/health/", Handler: caddy.AdminHandlerFunc(a.health)},
		{Pattern: "/token_broker/consent/links", Handler: caddy.AdminHandlerFunc(a.links)},
		{Pattern: "/token_broker/consent/merchants", Handler: caddy.AdminHandlerFunc(a.merchants)},
	}
}

// TokenInfo describes a cached token in the admin API: never the token.
type TokenInfo struct {
	// Merchant the token is for.
	Merchant string `json:"merchant"`
	// Source is the provider's ID (name#config-hash).
	Source string `json:"source"`
	// Organisation at the provider.
	Organisation string `json:"organisation,omitempty"`
	// Scopes asked for.
	Scopes []string `json:"scopes"`
	// Audience asked for, if any.
	Audience string `json:"audience,omitempty"`
	// Fingerprint is the first 8 hex digits of the token's SHA-256.
	Fingerprint string `json:"fingerprint"`
	// TokenID is the provider's id of the token (Nuapay), if any.
	TokenID string `json:"token_id,omitempty"`
	// Expiry of the token.
	Expiry time.Time `json:"expiry"`
	// RefreshAt is when the token enters its refresh window.
	RefreshAt time.Time `json:"refresh_at"`
	// Origin is where the token came from: "minted" (this instance called
	// the token API) or "shared" (adopted from the shared tier).
	Origin string `json:"origin"`
	// NextRefresh is the earliest time a refresh-ahead may call the token
	// API: RefreshAt, or the end of the key's backoff if later. Only in
	// GET /token_broker/tokens.
	NextRefresh *time.Time `json:"next_refresh,omitempty"`
	// LastRefreshError is the error code (as a request would get it,
	// e.g. token_rate_limited) of the key's last failed fetch, until a
	// fetch succeeds. Never the provider's text.
	LastRefreshError string `json:"last_refresh_error,omitempty"`
	// BackoffUntil is when the key's failure memory stops answering for
	// it (no token API call before), if it holds.
	BackoffUntil *time.Time `json:"backoff_until,omitempty"`
	// Failures counts the key's consecutive failed fetches.
	Failures int `json:"failures,omitempty"`
	// SourceBackoffUntil is until when the key's provider configuration
	// is not called for any key (a 429 with Retry-After, or a bad
	// credential), if such a hold is in force.
	SourceBackoffUntil *time.Time `json:"source_backoff_until,omitempty"`
	// PurgeHeldUntil is until when upstream rejections (401) of the key's
	// token do not purge it: its replacement token was rejected too, so
	// the 401s are not about the token. Absent when no hold is in force.
	PurgeHeldUntil *time.Time `json:"purge_held_until,omitempty"`
	// RejectStrikes counts the key's replacement tokens rejected soon
	// after they were cached (each doubles the hold).
	RejectStrikes int `json:"reject_strikes,omitempty"`
}

func tokenInfo(e *broker.Entry) TokenInfo {
	b, t := e.Binding(), e.Token()
	return TokenInfo{Merchant: b.Merchant, Source: b.SourceID, Organisation: b.Organisation,
		Scopes: b.Scopes, Audience: b.Audience, Fingerprint: t.Fingerprint(),
		TokenID: t.ID, Expiry: t.Expiry.UTC(), RefreshAt: e.RefreshAt().UTC(), Origin: e.Origin()}
}

// withPolicy adds the failure policy's state of the entry's key.
func (ti TokenInfo) withPolicy(p broker.Policy) TokenInfo {
	next := p.NextRefresh.UTC()
	ti.NextRefresh = &next
	if p.LastError != nil {
		ti.LastRefreshError = errcode.Classify(p.LastError).String()
	}
	if !p.BackoffUntil.IsZero() {
		until := p.BackoffUntil.UTC()
		ti.BackoffUntil = &until
	}
	ti.Failures = p.Failures
	if !p.SourceBackoffUntil.IsZero() {
		until := p.SourceBackoffUntil.UTC()
		ti.SourceBackoffUntil = &until
	}
	if !p.PurgeHeldUntil.IsZero() {
		until := p.PurgeHeldUntil.UTC()
		ti.PurgeHeldUntil = &until
	}
	ti.RejectStrikes = p.Strikes
	return ti
}

func running() (*App, error) {
	app := current.Load()
	if app == nil {
		return nil, caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("the token_broker app is not running")}
	}
	return app, nil
}

func (adminAPI) tokens(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	out := []TokenInfo{}
	for _, e := range app.broker.Entries() {
		if m := r.URL.Query().Get("merchant"); m == "" || m == e.Binding().Merchant {
			out = append(out, tokenInfo(e).withPolicy(app.broker.Policy(e)))
		}
	}
	slices.SortFunc(out, func(a, b TokenInfo) int {
		return strings.Compare(a.Merchant+"\x00"+strings.Join(a.Scopes, " "), b.Merchant+"\x00"+strings.Join(b.Scopes, " "))
	})
	return writeJSON(w, map[string]any{"tokens": out})
}

// RevokeResult is the outcome of revoking one token at its provider.
type RevokeResult struct {
	TokenInfo
	// Revoked is true when the provider confirmed the revocation.
	Revoked bool `json:"revoked"`
	// Error says why the revocation failed (no token or secret in it).
	Error string `json:"error,omitempty"`
}

func (adminAPI) merchant(w http.ResponseWriter, r *http.Request) error {
	rest := strings.TrimPrefix(r.URL.Path, "/token_broker/merchants/")
	id, action, ok := strings.Cut(rest, "/")
	if !ok || !config.ValidMerchantID(id) {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("use /token_broker/merchants/{merchant}/purge or /revoke")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	if action == "refresh_token" {
		if r.Method != http.MethodPut {
			return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use PUT")}
		}
		return setRefreshToken(w, r, app, id)
	}
	if r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use POST")}
	}
	match := merchantTokens(app, id)
	switch action {
	case "purge":
		entries := app.broker.PurgeMatching(match)
		return writeJSON(w, map[string]any{"merchant": id, "purged": len(entries)})
	case "revoke":
		entries := app.broker.PurgeMatching(match)
		results := revokeEntries(r.Context(), entries)
		return writeJSON(w, map[string]any{"merchant": id, "results": results})
	}
	return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("unknown action %q: use purge or revoke", action)}
}

// merchantTokens matches the cached tokens a merchant is served: those of
// its provider and organisation (a token can be shared by merchants with
// the same source, organisation, scopes and audience, and a Nuapay
// revocation without a token id revokes the whole organisation), and,
// for per-merchant sources, its own.
func merchantTokens(app *App, merchant string) func(*broker.Binding) bool {
	var m *config.Merchant
	var sourceID string
	if app.registry != nil {
		if m = app.registry.Merchants[merchant]; m != nil {
			sourceID = app.registry.Providers[m.Provider].ID
		}
	}
	return func(b *broker.Binding) bool {
		if b.Merchant == merchant {
			return true
		}
		if m == nil || b.SourceID != sourceID || b.Organisation != m.Organisation {
			return false
		}
		pm, ok := b.Source.(broker.PerMerchant)
		return !ok || !pm.PerMerchant()
	}
}

// revokeEntries revokes each entry's token at its provider, where the
// provider supports revocation.
func revokeEntries(ctx context.Context, entries []*broker.Entry) []RevokeResult {
	results := make([]RevokeResult, 0, len(entries))
	for _, e := range entries {
		res := RevokeResult{TokenInfo: tokenInfo(e)}
		rv, ok := e.Binding().Source.(broker.Revoker)
		if !ok {
			res.Error = "the provider has no revocation endpoint"
		} else if err := rv.RevokeToken(ctx, e.Binding().Request(), e.Token()); err != nil {
			res.Error = err.Error()
		} else {
			res.Revoked = true
		}
		results = append(results, res)
	}
	return results
}

// provider serves GET /token_broker/providers/{name}/organisations: the
// organisations linked to the partner at a Nuapay provider, to find the
// encodedOrganisationId of a new merchant.
func (adminAPI) provider(w http.ResponseWriter, r *http.Request) error {
	name, action, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/token_broker/providers/"), "/")
	if action != "organisations" {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("use /token_broker/providers/{name}/organisations")}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET, or POST to refresh the wildcard's list")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	if r.Method == http.MethodPost {
		return refreshListing(w, r, app, name)
	}
	if app.registry == nil || app.registry.Providers[name] == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("provider %q is not in the registry", name)}
	}
	lister, ok := app.registry.Providers[name].Source.(listing.OrganisationLister)
	if !ok {
		return caddy.APIError{HTTPStatus: http.StatusConflict, Err: fmt.Errorf("provider %q is not a Nuapay provider", name)}
	}
	var orgs []nuapay.Organisation
	if err := lister.EachOrganisation(r.Context(), nuapay.ListLimits{}, func(o nuapay.Organisation) { orgs = append(orgs, o) }); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadGateway, Err: fmt.Errorf("listing the organisations of %q: %w", name, err)}
	}
	return writeJSON(w, map[string]any{"provider": name, "organisations": orgs})
}

// refreshListing serves POST /token_broker/providers/{name}/organisations:
// the organisations list that restricts the wildcard merchant entry is read
// again now. On failure the last good list stays in force (502).
func refreshListing(w http.ResponseWriter, r *http.Request, app *App, name string) error {
	l := app.listing
	if l == nil || l.Provider() != name {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed,
			Err: fmt.Errorf("method not allowed: use GET; POST refreshes the list of a provider that restricts the wildcard merchant entry (only_listed_organisations), which %q does not", name)}
	}
	n, err := l.Refresh(r.Context())
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusBadGateway,
			Err: fmt.Errorf("listing the organisations of %q: %w (the last good list stays in force)", name, err)}
	}
	return writeJSON(w, map[string]any{"provider": name, "organisations": n, "refreshed": true})
}

// setRefreshToken stores the refresh token of a merchant whose provider
// uses the refresh_token grant, drops its cached access tokens and forgets
// its remembered consent_required, so that its next call refreshes at once.
func setRefreshToken(w http.ResponseWriter, r *http.Request, app *App, merchant string) error {
	if app.registry == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: errors.New("no merchant registry is loaded")}
	}
	m, ok := app.registry.Merchants[merchant]
	if !ok {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("merchant %q is not in the registry", merchant)}
	}
	src, ok := app.registry.Providers[m.Provider].Source.(*oauth.RefreshToken)
	if !ok {
		return caddy.APIError{HTTPStatus: http.StatusConflict,
			Err: fmt.Errorf("merchant %q: provider %q does not use the refresh_token grant", merchant, m.Provider)}
	}
	var body struct {
		RefreshToken string `json:"refresh_token"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&body); err != nil || body.RefreshToken == "" ||
		strings.ContainsAny(body.RefreshToken, "\r\n\x00") {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New(`the body must be {"refresh_token": "<token>"} with a non-empty token`)}
	}
	rt := broker.Secret(body.RefreshToken)
	if err := src.SetRefreshToken(r.Context(), merchant, rt); err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: fmt.Errorf("storing the refresh token of %q: %w", merchant, err)}
	}
	app.broker.PurgeMerchant(merchant)
	forgetConsentRequired(app.broker, m.Provider, merchant)
	app.logger.Info("refresh token loaded", zap.String("merchant", merchant), zap.String("provider", m.Provider),
		zap.String("fingerprint", rt.Fingerprint()))
	return writeJSON(w, map[string]any{"merchant": merchant, "provider": m.Provider, "stored": true, "fingerprint": rt.Fingerprint()})
}

func writeJSON(w http.ResponseWriter, v any) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	return json.NewEncoder(w).Encode(v)
}

// Interface guard.
var _ caddy.AdminRouter = adminAPI{}
