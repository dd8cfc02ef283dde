// Package broker is the core of the token broker: it obtains access tokens
// from providers' token APIs (Sources), caches them per (source,
// organisation, scopes, audience, lifetime), makes sure that only one fetch
// per key is in flight, and refreshes tokens ahead of their expiry so that
// requests do not wait. Every call to a token API, foreground or
// refresh-ahead, goes through one failure policy (policy.go) with one state
// per key and one per source: a source hold (a 429's Retry-After, a refused
// credential), the key's failure memory with exponential backoff, the
// source's circuit breaker, and retries with backoff within a fetch. Each
// source classifies its own errors (Classifier); a refused fetch's error
// says how long the hold applied still lasts (RetryAfterOf). It does not
// import Caddy, so it can be used, tested and benchmarked on its own.
package broker

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"math/bits"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"weak"

	gocache "github.com/patrickmn/go-cache"
	"golang.org/x/sync/singleflight"

	"github.com/tokenbroker/caddy-token-broker/internal/noalloc"
	"github.com/tokenbroker/caddy-token-broker/internal/slab"
)

// The slabs of the cached tokens and of long-lived bindings' keys
// (internal/slab), shared by every Broker: the GC marks a chunk of 128
// entries or 64 KiB of strings as one object, instead of following a
// pointer to each entry, header and key scattered over the heap.
//
// Memory: a chunk is freed once none of its values is referenced. A
// cached token is replaced (refresh-ahead) or dropped (expiry, then the
// cache's cleanup, which also unpins it from its binding; purge) within
// its lifetime plus CleanupInterval. Entries and headers have one pair of
// slabs per lifetime class (lifetimes within a factor of two of each
// other, see lifetimeClass): a chunk's values are then all gone within
// about twice the lifetime of the first one, so a class's chunks hold
// about two to three times its live bytes, plus one partly filled chunk
// of each kind. With one slab for all lifetimes, a few long-lived tokens
// among many short-lived refreshes would keep nearly every chunk alive
// (about 11 times the live bytes with 8 % of tokens living 12 times
// longer: TestSlabsBoundedWithMixedLifetimes). A stale entry's memory
// (and its header's) is kept until every entry of its chunk is gone.
// Keys (Binding.Pack) are those of bindings that live as long as their
// configuration. What keeps an entry alive beyond the cache is its
// bindings' last served entry: a token leaving the cache unpins it from
// the binding it was fetched for (Entry.unpin), and a discarded binding
// should be unpinned (Binding.Unpin), so that a chunk of entries does not
// keep, through the bindings of its stale entries, a discarded
// configuration alive for longer than about one token lifetime. Not
// covered: a binding served a token fetched by another binding (a shared
// key, or the first config after a reload) that then stays idle keeps it,
// and its chunk, until its next lookup or until it is discarded: at most
// the previous configuration stays alive that way. Tokens' bytes stay in
// their chunk until it is freed (as an ordinary string's stay until it
// is collected: neither is zeroed).
var (
	entrySlabs [lifetimeClasses]struct {
		entries slab.Of[Entry]
		headers slab.Strings
	}
	keySlab slab.Strings
)

// lifetimeClasses bounds lifetimeClass: class 40 starts at 2^39 s.
const lifetimeClasses = 41

// lifetimeClass is the slab class of a token's lifetime: the bit length
// of its whole seconds, so that the tokens of one class live within a
// factor of two of each other (class 0: under a second or unknown).
func lifetimeClass(life time.Duration) int {
	return min(bits.Len64(uint64(max(life, 0)/time.Second)), lifetimeClasses-1)
}

// Origins of a cached token (Entry.Origin).
const (
	// OriginMinted: this broker called the token API for it.
	OriginMinted = "minted"
	// OriginShared: adopted from the shared tier (Options.Shared).
	OriginShared = "shared"
)

