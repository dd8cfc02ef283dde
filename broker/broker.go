// Package broker is the core of the token broker: it obtains access tokens
// from providers' token APIs (Sources), caches them per (source,
// organisation, scopes, audience, lifetime; and merchant, for a
// PerMerchant source), runs one fetch per key at a time, and refreshes
// tokens ahead of their expiry so that requests do not wait. Every call to
// a token API goes through one failure policy (policy.go); each source
// classifies its own errors (Classifier). It does not import Caddy.
package broker

import (
	"context"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	gocache "github.com/patrickmn/go-cache"
	"golang.org/x/sync/singleflight"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// Origins of a cached token (Entry.Origin).
const (
	// OriginMinted: this broker called the token API for it.
	OriginMinted = "minted"
	// OriginShared: adopted from the shared tier (Options.Shared).
	OriginShared = "shared"
)

// Entry is a cached token with the Authorization header value built once.
// Entries are immutable once cached, apart from their refresh bookkeeping.
// The fields a cache hit reads come first, within one 64-byte cache line.
type Entry struct {
	// header is "Bearer " or "DPoP " + the token; the token's value is a
	// slice of it, and id shares its allocation (headerAndID).
	header string
	expiry time.Time
	// issuedBefore, refreshBefore and cachedBefore are the token's
	// IssuedAt, RefreshAt and when the entry was built, as durations
	// before expiry (expiry.Add(-d) keeps expiry's monotonic reading).
	refreshBefore time.Duration
	binding       *Binding
	stale         atomic.Bool // replaced by a newer token, or purged
	// refreshing: a refresh-ahead of this entry is in flight.
	refreshing atomic.Bool
	// deferred: its budget deferred a refresh-ahead of it.
	deferred atomic.Bool
	// sharedAcross: served to another merchant's binding: Drop keeps it.
	sharedAcross atomic.Bool
	// behind: the Observer was told its refresh is behind (RefreshBehind).
	behind      atomic.Bool
	adopted     bool // OriginShared, else OriginMinted
	scopesAsked bool // granted scopes are the binding's

	issuedBefore, cachedBefore time.Duration
	id                         string // the provider's identifier of the token
	// fingerprint is the token's fingerprint as a string in an interface
	// value, made on first use: handed out as `any` without allocating.
	fingerprint atomic.Value
	// ath is the ath claim of the token's DPoP proofs, made on first use.
	ath atomic.Pointer[string]
	// grant is set when the type is not Bearer or the granted scopes are
	// neither none nor (scopesAsked) the binding's.
	grant *grant
}

// grant is a token type and granted scopes.
type grant struct {
	typ    string
	scopes []string
}

// Token returns the cached token. Its Scopes are shared with the entry:
// never modify them.
func (e *Entry) Token() Token {
	g := grant{typ: bearerType}
	if e.grant != nil {
		g = *e.grant
	}
	if e.scopesAsked {
		g.scopes = e.binding.Scopes
	}
	return Token{Value: e.value(), Type: g.typ, Expiry: e.expiry, ID: e.id, Scopes: g.scopes, IssuedAt: e.expiry.Add(-e.issuedBefore), RefreshAt: e.RefreshAt()}
}

// cachedAt is when the entry was built.
func (e *Entry) cachedAt() time.Time { return e.expiry.Add(-e.cachedBefore) }

// value is the token itself.
func (e *Entry) value() Secret { return Secret(e.header[e.prefixLen():]) }

// prefixLen is the length of the scheme that starts e.header.
func (e *Entry) prefixLen() int {
	if strings.HasPrefix(e.header, dpopPrefix) {
		return len(dpopPrefix)
	}
	return len(bearerPrefix)
}

// validAt is Token().ValidAt without building the Token.
func (e *Entry) validAt(now time.Time, leeway time.Duration) bool {
	return len(e.header) > e.prefixLen() && now.Add(leeway).Before(e.expiry)
}

// Header returns the value of the Authorization header: "Bearer <token>",
// or "DPoP <token>" for a DPoP-bound token (RFC 9449 §7.1), sent with a
// proof of its profile's key. It does not allocate.
func (e *Entry) Header() string { return e.header }

// Fingerprint is the token's fingerprint (Fingerprint of its value),
// computed once per token. It does not allocate after its first call.
func (e *Entry) Fingerprint() string { return e.FingerprintValue().(string) }

// FingerprintValue is Fingerprint as an interface value holding a string,
// made on the first call: it does not allocate after that.
func (e *Entry) FingerprintValue() any {
	if v := e.fingerprint.Load(); v != nil {
		return v
	}
	e.fingerprint.CompareAndSwap(nil, e.value().Fingerprint())
	return e.fingerprint.Load()
}

// ATH is the ath claim of a DPoP proof that accompanies the token
// (dpop.ATH), computed once per token.
func (e *Entry) ATH() string {
	if p := e.ath.Load(); p != nil {
		return *p
	}
	a := dpop.ATH(string(e.value()))
	e.ath.CompareAndSwap(nil, &a)
	return *e.ath.Load()
}

// RefreshAt is when a lookup starts the entry's refresh-ahead.
func (e *Entry) RefreshAt() time.Time { return e.expiry.Add(-e.refreshBefore) }

// Origin says where the token came from: OriginMinted or OriginShared.
func (e *Entry) Origin() string {
	if e.adopted {
		return OriginShared
	}
	return OriginMinted
}

// unpin unsets e as the last served entry of the binding it was fetched
// for, so that an idle binding does not keep a dropped token in memory.
func (e *Entry) unpin() {
	if e.binding != nil {
		e.binding.current.CompareAndSwap(e, nil)
	}
}

// Binding returns the binding the entry's token was fetched for.
func (e *Entry) Binding() *Binding { return e.binding }

// Broker caches tokens and fetches them from Sources. It is safe for
// concurrent use. One Broker serves any number of sources and bindings.
type Broker struct {
	opts  Options
	cache *gocache.Cache
	group singleflight.Group

	mu      sync.Mutex          // orders cache writes with the compare-and-delete of Reject
	pol     policy              // the failure policy (policy.go)
	flights map[string]*flight  // key -> its fetch in flight (inflight.go); guarded by mu
	waiting map[string]int      // key -> lookups waiting for its fetch (inflight.go); guarded by mu
	purging map[string][]string // key -> fingerprints being purged from the shared tier; guarded by mu

	stopPurges func() // unregisters dropShared from the shared tier (nil without one)
}

// New returns a Broker. Call Close when done with it.
func New(opts Options) *Broker {
	opts = opts.withDefaults()
	br := &Broker{opts: opts, cache: gocache.New(gocache.NoExpiration, cleanupInterval),
		flights: map[string]*flight{}, waiting: map[string]int{}, purging: map[string][]string{}}
	br.cache.OnEvicted(func(_ string, v any) { v.(*Entry).unpin() })
	br.pol = newPolicy(&br.opts)
	if opts.Shared != nil {
		br.stopPurges = opts.Shared.OnPurge(br.dropShared)
	}
	return br
}

// Close drops every cached token and stops hearing the shared tier's
// purges. Fetches in flight finish on their own.
func (br *Broker) Close() {
	if br.stopPurges != nil {
		br.stopPurges()
	}
	br.mu.Lock()
	defer br.mu.Unlock()
	for _, it := range br.cache.Items() {
		e := it.Object.(*Entry)
		e.stale.Store(true)
		e.unpin()
	}
	br.cache.Flush()
}

// Now reads the broker's clock (Options.Now).
func (br *Broker) Now() time.Time { return br.opts.Now() }

// Sleep waits d on the broker's clock (Options.Sleep), or until ctx ends
// and then returns ctx's error.
func (br *Broker) Sleep(ctx context.Context, d time.Duration) error { return br.opts.Sleep(ctx, d) }

// newEntry builds the cache entry of a token, refreshed at its RefreshAt
// (planned here when zero or when refresh-ahead is off).
func (br *Broker) newEntry(b *Binding, tok Token, origin string) *Entry {
	header, id := headerAndID(tok)
	refresh := tok.RefreshAt
	if refresh.IsZero() || !refresh.Before(tok.Expiry) || br.opts.RefreshWindow <= 0 {
		refresh = br.planRefresh(b, tok, false)
	} else {
		// An adopted token's plan is kept within the refresh window.
		if start := br.refreshAt(tok); refresh.Before(start) {
			refresh = start
		}
		if end := tok.Expiry.Add(-br.opts.Leeway - time.Second); refresh.After(end) {
			refresh = end
		}
	}
	e := &Entry{header: header, id: id, expiry: tok.Expiry,
		issuedBefore: tok.Expiry.Sub(tok.IssuedAt), refreshBefore: tok.Expiry.Sub(refresh),
		cachedBefore: tok.Expiry.Sub(br.opts.Now()), binding: b, adopted: origin == OriginShared}
	scopes := tok.Scopes
	if len(scopes) > 0 && slices.Equal(scopes, b.Scopes) {
		e.scopesAsked, scopes = true, nil
	}
	if tok.Type != bearerType || scopes != nil {
		typ := tok.Type
		if typ == bearerType {
			typ = bearerType // the constant, not a decoded copy
		}
		e.grant = &grant{typ: typ, scopes: scopes}
	}
	return e
}

// headerAndID returns the Authorization header value and the token's ID
// as two strings sharing one allocation: one heap object per warm token.
func headerAndID(tok Token) (header, id string) {
	all := authScheme(tok.Type) + tok.Value.Reveal() + tok.ID
	n := len(all) - len(tok.ID)
	return all[:n], all[n:]
}

// bearerPrefix starts the Authorization header value of a cached token;
// dpopPrefix that of a DPoP-bound one.
const (
	bearerPrefix = "Bearer "
	dpopPrefix   = "DPoP "
)

// DPoPType is the token type of a DPoP-bound access token (RFC 9449 §5).
const DPoPType = "DPoP"

// authScheme returns the Authorization header's start for a token of
// type typ: "DPoP " for DPoP (any case), else "Bearer ".
func authScheme(typ string) string {
	if strings.EqualFold(typ, DPoPType) {
		return dpopPrefix
	}
	return bearerPrefix
}

// bearerType is the usual spelling of a token type.
const bearerType = "Bearer"

// servedTo notes that e is served to b: to another merchant's binding,
// e is shared across merchants.
func (e *Entry) servedTo(b *Binding) {
	if e.binding != nil && b != e.binding && b.Merchant != e.binding.Merchant && !e.sharedAcross.Load() {
		e.sharedAcross.Store(true)
	}
}

// refreshAt is when tok enters its refresh window: the last RefreshWindow
// of its lifetime (its expiry when refresh-ahead is off).
func (br *Broker) refreshAt(tok Token) time.Time {
	if br.opts.RefreshWindow <= 0 {
		return tok.Expiry
	}
	life := tok.Expiry.Sub(tok.IssuedAt)
	return tok.Expiry.Add(-time.Duration(float64(life) * br.opts.RefreshWindow))
}

// storeFetched caches e, obtained by the fetch f, under b's key unless a
// purge named its token while f ran, and reports whether it did.
func (br *Broker) storeFetched(b *Binding, e *Entry, now time.Time, f *flight) bool {
	br.mu.Lock()
	if f != nil && len(f.purged) > 0 && f.namesLocked(e.Fingerprint()) { // a fingerprint only when a purge ran
		br.mu.Unlock()
		e.stale.Store(true)
		return false
	}
	if v, ok := br.cache.Get(b.key); ok {
		old := v.(*Entry)
		old.stale.Store(true)
		old.unpin()
	}
	br.cache.Set(b.key, e, e.expiry.Sub(now))
	br.mu.Unlock()
	b.current.Store(e)
	return true
}

// dropLocked takes e, cached under key, out of the cache: a lookup that
// holds it sees it stale. Call it with br.mu held.
func (br *Broker) dropLocked(key string, e *Entry) {
	e.stale.Store(true)
	br.cache.Delete(key)
}

// purgeLocked is dropLocked for a purge made here: the fetches of key
// ignore e's token until the shared tier has purged it too. Call it with
// br.mu held.
func (br *Broker) purgeLocked(key string, e *Entry) {
	br.dropLocked(key, e)
	br.purgingLocked(key, e.Fingerprint())
}

// Drop forgets the token cached under the binding's key in this process,
// unless it is another merchant's or was served to another merchant too;
// it is neither revoked nor purged from the shared tier. For a binding
// that goes away (an evicted wildcard merchant's), so that the tokens kept
// follow the merchants kept. It reports whether a token was dropped.
func (br *Broker) Drop(b *Binding) bool {
	br.mu.Lock()
	defer br.mu.Unlock()
	v, ok := br.cache.Get(b.key)
	if !ok {
		return false
	}
	e := v.(*Entry)
	if e.sharedAcross.Load() || e.binding == nil || e.binding.Merchant != b.Merchant {
		return false
	}
	br.dropLocked(b.key, e)
	return true
}

// PurgeMatching drops every cached token whose binding matches, and
// returns the entries dropped. With a shared tier, the tokens are purged
// there too.
func (br *Broker) PurgeMatching(match func(*Binding) bool) []*Entry {
	return br.purge(context.Background(), func() []*Entry {
		var out []*Entry
		for _, it := range br.cache.Items() {
			if e := it.Object.(*Entry); match(e.binding) {
				out = append(out, e)
			}
		}
		return out
	})
}

// Purge drops entries from the cache and purges their tokens from the
// shared tier, if any, so that no node serves them afterwards. Each purge
// from the tier is bounded by ctx and FetchTimeout.
func (br *Broker) Purge(ctx context.Context, entries []*Entry) {
	br.purge(ctx, func() []*Entry { return entries })
}

// purge drops the entries that pick returns (called with br.mu held)
// from the cache, those still cached, purges them from the shared tier,
// and returns them.
func (br *Broker) purge(ctx context.Context, pick func() []*Entry) []*Entry {
	br.mu.Lock()
	entries := pick()
	for _, e := range entries {
		if v, ok := br.cache.Get(e.binding.key); ok && v.(*Entry) == e {
			br.dropLocked(e.binding.key, e)
		}
		br.purgingLocked(e.binding.key, e.Fingerprint())
	}
	br.mu.Unlock()
	for _, e := range entries {
		br.purgeShared(ctx, e.binding.key, e.Fingerprint())
	}
	return entries
}

// PurgeMerchant drops every cached token fetched for a merchant.
func (br *Broker) PurgeMerchant(merchant string) []*Entry {
	return br.PurgeMatching(func(b *Binding) bool { return b.Merchant == merchant })
}

// purgeShared purges a token from the shared tier, if any, bounded by ctx
// and FetchTimeout; the tier counts its own failures.
func (br *Broker) purgeShared(ctx context.Context, key, fingerprint string) {
	if br.opts.Shared == nil {
		return
	}
	defer br.purgedShared(key, fingerprint)
	ctx, cancel := context.WithTimeout(ctx, br.opts.FetchTimeout)
	defer cancel()
	_ = br.opts.Shared.Purge(ctx, key, fingerprint)
}

// dropShared is the shared tier's OnPurge callback: the token another node
// purged is dropped from memory too ("" drops any).
func (br *Broker) dropShared(key, fingerprint string) {
	br.mu.Lock()
	defer br.mu.Unlock()
	br.purgedLocked(key, fingerprint)
	v, ok := br.cache.Get(key)
	if !ok {
		return
	}
	if e := v.(*Entry); fingerprint == "" || e.Fingerprint() == fingerprint {
		br.dropLocked(key, e)
	}
}

// Entries returns the cached, unexpired entries.
func (br *Broker) Entries() []*Entry {
	now := br.opts.Now()
	var out []*Entry
	for _, it := range br.cache.Items() {
		if e := it.Object.(*Entry); e.validAt(now, 0) {
			out = append(out, e)
		}
	}
	return out
}
