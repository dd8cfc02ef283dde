package callers

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"slices"
	"sync"
	"time"

	"github.com/coreos/go-oidc/v3/oidc"
	jose "github.com/go-jose/go-jose/v4"

	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// callerAlgs are the signature algorithms a caller JWT may use: asymmetric
// only, so "none" and HMAC keyed with a public key are refused.
var callerAlgs = []jose.SignatureAlgorithm{jose.RS256, jose.RS384, jose.RS512, jose.ES256, jose.ES384,
	jose.ES512, jose.PS256, jose.PS384, jose.PS512, jose.EdDSA}

// DefaultKeysRefreshInterval is the default of Config.RefreshInterval.
const DefaultKeysRefreshInterval = 30 * time.Second

// unknownKidGap is the shortest time between two key-set fetches caused
// by a kid not in the cached set (a key rotation at the issuer). It bounds
// what tokens with made-up kids can cost the issuer.
const unknownKidGap = 5 * time.Second

// keysMaxAge is how long fetched keys are used before they are fetched
// again (on the next verification), so a key the issuer withdrew stops
// being trusted.
const keysMaxAge = 5 * time.Minute

// keySet is the caller issuer's signing keys, an oidc.KeySet. Unlike
// go-oidc's RemoteKeySet, which fetches on every failed verification, it
// fetches at most once per interval for a known kid (a forged signature
// costs no outbound call), at most once per unknownKidGap for an unknown
// one, and in the background once its keys are older than keysMaxAge
// (they serve meanwhile). One fetch runs at a time; verifications that
// need it wait for it. Without url it holds jwks_file's keys and never
// fetches. Safe for concurrent use.
type keySet struct {
	// ctx is the policy's context, which ends when the policy is
	// unloaded: the fetches run on it, not on a request's.
	ctx      context.Context
	url      string
	client   *http.Client
	interval time.Duration
	now      func() time.Time

	mu       sync.Mutex
	keys     []jose.JSONWebKey
	fetched  time.Time  // last successful fetch
	tried    time.Time  // last fetch attempt; zero before the first
	inflight *keysFetch // the running fetch; nil when none
}

// keysFetch is a running key-set fetch: its error is set before done is
// closed, for the verifications that wait for it.
type keysFetch struct {
	done chan struct{}
	err  error
}

// errRefreshLimited is a fetch refused by the rate limit.
var errRefreshLimited = errors.New("the issuer's key set was fetched too recently to fetch it again")

// keysUnavailableKey is the context key of a *bool that VerifySignature
// sets when it has no key at all to check a JWT with (the issuer's key set
// could not be fetched): the caller is then told to retry, not that its
// token is bad.
type keysUnavailableKey struct{}

// keysAgedKey is the context key of a *bool that VerifySignature sets when
// it verified a JWT with keys older than keysMaxAge, which are being
// fetched again: the verification is not remembered, so that a key the
// issuer withdrew is not trusted once the fetch ends.
type keysAgedKey struct{}

// mark sets the *bool that ctx carries under key, if it carries one.
func mark(ctx context.Context, key any) {
	if flag, ok := ctx.Value(key).(*bool); ok {
		*flag = true
	}
}

// VerifySignature implements oidc.KeySet. The verifier has checked the
// algorithm; the claims are checked by the verifier after this.
func (k *keySet) VerifySignature(ctx context.Context, jwt string) ([]byte, error) {
	jws, err := jose.ParseSigned(jwt, callerAlgs)
	if err != nil {
		return nil, fmt.Errorf("malformed JWT: %w", err)
	}
	if len(jws.Signatures) != 1 {
		return nil, errors.New("the JWT must carry exactly one signature")
	}
	hdr := jws.Signatures[0].Header
	aged := k.url != "" && k.stale()
	if aged {
		_ = k.refresh(ctx, true, hdr.KeyID) // on failure the cached keys still serve
	}
	if payload, err := verifyWith(k.snapshot(), jws); err == nil {
		if aged {
			mark(ctx, keysAgedKey{})
		}
		return payload, nil
	}
	if k.url == "" {
		return nil, errors.New("no key of jwks_file verifies the JWT's signature")
	}
	if err := k.refresh(ctx, false, hdr.KeyID); err != nil {
		limited := errors.Is(err, errRefreshLimited)
		if k.unavailable(hdr.KeyID, limited) {
			mark(ctx, keysUnavailableKey{})
			return nil, fmt.Errorf("the caller issuer's keys are unavailable: %w", err)
		}
		if limited {
			return nil, errors.New("no cached key of the issuer verifies the JWT's signature")
		}
		return nil, err
	}
	if payload, err := verifyWith(k.snapshot(), jws); err == nil {
		return payload, nil
	}
	return nil, errors.New("no key of the issuer verifies the JWT's signature")
}

// verifyWith checks the signature with the keys of the JWT's kid (all keys
// when it has none).
func verifyWith(keys []jose.JSONWebKey, jws *jose.JSONWebSignature) ([]byte, error) {
	hdr := jws.Signatures[0].Header
	for i := range keys {
		key := &keys[i]
		if (hdr.KeyID != "" && key.KeyID != hdr.KeyID) || (key.Algorithm != "" && key.Algorithm != hdr.Algorithm) {
			continue
		}
		if payload, err := jws.Verify(key); err == nil {
			return payload, nil
		}
	}
	return nil, errors.New("no key verifies the signature")
}