// Entry is a cached token with the Authorization header value built once.
// Entries are immutable once cached, apart from their refresh bookkeeping.
//
// An entry is no heap object of its own: it is a value in a chunk of
// entries (internal/slab), and its one string, the Authorization header
// value followed by the token ID and the fingerprint (of which the
// token's value, ID and fingerprint are slices), is in a chunk of
// strings; its times are in the entry, and its type and granted scopes
// are shared with every entry that has the same (tokenMeta). At 100 000
// warm merchants the GC's mark work, a cache miss per pointer to a
// distinct small object, was most of the CPU per request above a plain
// Caddy's, and the GC goal, twice the live heap, most of the RSS (issue
// 9): see newEntry. 104 bytes (TestEntrySize).
type Entry struct {
	// header is "Bearer " + token + token ID + fingerprint (8 hex
	// digits): Header is header[:valueEnd], the token
	// header[len(bearerPrefix):valueEnd], its ID
	// header[valueEnd:len(header)-fingerprintLen].
	header   string
	valueEnd uint16 // tokens are at most maxTokenLen bytes
	adopted  bool   // OriginShared, else OriginMinted
	// wallExpiry: the token's expiry has no monotonic clock reading (an
	// absolute time from the provider, or from the shared tier), so it is
	// compared with the wall clock; an expiry computed from time.Now
	// (expires_in) is compared on the monotonic clock.
	wallExpiry bool
	// sharedAcross: served to a binding of another merchant than its
	// own (same source, organisation and scopes): Drop keeps it.
	sharedAcross atomic.Bool
	stale        atomic.Bool // replaced by a newer token, or purged
	// refreshing: a refresh-ahead of this entry is in flight.
	refreshing atomic.Bool
	meta       *tokenMeta // Token.Type and Token.Scopes, shared
	// Times as int64 (0: zero time; four time.Time would be 64 bytes
	// more), compared as the time.Time values they were would compare:
	// Token.IssuedAt and when the entry was built (broker clock), in
	// nanoseconds since clockBase; Token.Expiry and when the entry enters
	// its refresh window, likewise, or in unix nanoseconds when wallExpiry
	// (see stamp).
	expiry, issuedAt, refreshAt, cachedAt int64
	binding                               *Binding
	// fingerprint of the token, computed once: the end of header (no
	// object of its own); a field so that FingerprintValue can point at
	// it.
	fingerprint string
}

// fingerprintLen is the length of a token's fingerprint (Fingerprint).
const fingerprintLen = 8

// Token returns the cached token. Its times compare as the token's own
// did: an expiry from time.Now keeps a monotonic clock reading (derived
// from clockBase), an absolute one does not.
func (e *Entry) Token() Token {
	return Token{Value: e.value(), Type: e.meta.typ, Expiry: e.expiryTime(), ID: e.id(), Scopes: e.meta.scopes, IssuedAt: baseTime(e.issuedAt)}
}

// value is the token itself.
func (e *Entry) value() Secret { return Secret(e.header[len(bearerPrefix):e.valueEnd]) }

// id is the provider's identifier of the token ("" when it has none).
func (e *Entry) id() string {
	end := len(e.header) - fingerprintLen
	if int(e.valueEnd) == end {
		return ""
	}
	return e.header[e.valueEnd:end]
}

// validAt is Token().ValidAt without building the Token.
func (e *Entry) validAt(now time.Time, leeway time.Duration) bool {
	return int(e.valueEnd) > len(bearerPrefix) && e.stamp(now.Add(leeway)) < e.expiry
}

// Header returns "Bearer <token>", the value of the Authorization header.
// It does not allocate.
func (e *Entry) Header() string { return e.header[:e.valueEnd] }

// Fingerprint is the token's fingerprint (Fingerprint of its value),
// computed once per token. It does not allocate.
func (e *Entry) Fingerprint() string { return e.fingerprint }

// FingerprintValue is Fingerprint as an interface value holding a string,
// without allocating (a Caddy placeholder's value on every request).
func (e *Entry) FingerprintValue() any { return noalloc.String(&e.fingerprint) }

// RefreshAt is when the entry enters its refresh window.
func (e *Entry) RefreshAt() time.Time { return e.fromStamp(e.refreshAt) }

