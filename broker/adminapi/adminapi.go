// Package adminapi serves the token broker's admin API (Serve, on the
// paths of Patterns) for the running app as an Instance: the cached
// tokens with their failure policy's state, the operator's view, a
// merchant's tokens purged or revoked, a merchant checked, a merchant's
// refresh token loaded by hand, the partner's organisations, the health
// answer and the consent links. Package module registers the routes
// under Caddy's admin endpoint. Nothing it answers contains a token or a
// secret: tokens are shown by fingerprint, refresh tokens are only said
// to exist.
package adminapi

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Error is a refused admin request: its HTTP status and why.
type Error struct {
	// Status is the HTTP status of the answer.
	Status int
	// Err says why.
	Err error
	// Allow lists the methods the route takes ("GET, POST"), for a 405:
	// Serve sets the Allow header to it.
	Allow string
}

// Error implements error.
func (e *Error) Error() string { return e.Err.Error() }

// Unwrap returns Err.
func (e *Error) Unwrap() error { return e.Err }

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
	// RefreshAt is when the token's refresh-ahead is planned.
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
	// it (no token API call before), if it is in force.
	BackoffUntil *time.Time `json:"backoff_until,omitempty"`
	// Failures counts the key's consecutive failed fetches.
	Failures int `json:"failures,omitempty"`
	// SourceBackoffUntil is until when the key's provider configuration
	// is not called for any key (a 429, or a bad
	// credential), if such a backoff is in force.
	SourceBackoffUntil *time.Time `json:"source_backoff_until,omitempty"`
	// PurgesPausedUntil is until when upstream rejections (401) of the key's
	// token do not purge it: its replacement token was rejected too, so
	// the 401s are not about the token. Absent when purges are not paused.
	PurgesPausedUntil *time.Time `json:"purge_held_until,omitempty"`
	// RejectStrikes counts the key's replacement tokens rejected soon
	// after they were cached (each doubles the pause).
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
	ti.BackoffUntil = opstate.TimePtr(p.BackoffUntil)
	ti.Failures = p.Failures
	ti.SourceBackoffUntil = opstate.TimePtr(p.SourceBackoffUntil)
	ti.PurgesPausedUntil = opstate.TimePtr(p.PurgesPausedUntil)
	ti.RejectStrikes = p.Strikes
	return ti
}

// Tokens are page p of br's cached tokens (those match selects when it
// is not nil, e.g. MerchantTokens), with their failure policy's state,
// sorted by merchant and scopes: every token of the page's merchants
// (p.Limit counts merchants, so one merchant's tokens are never split).
// next is the After of the next page, "" on the last (opstate.Cut).
func Tokens(br *broker.Broker, match func(*broker.Binding) bool, p opstate.Page) (tokens []TokenInfo, next string) {
	entries := matching(br, func(b *broker.Binding) bool { return b.Merchant > p.After && (match == nil || match(b)) })
	key := func(e *broker.Entry) string {
		b := e.Binding()
		return b.Merchant + "\x00" + strings.Join(b.Scopes, " ")
	}
	slices.SortFunc(entries, func(a, b *broker.Entry) int { return strings.Compare(key(a), key(b)) })
	entries, next = opstate.Cut(p, entries, func(e *broker.Entry) string { return e.Binding().Merchant })
	tokens = make([]TokenInfo, 0, len(entries))
	for _, e := range entries {
		tokens = append(tokens, tokenInfo(e).withPolicy(br.Policy(e)))
	}
	return tokens, next
}

// matching returns br's cached tokens whose binding match selects.
func matching(br *broker.Broker, match func(*broker.Binding) bool) []*broker.Entry {
	return slices.DeleteFunc(br.Entries(), func(e *broker.Entry) bool { return !match(e.Binding()) })
}

// RevokeResult is the outcome of revoking one token at its provider.
type RevokeResult struct {
	TokenInfo
	// Revoked is true when the provider confirmed the revocation.
	Revoked bool `json:"revoked"`
	// Error says why the revocation failed (no token or secret in it).
	Error string `json:"error,omitempty"`
	// NotAttempted is true when no revocation was sent for the token:
	// its provider answered 429 to one before it.
	NotAttempted bool `json:"not_attempted,omitempty"`
	// RetryAfterSeconds is the wait, in seconds, that the provider's 429
	// asked for (its Retry-After or rate-limit reset), on the token it
	// answered 429 for and on those not attempted after; absent when it
	// did not say.
	RetryAfterSeconds int `json:"retry_after_seconds,omitempty"`
}

// MerchantTokens matches the cached tokens a merchant is served: those
// of its provider and organisation in each of regs that has it (a token
// can be shared by merchants with the same source, organisation, scopes
// and audience, and a Nuapay revocation without a token id revokes the
// whole organisation), and, for per-merchant sources, its own. A nil
// registry in regs has no merchant.
func MerchantTokens(merchant string, regs ...*config.Registry) func(*broker.Binding) bool {
	type org struct{ sourceID, organisation string }
	var orgs []org
	for _, reg := range regs {
		if reg == nil {
			continue
		}
		if m := reg.Merchants[merchant]; m != nil {
			orgs = append(orgs, org{reg.Providers[m.Provider].ID, m.Organisation})
		}
	}
	return func(b *broker.Binding) bool {
		if b.Merchant == merchant {
			return true
		}
		if !slices.Contains(orgs, org{b.SourceID, b.Organisation}) {
			return false
		}
		pm, ok := b.Source.(broker.PerMerchant)
		return !ok || !pm.PerMerchant()
	}
}

