// Package opstate is the operator's view of a token broker: the state of
// each provider and each merchant (whether it can get a token, and if not
// why), the shared tier's health, and the events someone must act on. A
// Tracker, fed by the handlers' observers, keeps what was seen and emits
// the events; Build makes the report of a query (GET /token_broker/state)
// and Collector the gauges, both from Sources. It never holds or shows a
// token or a secret.
package opstate

import (
	"slices"
	"time"
)

// States of a merchant, worst first. A merchant with several cache keys
// (route scopes, audiences) takes the worst state of its keys, including
// a key it shares with other merchants (one organisation at a provider,
// or a provider without organisations).
const (
	// StateRefused: the provider refused the credentials (invalid API key
	// or client, token_refused), for this merchant's request or, while
	// its provider backs off after such a refusal, for another's.
	StateRefused = "refused"
	// StateUnknownOrganisation: the provider does not know the merchant's
	// organisation.
	StateUnknownOrganisation = "unknown_organisation"
	// StateNeedsConsent: the merchant must grant consent (again) at its
	// bank: no refresh token, or the provider refused it.
	StateNeedsConsent = "needs_consent"
	// StateBackingOff: the last token request failed (provider down, rate
	// limited, bad answer) and the key is in failure memory; or, for a
	// merchant without a token, its provider's breaker is open or it
	// backs off after a 429.
	StateBackingOff = "backing_off"
	// StateRefreshing: a cached token is in its refresh window, past the
	// point its refresh-ahead was planned for (broker.Token.RefreshAt).
	StateRefreshing = "refreshing"
	// StateFresh: a cached token outside its refresh window.
	StateFresh = "fresh"
	// StateIdle: no cached token and nothing wrong (never asked for, or
	// its token expired unused).
	StateIdle = "idle"
)

// stateOrder holds the merchant states, worst first: a state's rank is
// its index.
var stateOrder = [...]string{StateRefused, StateUnknownOrganisation, StateNeedsConsent, StateBackingOff, StateRefreshing, StateFresh, StateIdle}

// States returns the merchant states, worst first.
func States() []string {
	return slices.Clone(stateOrder[:])
}

// Events emitted through Caddy's events app for what someone must act on.
// Their data names the merchant, the provider, the error code and the
// merchant's state, never a token or a secret (EventData keeps only
// those).
const (
	// EventConsentNeeded: a merchant needs consent (data: merchant,
	// provider, error, state: StateNeedsConsent).
	EventConsentNeeded = "merchant_consent_needed"
	// EventConsentGranted: a merchant completed consent (data: merchant,
	// provider).
	EventConsentGranted = "merchant_consent_granted"
	// EventTokenRefused: a provider refused a merchant's token request for
	// good (data: merchant, provider, error, state: StateRefused for
	// invalid credentials, StateUnknownOrganisation for an organisation
	// the provider does not know).
	EventTokenRefused = "merchant_token_refused"
	// EventProviderFailing: a provider's token API fails: its breaker
	// opened, or it is backing off (data: provider, error).
	EventProviderFailing = "provider_failing"
	// EventProviderRecovered: a failing provider answers again (data:
	// provider).
	EventProviderRecovered = "provider_recovered"
	// EventFleetDown: the shared (Redis) tier is unavailable (data: error,
	// the kind of failure: "timeout", "refused" or "error").
	EventFleetDown = "fleet_tier_down"
	// EventFleetRecovered: the shared tier answers again.
	EventFleetRecovered = "fleet_tier_recovered"
	// EventRefreshBehind: a merchant's planned refresh could not get its
	// provider's token-request budget before the token's end: the key
	// goes cold, and its next caller waits for a token or gets 503
	// budget_exhausted (data: merchant, provider, error:
	// "budget_exhausted"). Once per token.
	EventRefreshBehind = "refresh_behind_plan"
)

// EventData returns what an event may carry of data: the keys
// "merchant", "provider", "error" and "state" with non-empty string
// values, and nothing else, so that no token or secret can reach an
// event.
func EventData(data map[string]any) map[string]any {
	kept := make(map[string]any, len(data))
	for k, v := range data {
		switch k {
		case "merchant", "provider", "error", "state":
			if s, ok := v.(string); ok && s != "" {
				kept[k] = s
			}
		}
	}
	return kept
}

// Query selects the merchants of a Report.
type Query struct {
	// Provider keeps the merchants of this provider only ("" for all).
	Provider string
	// State keeps the merchants in this state only ("" for all).
	State string
	// Page is the page of the selected merchants.
	Page
}

// Report is the answer of GET /token_broker/state.
type Report struct {
	// GeneratedAt is when the report was made.
	GeneratedAt time.Time `json:"generated_at"`
	// Providers are every provider of the registry, by name.
	Providers []Provider `json:"providers"`
	// Fleet is the shared tier's health, nil when none is configured.
	Fleet *Fleet `json:"fleet,omitempty"`
	// Counts are the merchants by state, over every merchant matching the
	// query's provider (not only this page).
	Counts map[string]int `json:"counts"`
	// Total is how many merchants match the query (provider and state).
	Total int `json:"total"`
	// Merchants is one page of the matching merchants, sorted by id.
	Merchants []Merchant `json:"merchants"`
	// Next is the After of the next page; absent on the last page.
	Next string `json:"next,omitempty"`
	// RecordsDropped counts the records of merchants whose token
	// requests failed that the operator's view dropped, since the broker
	// started, to stay within its bound (DefaultMaxMerchants): a wildcard
	// merchant's first. Such a merchant shows no last error, and its
	// failure's event may be emitted again.
	RecordsDropped uint64 `json:"records_dropped"`
}