// expiryTime is the token's expiry.
func (e *Entry) expiryTime() time.Time { return e.fromStamp(e.expiry) }

// stamp is t in the frame of the entry's expiry and refreshAt: unix
// nanoseconds when wallExpiry, else nanoseconds since clockBase (0 for
// the zero time either way).
func (e *Entry) stamp(t time.Time) int64 {
	if e.wallExpiry {
		if t.IsZero() {
			return 0
		}
		return t.UnixNano()
	}
	return sinceBase(t)
}

// fromStamp is the time of e.stamp n.
func (e *Entry) fromStamp(n int64) time.Time {
	if !e.wallExpiry {
		return baseTime(n)
	}
	if n == 0 {
		return time.Time{}
	}
	return time.Unix(0, n)
}

// wallOnly reports whether t has no monotonic clock reading (Round(0)
// strips it and changes nothing else).
func wallOnly(t time.Time) bool { return t == t.Round(0) }

// Origin says where the token came from: OriginMinted or OriginShared.
func (e *Entry) Origin() string {
	if e.adopted {
		return OriginShared
	}
	return OriginMinted
}

// clockBase is the origin of the times an entry keeps as int64: taken
// with the monotonic clock reading, so that, as with time.Time values,
// times taken from time.Now compare on the monotonic clock and a step of
// the wall clock neither extends nor shortens a cached token's life.
var clockBase = time.Now()

// sinceBase is t as nanoseconds since clockBase, 0 for the zero time
// (clockBase itself is 1 ns after it).
func sinceBase(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	if d := int64(t.Sub(clockBase)); d != 0 {
		return d
	}
	return 1
}

// baseTime is the time of sinceBase n.
func baseTime(n int64) time.Time {
	if n == 0 {
		return time.Time{}
	}
	return clockBase.Add(time.Duration(n))
}

// unpin makes e no longer the last served entry of the binding it was
// fetched for, if it still is: a token dropped from the cache or replaced
// must not stay pinned by an idle binding, which would keep its chunk of
// entries, and through their bindings perhaps a discarded configuration,
// alive (see entrySlabs). Other bindings sharing its key let go of it on
// their next lookup, or when they are discarded (Binding.Unpin).
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

	mu      sync.Mutex          // orders cache writes with Purge's compare-and-delete
	pol     policy              // the failure policy (policy.go)
	flights map[string]*flight  // key -> its fetch in flight (inflight.go); guarded by mu
	purging map[string][]string // key -> fingerprints being purged from the shared tier; guarded by mu
}

// New returns a Broker. Call Close when done with it.
func New(opts Options) *Broker {
	opts = opts.withDefaults()
	br := &Broker{opts: opts, cache: gocache.New(gocache.NoExpiration, opts.CleanupInterval)}
	// A token dropped from the cache (expired and cleaned up, purged) is
	// no longer its binding's last served entry: an idle binding must not
	// keep a chunk of entries (and one of headers) alive for ever.
	br.cache.OnEvicted(func(_ string, v any) { v.(*Entry).unpin() })
	br.pol = newPolicy(&br.opts)
	if opts.Shared != nil {
		opts.Shared.OnPurge(br.dropShared)
	}
	return br
}

// Close drops every cached token. Fetches in flight finish on their own.
func (br *Broker) Close() {
	br.mu.Lock()
	defer br.mu.Unlock()
	for _, it := range br.cache.Items() {
		e := it.Object.(*Entry)
		e.stale.Store(true)
		e.unpin()
	}
	br.cache.Flush()
}