// RevokeEntry revokes e's token at its provider, where the provider
// supports revocation, with the source that fetched it; when that
// source's credential is refused (its API key or client secret rotated
// since), once more with the source current returns for the entry's
// source ID (the provider as configured now), if any. last is the error
// of the last call made to the provider: nil once revoked, and when no
// call was made (a provider that cannot revoke).
func RevokeEntry(ctx context.Context, e *broker.Entry, current func(sourceID string) broker.Source) (res RevokeResult, last error) {
	b := e.Binding()
	rv, ok := b.Source.(broker.Revoker)
	if !ok {
		return NotRevoked(e, "the provider has no revocation endpoint"), nil
	}
	err := rv.RevokeToken(ctx, b.Request(), e.Token())
	last = err
	if err != nil && current != nil && broker.ClassOf(b.Source, err) == broker.ClassCredential {
		src := current(b.SourceID)
		if configured, ok := src.(broker.Revoker); ok && src != b.Source {
			if last = configured.RevokeToken(ctx, b.Request(), e.Token()); last == nil {
				err = nil
			} else {
				err = errors.Join(err, fmt.Errorf("with the provider as configured now: %w", last))
			}
		}
	}
	if err != nil {
		return NotRevoked(e, err.Error()), last
	}
	return RevokeResult{TokenInfo: tokenInfo(e), Revoked: true}, nil
}

// RateLimited reports whether err, a revocation's, is the provider's
// 429, and the wait it asked for (zero when it did not say).
func RateLimited(err error) (wait time.Duration, ok bool) {
	ae, ok := errors.AsType[*broker.APIError](err)
	if !ok || ae.StatusCode != http.StatusTooManyRequests {
		return 0, false
	}
	return ae.RetryAfter, true
}

// Revoke revokes the tokens of entries in order (RevokeEntry), and drops
// each from br's cache and the shared tier (Broker.Purge) once its
// provider answered. Once a provider answers 429, its next entries are
// not sent: they are reported not attempted, and they and the one
// answered 429 stay cached, each with the wait the provider asked for,
// so that the operator revokes them again after it. A provider's other
// failures (5xx) are reported per entry, and its next entries are sent.
func Revoke(ctx context.Context, br *broker.Broker, entries []*broker.Entry, current func(sourceID string) broker.Source) []RevokeResult {
	results := make([]RevokeResult, 0, len(entries))
	held := map[string]int{} // source ID -> the RetryAfterSeconds of its 429
	for _, e := range entries {
		id := e.Binding().SourceID
		if wait, ok := held[id]; ok {
			res := NotRevoked(e, "not attempted: the provider answered 429 to a revocation before it; the token stays cached, revoke it again later")
			res.NotAttempted, res.RetryAfterSeconds = true, wait
			results = append(results, res)
			continue
		}
		res, last := RevokeEntry(ctx, e, current)
		if wait, ok := RateLimited(last); ok {
			res.RetryAfterSeconds = int(math.Ceil(wait.Seconds()))
			held[id] = res.RetryAfterSeconds
		} else {
			br.Purge(ctx, []*broker.Entry{e})
		}
		results = append(results, res)
	}
	return results
}

// NotRevoked is the result of e's token when it is not revoked; reason
// says why (no token or secret in it).
func NotRevoked(e *broker.Entry, reason string) RevokeResult {
	return RevokeResult{TokenInfo: tokenInfo(e), Error: reason}
}

// SetRefreshToken stores the refresh token in r's body,
// {"refresh_token": "..."}, for a merchant of reg whose provider uses
// the refresh_token grant, drops br's cached access tokens of the
// merchant and forgets its remembered consent_required, so that its next
// call refreshes at once. It returns the merchant's provider, the
// refresh token's fingerprint and whether it grants consent (the
// merchant needed consent or had no refresh token; not a routine
// rotation); a refusal is an *Error.
func SetRefreshToken(r *http.Request, reg *config.Registry, br *broker.Broker, merchant string) (provider, fingerprint string, granted bool, err error) {
	if reg == nil {
		return "", "", false, &Error{Status: http.StatusNotFound, Err: errors.New("no merchant registry is loaded")}
	}
	m, ok := reg.Merchants[merchant]
	if !ok {
		return "", "", false, &Error{Status: http.StatusNotFound, Err: fmt.Errorf("merchant %q is not in the registry", merchant)}
	}
	src, ok := reg.Providers[m.Provider].RefreshToken()
	if !ok {
		return "", "", false, &Error{Status: http.StatusConflict,
			Err: fmt.Errorf("merchant %q: provider %q does not use the refresh_token grant", merchant, m.Provider)}
	}
	var body struct {
		RefreshToken string `json:"refresh_token"`
	}
	if err := json.NewDecoder(io.LimitReader(r.Body, 64<<10)).Decode(&body); err != nil || body.RefreshToken == "" {
		return "", "", false, &Error{Status: http.StatusBadRequest, Err: errors.New(`the body must be {"refresh_token": "<token>"} with a non-empty token`)}
	}
	rt := broker.Secret(body.RefreshToken)
	granted = !src.ConsentStatus(merchant).ConsentRequiredSince.IsZero()
	if !granted {
		_, err := src.Store().Load(r.Context(), src.StoreKey(merchant))
		granted = errors.Is(err, oauth.ErrNoRefreshToken)
	}
	if err := src.SetRefreshToken(r.Context(), merchant, rt); errors.Is(err, oauth.ErrInvalidRefreshToken) {
		return "", "", false, &Error{Status: http.StatusBadRequest, Err: fmt.Errorf("merchant %q: the body's refresh_token: %w", merchant, err)}
	} else if err != nil {
		return "", "", false, &Error{Status: http.StatusInternalServerError, Err: fmt.Errorf("storing the refresh token of %q: %w", merchant, err)}
	}
	consentweb.RefreshTokenStored(br, m.Provider, merchant)
	return m.Provider, rt.Fingerprint(), granted, nil
}
