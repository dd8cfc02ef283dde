package consentpage

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// ResultTTL is how long a consent's result page can be shown again (a
// reload, the back button).
const ResultTTL = time.Hour

// Result is the outcome of a callback, kept for its result page.
type Result struct {
	// MerchantID is the merchant whose consent it was.
	MerchantID string `json:"m"`
	// Outcome is "ok" or the refusal reason.
	Outcome string `json:"o"`
	// ProviderCode is the provider's error code of a provider_error.
	ProviderCode string `json:"c,omitempty"`
	// Expires is when the result is no longer shown.
	Expires time.Time `json:"e"`
}

// Results keeps the results of callbacks so that the page a callback
// redirects to shows the same outcome on every load until ResultTTL: the
// result id in that page's URL is 32 random bytes, for which the result
// is sealed (oauth.Sealed), so the store alone reveals nothing. Safe for
// concurrent use.
type Results struct {
	// Store keeps the sealed results (the consent store: keys
	// "result/<hex>").
	Store oauth.PendingStore
	// Now is the clock. Default time.Now.
	Now func() time.Time
}

func (rs *Results) now() time.Time {
	if rs.Now == nil {
		return time.Now()
	}
	return rs.Now()
}

// sealed are the stored results: a result is sealed for its id.
func (rs *Results) sealed() oauth.Sealed {
	return oauth.Sealed{Store: rs.Store, Domain: "token_broker consent result ", Prefix: "result"}
}

// Save stores res (its Expires set to now + ResultTTL) and returns its id.
func (rs *Results) Save(ctx context.Context, res Result) (string, error) {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	id := base64.RawURLEncoding.EncodeToString(b)
	res.Expires = rs.now().Add(ResultTTL)
	if err := rs.sealed().Put(ctx, id, res, res.Expires); err != nil {
		return "", err
	}
	return id, nil
}

// Load returns the result of id, without consuming it. The error wraps
// oauth.ErrUnknownPending when there is none, it does not open, or it
// has expired; another error is the store's (it could not be read: the
// result may be there once it can).
func (rs *Results) Load(ctx context.Context, id string) (Result, error) {
	if id == "" || len(id) > 64 {
		return Result{}, oauth.ErrUnknownPending
	}
	var res Result
	if err := rs.sealed().Get(ctx, id, &res); err != nil {
		return Result{}, err
	}
	if !rs.now().Before(res.Expires) {
		return Result{}, oauth.ErrUnknownPending
	}
	return res, nil
}