// newEntry builds the cache entry of a token, in the slabs of entries and
// headers (see entrySlabs). The token's value, ID and fingerprint are
// slices of the header string, so that a cached token's bytes are held
// once, not twice.
//
// The token type and granted scopes are shared (metaFor): at most one
// pointer per cached token, which every GC cycle follows, instead of
// 40 bytes of string and slice headers.
func (br *Broker) newEntry(b *Binding, tok Token, origin string) *Entry {
	value := tok.Value.Reveal()
	sum := sha256.Sum256([]byte(value))
	var fp [fingerprintLen]byte
	hex.Encode(fp[:], sum[:fingerprintLen/2])
	// The entry and its header are values in slabs (see entrySlabs): a
	// fresh zero Entry, not shared yet, filled field by field.
	sl := &entrySlabs[lifetimeClass(tok.Lifetime())]
	e := sl.entries.New()
	e.header, e.valueEnd = sl.headers.Concat(bearerPrefix, value, tok.ID, string(fp[:])), uint16(len(bearerPrefix)+len(value))
	e.fingerprint = e.header[len(e.header)-fingerprintLen:]
	e.adopted, e.meta = origin == OriginShared, metaFor(tok.Type, tok.Scopes, b.Scopes)
	e.wallExpiry = wallOnly(tok.Expiry)
	e.expiry, e.issuedAt, e.refreshAt = e.stamp(tok.Expiry), sinceBase(tok.IssuedAt), e.stamp(br.refreshAt(tok))
	e.cachedAt, e.binding = sinceBase(br.opts.Now()), b
	return e
}

// tokenMeta is a token's type and granted scopes, shared by the entries
// whose tokens have the same (see metaFor). Immutable.
type tokenMeta struct {
	typ    string
	scopes []string
}

// metas interns tokenMeta values by type and grant: a provider answers
// with a handful of type spellings and scope sets, so entries share a few.
// The map holds weak pointers, and a tokenMeta's cleanup deletes its key
// once no entry uses it: the map follows the distinct grants of the
// tokens cached, whatever a provider or a caller does (a wildcard entry
// with {merchant} in its scopes makes one grant per merchant id).
var metas struct {
	sync.Mutex
	m map[string]weak.Pointer[tokenMeta]
}

// metaFor returns the shared tokenMeta of a token type and granted
// scopes; asked are the binding's scopes, whose slice is kept when the
// grant equals them (the usual case), so that no copy is made.
func metaFor(typ string, granted, asked []string) *tokenMeta {
	if len(granted) > 0 && slices.Equal(granted, asked) {
		granted = asked
	}
	key := metaKey(typ, granted)
	metas.Lock()
	defer metas.Unlock()
	if m := metas.m[key].Value(); m != nil {
		return m
	}
	m := &tokenMeta{typ: strings.Clone(typ), scopes: granted}
	if len(granted) > 0 && !sameSlice(granted, asked) {
		// A slice of the caller's: keep a copy of our own.
		m.scopes = slices.Clone(granted)
	}
	if metas.m == nil {
		metas.m = map[string]weak.Pointer[tokenMeta]{}
	}
	metas.m[key] = weak.Make(m)
	runtime.AddCleanup(m, forgetMeta, key)
	return m
}

// forgetMeta deletes key from metas if its tokenMeta is gone (a newer
// one may have taken its place).
func forgetMeta(key string) {
	metas.Lock()
	defer metas.Unlock()
	if wp, ok := metas.m[key]; ok && wp.Value() == nil {
		delete(metas.m, key)
	}
}

// metaKey encodes a type and a grant without ambiguity: every part
// length-prefixed, a nil grant apart from an empty one.
func metaKey(typ string, granted []string) string {
	b := make([]byte, 0, len(typ)+8+20*len(granted))
	if granted == nil {
		b = append(b, 'n')
	}
	for _, p := range append([]string{typ}, granted...) {
		b = strconv.AppendInt(b, int64(len(p)), 10)
		b = append(b, ':')
		b = append(b, p...)
	}
	return string(b)
}

// sameSlice reports whether a and b are the same slice (same array, same
// length).
func sameSlice(a, b []string) bool {
	return len(a) == len(b) && (len(a) == 0 || &a[0] == &b[0])
}

// bearerPrefix starts the Authorization header value of a cached token.
const bearerPrefix = "Bearer "

// Entry.valueEnd holds the end of the longest token (checked by every
// path to newEntry: ValidTokenValue): this constant does not compile
// otherwise.
const _ = uint16(len(bearerPrefix) + maxTokenLen)