func (k *keySet) snapshot() []jose.JSONWebKey {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.keys
}

// unavailable reports, after a refresh for kid failed (limited: refused
// by the rate limit), whether a JWT of kid cannot be checked: the set has
// no keys, or none for kid and no answer of the issuer (this fetch failed,
// or the last one did). The caller is then told to retry.
func (k *keySet) unavailable(kid string, limited bool) bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.keys) == 0 || !k.knows(kid) && (!limited || k.tried.After(k.fetched))
}

// stale reports whether the fetched keys are too old to be used without
// asking the issuer again.
func (k *keySet) stale() bool {
	k.mu.Lock()
	defer k.mu.Unlock()
	return len(k.keys) > 0 && k.now().Sub(k.fetched) >= keysMaxAge
}

// knows reports whether kid is in the set; a JWT without kid is tried
// against every key, so it counts as known once there are keys. The
// caller holds k.mu.
func (k *keySet) knows(kid string) bool {
	if kid == "" {
		return len(k.keys) > 0
	}
	for _, key := range k.keys {
		if key.KeyID == kid {
			return true
		}
	}
	return false
}

// refresh starts a fetch of the key set if the rate limit allows it, or
// joins the one running, and waits for it as long as ctx allows,
// returning its error. The fetch runs on k.ctx: others may wait for it.
// With aged (keys older than keysMaxAge, which serve meanwhile) it does
// not wait.
func (k *keySet) refresh(ctx context.Context, aged bool, kid string) error {
	k.mu.Lock()
	f := k.inflight
	if f == nil {
		gap := k.interval
		if !aged && !k.knows(kid) {
			gap = min(gap, unknownKidGap)
		}
		now := k.now()
		if !k.tried.IsZero() && now.Sub(k.tried) < gap {
			k.mu.Unlock()
			return errRefreshLimited
		}
		k.tried = now
		f = &keysFetch{done: make(chan struct{})}
		k.inflight = f
		go k.run(k.ctx, f)
	}
	k.mu.Unlock()
	if aged {
		return nil
	}
	select {
	case <-f.done:
		return f.err
	case <-ctx.Done():
		return ctx.Err()
	}
}

// run fetches the key set, bounded to discoveryTimeout, keeps its keys
// when the fetch succeeds, and ends f with the fetch's error.
func (k *keySet) run(ctx context.Context, f *keysFetch) {
	ctx, cancel := context.WithTimeout(ctx, discoveryTimeout)
	defer cancel()
	keys, err := k.fetch(ctx)

	k.mu.Lock()
	if err == nil {
		k.keys, k.fetched = keys, k.now()
	}
	k.inflight = nil
	f.err = err
	close(f.done)
	k.mu.Unlock()
}

// fetch gets and parses the issuer's key set.
func (k *keySet) fetch(ctx context.Context) ([]jose.JSONWebKey, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, k.url, nil)
	if err != nil {
		return nil, fmt.Errorf("caller issuer's key set %s: %w", k.url, err)
	}
	req.Header.Set("Accept", "application/json")
	resp, err := k.client.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching the caller issuer's key set: %w", err)
	}
	defer resp.Body.Close()
	body, tooLarge, err := httpclient.ReadBody(resp.Body)
	if tooLarge {
		err = &httpclient.TooLargeError{Host: req.URL.Host, Status: resp.StatusCode}
	}
	if err != nil {
		return nil, fmt.Errorf("reading the caller issuer's key set %s: %w", k.url, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the caller issuer's key set %s answered %s", k.url, resp.Status)
	}
	keys, err := parseJWKS(body)
	if err != nil {
		return nil, fmt.Errorf("the caller issuer's key set %s: %w", k.url, err)
	}
	return keys, nil
}

// parseJWKS reads a JWK set (RFC 7517), keeping the public signing keys
// and skipping keys of types or algorithms it does not support, as RFC
// 7517 §5 says to. A private key is an error: a key set is public.
func parseJWKS(data []byte) ([]jose.JSONWebKey, error) {
	var raw struct {
		Keys []json.RawMessage `json:"keys"`
	}
	if err := json.Unmarshal(data, &raw); err != nil {
		return nil, fmt.Errorf("not a JWK set: %w", err)
	}
	var keys []jose.JSONWebKey
	for i, r := range raw.Keys {
		var key jose.JSONWebKey
		if err := json.Unmarshal(r, &key); err != nil {
			continue
		}
		if !key.IsPublic() {
			return nil, fmt.Errorf("key %d (kid %q) is a private or symmetric key: a JWK set must hold public keys only", i, key.KeyID)
		}
		if (key.Use != "" && key.Use != "sig") || (key.Algorithm != "" && !slices.Contains(callerAlgs, jose.SignatureAlgorithm(key.Algorithm))) {
			continue
		}
		keys = append(keys, key)
	}
	if len(keys) == 0 {
		return nil, errors.New("no usable signing key (RSA, EC or Ed25519 with use sig)")
	}
	return keys, nil
}

// Interface guard.
var _ oidc.KeySet = (*keySet)(nil)
