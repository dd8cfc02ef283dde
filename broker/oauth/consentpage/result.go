package consentpage

import (
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
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
// result id in that page's URL is 32 random bytes; the store holds, under
// a SHA-256 of the id, the result sealed (AES-256-GCM) with a key derived
// from the id, so the store alone reveals nothing. Safe for concurrent use.
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

// resultKeys returns the store key and the sealing keyring of a result id.
func resultKeys(id string) (string, *seal.Keyring) {
	k := sha256.Sum256([]byte("token_broker consent result key\x00" + id))
	s := sha256.Sum256([]byte("token_broker consent result seal\x00" + id))
	kr, _ := seal.New(s[:]) // a 32-byte key never fails
	return "result/" + hex.EncodeToString(k[:]), kr
}

// Save stores res (its Expires set to now + ResultTTL) and returns its id.
func (rs *Results) Save(ctx context.Context, res Result) (string, error) {
	b := make([]byte, 32)
	_, _ = rand.Read(b) // crypto/rand.Read never fails
	id := base64.RawURLEncoding.EncodeToString(b)
	res.Expires = rs.now().Add(ResultTTL)
	plain, err := json.Marshal(res)
	if err != nil {
		return "", err
	}
	key, kr := resultKeys(id)
	sealed, err := kr.Seal(plain, []byte(key))
	if err != nil {
		return "", fmt.Errorf("sealing the consent result: %w", err)
	}
	if err := rs.Store.Put(ctx, key, sealed, res.Expires); err != nil {
		return "", fmt.Errorf("storing the consent result: %w", err)
	}
	return id, nil
}

// Load returns the result of id, without consuming it; false when there
// is none, it does not open, or it has expired.
func (rs *Results) Load(ctx context.Context, id string) (Result, bool) {
	if id == "" || len(id) > 64 {
		return Result{}, false
	}
	key, kr := resultKeys(id)
	sealed, err := rs.Store.Get(ctx, key)
	if err != nil {
		return Result{}, false
	}
	plain, err := kr.Open(sealed, []byte(key))
	if err != nil {
		return Result{}, false
	}
	var res Result
	if json.Unmarshal(plain, &res) != nil || !rs.now().Before(res.Expires) {
		return Result{}, false
	}
	return res, true
}
