// Package broker is the core of the token broker: it obtains access tokens
// from providers' token APIs (Sources), caches them per (source,
// organisation, scopes, audience, lifetime; and merchant, for a
// PerMerchant source), makes sure that only one fetch per key is in
// flight, and refreshes tokens ahead of their expiry so that requests do
// not wait. Every call to a token API, foreground or
// refresh-ahead, goes through one failure policy (policy.go: a source
// backoff, a key backoff, the source's circuit breaker, retries within a
// fetch). Each source classifies its own errors (Classifier); a refused
// fetch's error says how long its backoff still lasts (RetryAfterOf). It
// does not import Caddy, so it can be used, tested and benchmarked on its
// own.
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
// The fields a cache hit reads (Broker.Get) come first, within the first
// 64 bytes: one cache line per hit.
type Entry struct {
	// header is "Bearer " or, for a DPoP-bound token, "DPoP " + the
	// token (prefixLen): the token's value is a slice of it, so that its
	// bytes are stored once; id shares its allocation (headerAndID).
	header string
	expiry time.Time
	// issuedBefore, refreshBefore and cachedBefore are the token's
	// IssuedAt, its planned refresh (Token.RefreshAt), and when the
	// entry was built (broker clock), as durations before expiry:
	// expiry.Add(-d) has expiry's monotonic clock reading, if any, so the
	// times compare as the token's own expiry does.
	refreshBefore time.Duration
	binding       *Binding
	stale         atomic.Bool // replaced by a newer token, or purged
	// refreshing: a refresh-ahead of this entry is in flight.
	refreshing atomic.Bool
	// deferred: its budget deferred a refresh-ahead of it.
	deferred atomic.Bool
	// sharedAcross: served to a binding of another merchant than its
	// own (same source, organisation and scopes): Drop keeps it.
	sharedAcross atomic.Bool
	// behind: the Observer was told its refresh is behind (RefreshBehind).
	behind      atomic.Bool
	adopted     bool // OriginShared, else OriginMinted
	scopesAsked bool // granted scopes are the binding's

	issuedBefore, cachedBefore time.Duration
	id                         string // the provider's identifier of the token
	// fingerprint is the token's fingerprint, a string in an interface
	// value, made on first use (Fingerprint): handing it out as `any` on
	// every request (a Caddy placeholder) then costs no allocation, and a
	// token whose fingerprint nobody asks for costs no memory for it.
	fingerprint atomic.Value
	// ath is the ath claim of the token's DPoP proofs (dpop.ATH), made
	// on first use (ATH).
	ath atomic.Pointer[string]
	// grant is the token's type and granted scopes when they are not the
	// usual: type Bearer, and no scopes or (scopesAsked) the binding's.
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
// or "DPoP <token>" for a DPoP-bound token (type DPoP, RFC 9449 §7.1),
// which a request sends with a proof of its profile's key (Profile.DPoP).
// It does not allocate.
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
// (dpop.ATH: base64url of its SHA-256), computed once per token: it does
// not allocate after its first call.
func (e *Entry) ATH() string {
	if p := e.ath.Load(); p != nil {
		return *p
	}
	a := dpop.ATH(string(e.value()))
	e.ath.CompareAndSwap(nil, &a)
	return *e.ath.Load()
}

// RefreshAt is when the entry's refresh-ahead is planned (Token.RefreshAt):
// a lookup from then on starts it.
func (e *Entry) RefreshAt() time.Time { return e.expiry.Add(-e.refreshBefore) }

// Origin says where the token came from: OriginMinted or OriginShared.
func (e *Entry) Origin() string {
	if e.adopted {
		return OriginShared
	}
	return OriginMinted
}

// unpin makes e no longer the last served entry of the binding it was
// fetched for, if it still is: a token dropped from the cache or replaced
// is not kept in memory by an idle binding. Other bindings sharing its
// key let go of it on their next lookup.
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
	// A token dropped from the cache (expired and cleaned up, purged) is
	// no longer its binding's last served entry.
	br.cache.OnEvicted(func(_ string, v any) { v.(*Entry).unpin() })
	br.pol = newPolicy(&br.opts)
	if opts.Shared != nil {
		br.stopPurges = opts.Shared.OnPurge(br.dropShared)
	}
	return br
}

// Close drops every cached token and stops hearing the shared tier's
// purges (the tier outlives the broker across config reloads). Fetches in
// flight finish on their own.
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
// (planned here when zero, or when refresh-ahead is off). Granted scopes
// equal to the binding's are the binding's slice.
func (br *Broker) newEntry(b *Binding, tok Token, origin string) *Entry {
	header, id := headerAndID(tok)
	refresh := tok.RefreshAt
	if refresh.IsZero() || !refresh.Before(tok.Expiry) || br.opts.RefreshWindow <= 0 {
		refresh = br.planRefresh(b, tok, false)
	} else {
		// A plan made elsewhere (an adopted token) stays in the refresh
		// window and leaves a refresh time before the token goes.
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

// headerAndID returns the Authorization header value (authScheme + the
// token), and the token's ID, as two strings sharing one allocation: a
// warm token costs the GC one object for both.
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

// servedTo notes that e is being served to b: when b is another
// merchant's binding than the one e was fetched for, e is shared across
// merchants and Drop keeps it.
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

// storeFetched caches e, obtained by the fetch f, under b's key, unless a
// purge named e's token while f ran (inflight.go): e is then marked stale.
// It reports whether it cached e.
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
// neither adopt nor cache e's token until the shared tier has purged it
// too (purgingLocked, purgeShared). Call it with br.mu held.
func (br *Broker) purgeLocked(key string, e *Entry) {
	br.dropLocked(key, e)
	br.purgingLocked(key, e.Fingerprint())
}

// Drop forgets the token cached under the binding's key in this process,
// unless it is another merchant's or has been served to another merchant
// too (the same source, organisation and scopes: an explicit merchant and
// a wildcard id naming its organisation, a wildcard entry with one
// organisation for every id): neither revoked nor purged from the shared
// tier (it is still valid there, for other nodes). For a binding that goes
// away while its token is still valid (an evicted wildcard merchant's), so
// that the tokens kept follow the merchants kept; a lookup afterwards
// fetches again. It reports whether a token was dropped. A merchant served
// the token while it is being dropped fetches again once.
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
// returns the entries dropped. Tokens can be shared by merchants (same
// source, organisation, scopes and audience), so the admin API matches
// on those, not on the merchant that happened to fetch the token. With a
// shared tier, the tokens are purged there too.
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

// Purge drops entries from the cache, those still cached, and purges
// their tokens from the shared tier, if there is one, which the other
// nodes hear: no node serves them afterwards. Each purge from the shared
// tier is bounded by ctx and FetchTimeout.
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

// purgeShared purges a token from the shared tier, if there is one. The
// tier's failures are its own business (it must not fail lookups); the
// purge is bounded by ctx and FetchTimeout.
func (br *Broker) purgeShared(ctx context.Context, key, fingerprint string) {
	if br.opts.Shared == nil {
		return
	}
	defer br.purgedShared(key, fingerprint)
	ctx, cancel := context.WithTimeout(ctx, br.opts.FetchTimeout)
	defer cancel()
	_ = br.opts.Shared.Purge(ctx, key, fingerprint)
}

// dropShared is the shared tier's OnPurge callback: another node purged key,
// so the token it names is dropped from memory too ("" drops any).
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