// servedTo notes that e is being served to b: when b is another
// merchant's binding than the one e was fetched for, e is shared across
// merchants and Drop keeps it.
func (e *Entry) servedTo(b *Binding) {
	if e.binding != nil && b != e.binding && b.Merchant != e.binding.Merchant && !e.sharedAcross.Load() {
		e.sharedAcross.Store(true)
	}
}

// refreshAt is when tok enters its refresh window.
func (br *Broker) refreshAt(tok Token) time.Time {
	if br.opts.RefreshWindow <= 0 {
		return tok.Expiry
	}
	life := tok.Expiry.Sub(tok.IssuedAt)
	return tok.Expiry.Add(-time.Duration(float64(life) * br.opts.RefreshWindow))
}

// storeFetched is store for the fetch f: it does not cache e (and marks it
// stale) when a purge named e's token while f ran (inflight.go), and
// reports whether it cached it.
func (br *Broker) storeFetched(b *Binding, e *Entry, now time.Time, f *flight) bool {
	br.mu.Lock()
	if f.namesLocked(e.fingerprint) {
		br.mu.Unlock()
		e.stale.Store(true)
		return false
	}
	if v, ok := br.cache.Get(b.key); ok {
		old := v.(*Entry)
		old.stale.Store(true)
		old.unpin()
	}
	br.cache.Set(b.key, e, time.Duration(e.expiry-e.stamp(now)))
	br.mu.Unlock()
	b.current.Store(e)
	return true
}

// Purge drops the binding's cached token if it is still the one with the
// given value, and reports whether it did: a token fetched meanwhile is
// kept. It is not limited: callers that saw a token rejected (401) call
// Reject, which limits purges by rejection per key. With a shared tier, the
// token is purged there too (compare-and-delete on its fingerprint).
func (br *Broker) Purge(b *Binding, rejected Secret) bool {
	br.mu.Lock()
	v, ok := br.cache.Get(b.key)
	if !ok || v.(*Entry).value() != rejected {
		br.mu.Unlock()
		return false
	}
	v.(*Entry).stale.Store(true)
	br.cache.Delete(b.key)
	br.purgingLocked(b.key, rejected.Fingerprint())
	br.mu.Unlock()
	br.purgeShared(b.key, rejected.Fingerprint())
	return true
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
	e.stale.Store(true)
	br.cache.Delete(b.key)
	return true
}

// PurgeMatching drops every cached token whose binding matches, and
// returns the entries dropped. Tokens can be shared by merchants (same
// source, organisation, scopes and audience), so the admin API matches
// on those, not on the merchant that happened to fetch the token. With a
// shared tier, the tokens are purged there too.
func (br *Broker) PurgeMatching(match func(*Binding) bool) []*Entry {
	br.mu.Lock()
	var out []*Entry
	for k, it := range br.cache.Items() {
		if e := it.Object.(*Entry); match(e.binding) {
			e.stale.Store(true)
			br.cache.Delete(k)
			br.purgingLocked(k, e.fingerprint)
			out = append(out, e)
		}
	}
	br.mu.Unlock()
	for _, e := range out {
		br.purgeShared(e.binding.key, e.fingerprint)
	}
	return out
}

// PurgeMerchant drops every cached token fetched for a merchant.
func (br *Broker) PurgeMerchant(merchant string) []*Entry {
	return br.PurgeMatching(func(b *Binding) bool { return b.Merchant == merchant })
}

// purgeShared purges a token from the shared tier, if there is one. The
// tier's failures are its own business (it must not fail lookups); the
// purge is bounded by FetchTimeout.
func (br *Broker) purgeShared(key, fingerprint string) {
	if br.opts.Shared == nil {
		return
	}
	defer br.purgedShared(key, fingerprint)
	ctx, cancel := context.WithTimeout(context.Background(), br.opts.FetchTimeout)
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
	if e := v.(*Entry); fingerprint == "" || e.fingerprint == fingerprint {
		e.stale.Store(true)
		br.cache.Delete(key)
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