// Provider is the state of one provider's token API.
type Provider struct {
	// Name is the provider's name in the registry.
	Name string `json:"name"`
	// Type is its token API type ("nuapay", "oauth2").
	Type string `json:"type"`
	// Status sums it up: "ok", "failing" (its last call within Window
	// failed for a reason of the provider's, not a refusal of one
	// merchant; or its breaker is half-open), "backing_off" (not called
	// for any key until BackoffUntil) or "open" (breaker open).
	Status string `json:"status"`
	// Breaker is the circuit breaker's state: closed, half-open, open.
	Breaker string `json:"breaker"`
	// BackoffUntil is until when the token API is not called for any key.
	BackoffUntil *time.Time `json:"backoff_until,omitempty"`
	// LastError is the error code of the last failed token request.
	LastError string `json:"last_error,omitempty"`
	// LastErrorAt is when it happened.
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
	// Requests counts token API calls over the last Window.
	Requests int `json:"requests"`
	// Failures counts the failed ones.
	Failures int `json:"failures"`
	// Window is the span Requests and Failures cover, e.g. "5m0s".
	Window string `json:"window"`
	// Merchants counts the provider's merchants in the registry (explicit)
	// and the wildcard's active ones.
	Merchants int `json:"merchants"`
	// DPoP is the key the provider's tokens are bound to (RFC 9449); nil
	// for bearer tokens.
	DPoP *DPoPKey `json:"dpop,omitempty"`
	// Budget is the provider's token-request budget; absent without
	// rate_limit.
	Budget *Budget `json:"budget,omitempty"`
}

// DPoPKey is a provider's DPoP key as the operator sees it: its public
// side only.
type DPoPKey struct {
	// Alg is the proofs' algorithm: ES256, PS256 or EdDSA.
	Alg string `json:"alg"`
	// JKT is the key's RFC 7638 SHA-256 thumbprint, base64url: the
	// cnf.jkt of the tokens bound to it.
	JKT string `json:"jkt"`
}

// Budget is the state of a provider's token-request budget (rate_limit).
type Budget struct {
	// Rate is the configured rate in requests per second: this sidecar's
	// share without Redis, the fleet's with it.
	Rate float64 `json:"rate"`
	// Burst is the configured burst.
	Burst int `json:"burst"`
	// Effective is the rate in force: Rate, or lower while the provider's
	// rate-limit headers say so (0 while they say nothing is left).
	Effective float64 `json:"effective"`
	// LoweredUntil is when the provider's lowering ends.
	LoweredUntil *time.Time `json:"lowered_until,omitempty"`
	// Remaining is how many requests the bucket held at its last answer.
	Remaining int `json:"remaining"`
	// Waiting is how many callers wait for their turn now.
	Waiting int `json:"waiting"`
	// Used counts the token requests it served.
	Used uint64 `json:"used"`
	// Exhausted counts the token requests it refused (a caller got 503
	// budget_exhausted, or a refresh waits).
	Exhausted uint64 `json:"exhausted"`
	// RefreshesBehind counts the planned refreshes that could not get
	// budget before their token's end (EventRefreshBehind).
	RefreshesBehind int `json:"refreshes_behind"`
}

// Fleet is the shared tier's health.
type Fleet struct {
	// Up is false while Redis is unavailable (the broker mints alone).
	Up bool `json:"up"`
	// Since is when Up last changed.
	Since *time.Time `json:"since,omitempty"`
	// LastError is the last Redis failure (no address credentials in it).
	LastError string `json:"last_error,omitempty"`
	// LastErrorAt is when it happened.
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
}

// Merchant is the state of one merchant.
type Merchant struct {
	// Merchant is the merchant id.
	Merchant string `json:"merchant"`
	// Provider is its provider's name.
	Provider string `json:"provider"`
	// Organisation is its organisation at the provider, if any.
	Organisation string `json:"organisation,omitempty"`
	// Wildcard is true for a merchant served by the [merchants."*"] entry.
	Wildcard bool `json:"wildcard,omitempty"`
	// State is one of States.
	State string `json:"state"`
	// LastError is the error code of its last failed token request, kept
	// after a success until another failure replaces it.
	LastError string `json:"last_error,omitempty"`
	// LastErrorAt is when it happened.
	LastErrorAt *time.Time `json:"last_error_at,omitempty"`
	// Expiry is the earliest expiry of its cached tokens, if any.
	Expiry *time.Time `json:"expiry,omitempty"`
	// BackoffUntil is until when its token requests answer the remembered
	// error without calling the token API.
	BackoffUntil *time.Time `json:"backoff_until,omitempty"`
}

// TimePtr is t in UTC, nil when zero: an optional time of a report, and
// of the admin answers that show times as it does (omitted when unset).
func TimePtr(t time.Time) *time.Time {
	if t.IsZero() {
		return nil
	}
	u := t.UTC()
	return &u
}
