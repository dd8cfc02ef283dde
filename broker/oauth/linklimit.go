package oauth

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// Defaults of LinkLimits.
const (
	// DefaultMaxPendingLinks is how many unused, unexpired consent links
	// one merchant may have.
	DefaultMaxPendingLinks = 5
	// DefaultMerchantLinksPerMinute is how many consent links one merchant
	// may get per minute.
	DefaultMerchantLinksPerMinute = 5
	// DefaultLinksPerMinute is how many consent links a provider hands out
	// per minute, all merchants together.
	DefaultLinksPerMinute = 60
	// MaxReturnURLLength is the longest return URL a consent link takes,
	// in bytes.
	MaxReturnURLLength = 2048
)

// MaxStartsPerLink is how many times one consent link may be started (two
// tabs, a double click): across the fleet when the source's Store is a
// StartCounter, else, and while its count cannot be had, per instance.
const MaxStartsPerLink = 10

// ReasonTooManyStarts is the refusal of a start of a consent link that
// was started MaxStartsPerLink times already; the message says where.
const ReasonTooManyStarts = "too_many_starts"

// StartCounter is a refresh-token Store that counts the starts of consent
// links for the whole fleet (fleet.Store), so that MaxStartsPerLink holds
// there. Implementations report their own failures and must be safe for
// concurrent use.
type StartCounter interface {
	// CountStart adds one start to the count of the consent link stored
	// under key (a hash, never the link), atomically for every instance,
	// and returns the count, this start included. The count is forgotten
	// after kept.
	CountStart(ctx context.Context, key string, kept time.Time) (int64, error)
}

// Reasons of a link refused by LinkLimits (see LinkLimitError).
const (
	// ReasonTooManyLinks: the merchant has LinkLimits.MaxPending unused
	// links that have not expired.
	ReasonTooManyLinks = "too_many_pending_links"
	// ReasonLinkRate: the merchant's or the provider's link rate is spent.
	ReasonLinkRate = "rate_limited"
)

// LinkLimits bound the consent links a provider hands out, so that a
// caller asking in a loop cannot fill the store. Each process applies
// them to the links it creates until they are started. Zero fields take
// their defaults.
type LinkLimits struct {
	// MaxPending is how many unused, unexpired links one merchant may
	// have. Default DefaultMaxPendingLinks.
	MaxPending int
	// MerchantPerMinute is how many links one merchant may get per minute
	// (as many at once). Default DefaultMerchantLinksPerMinute.
	MerchantPerMinute int
	// PerMinute is how many links the provider hands out per minute, all
	// merchants together (as many at once). Default DefaultLinksPerMinute.
	PerMinute int
}

// withDefaults fills the zero fields.
func (l LinkLimits) withDefaults() LinkLimits {
	if l.MaxPending == 0 {
		l.MaxPending = DefaultMaxPendingLinks
	}
	if l.MerchantPerMinute == 0 {
		l.MerchantPerMinute = DefaultMerchantLinksPerMinute
	}
	if l.PerMinute == 0 {
		l.PerMinute = DefaultLinksPerMinute
	}
	return l
}

// LinkLimitError is a consent link refused by LinkLimits: the caller may
// ask again after RetryAfter. It never contains a link.
type LinkLimitError struct {
	// Reason is ReasonTooManyLinks or ReasonLinkRate.
	Reason string
	// Limit describes the limit reached.
	Limit string
	// RetryAfter is when a link can be had again, at the earliest.
	RetryAfter time.Duration
}

// Error describes the refusal and when to ask again.
func (e *LinkLimitError) Error() string {
	return fmt.Sprintf("%s: ask again in %s", e.Limit, e.RetryAfter.Round(time.Second))
}

// linkLimiter applies LinkLimits. It knows the links it created by store
// key and expiry, per merchant, until they expire or are used.
type linkLimiter struct {
	lim LinkLimits

	mu     sync.Mutex
	all    *rate.Limiter
	m      map[string]*merchantLinks
	pruned time.Time
}

type merchantLinks struct {
	lim   *rate.Limiter
	links []pendingLink
}

type pendingLink struct {
	key     string
	expires time.Time
}

func newLinkLimiter(l LinkLimits) *linkLimiter {
	l = l.withDefaults()
	return &linkLimiter{lim: l, all: perMinute(l.PerMinute), m: map[string]*merchantLinks{}}
}

func perMinute(n int) *rate.Limiter { return rate.NewLimiter(rate.Limit(float64(n)/60), n) }

// admit reserves a link for merchant at now, or says why not. undo gives
// the reservation back, for a link that is not handed out after all.
func (l *linkLimiter) admit(merchant string, now time.Time) (undo func(), _ *LinkLimitError) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.pruneLocked(now)
	ml := l.m[merchant]
	if ml == nil { // kept only once admitted: refusals leave no state
		ml = &merchantLinks{lim: perMinute(l.lim.MerchantPerMinute)}
	}
	ml.links = slices.DeleteFunc(ml.links, func(p pendingLink) bool { return !now.Before(p.expires) })
	if len(ml.links) >= l.lim.MaxPending {
		return nil, &LinkLimitError{Reason: ReasonTooManyLinks, RetryAfter: ml.links[0].expires.Sub(now),
			Limit: fmt.Sprintf("the merchant has %d unused consent links (max_pending_links): one must expire or be used first", len(ml.links))}
	}
	mr := ml.lim.ReserveN(now, 1)
	if d := mr.DelayFrom(now); d > 0 {
		mr.CancelAt(now)
		return nil, &LinkLimitError{Reason: ReasonLinkRate, RetryAfter: d,
			Limit: fmt.Sprintf("the merchant got its %d consent links per minute (merchant_links_per_minute)", l.lim.MerchantPerMinute)}
	}
	ar := l.all.ReserveN(now, 1)
	if d := ar.DelayFrom(now); d > 0 {
		ar.CancelAt(now)
		mr.CancelAt(now)
		return nil, &LinkLimitError{Reason: ReasonLinkRate, RetryAfter: d,
			Limit: fmt.Sprintf("the provider handed out its %d consent links per minute (links_per_minute)", l.lim.PerMinute)}
	}
	l.m[merchant] = ml
	return func() {
		l.mu.Lock()
		defer l.mu.Unlock()
		ar.CancelAt(now)
		mr.CancelAt(now)
	}, nil
}

// created records a link of merchant, stored under key until expires.
func (l *linkLimiter) created(merchant, key string, expires time.Time) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ml := l.m[merchant]; ml != nil {
		i, _ := slices.BinarySearchFunc(ml.links, expires, func(p pendingLink, t time.Time) int { return p.expires.Compare(t) })
		ml.links = slices.Insert(ml.links, i, pendingLink{key: key, expires: expires})
	}
}

// used forgets the link stored under key: it no longer counts.
func (l *linkLimiter) used(merchant, key string) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if ml := l.m[merchant]; ml != nil {
		ml.links = slices.DeleteFunc(ml.links, func(p pendingLink) bool { return p.key == key })
	}
}

// pruneLocked drops, once a minute, the merchants without links whose
// rate is back to full.
func (l *linkLimiter) pruneLocked(now time.Time) {
	if !pruneDue(&l.pruned, now) {
		return
	}
	for id, ml := range l.m {
		ml.links = slices.DeleteFunc(ml.links, func(p pendingLink) bool { return !now.Before(p.expires) })
		if len(ml.links) == 0 && ml.lim.TokensAt(now) >= float64(l.lim.MerchantPerMinute) {
			delete(l.m, id)
		}
	}
}

// pruneDue reports whether a minute or more passed since *last, and then
// sets *last to now.
func pruneDue(last *time.Time, now time.Time) bool {
	if now.Sub(*last) < time.Minute {
		return false
	}
	*last = now
	return true
}

// linkStarts applies MaxStartsPerLink: it counts each start at this
// instance (local) and, when there is one, in the shared count, which
// decides while it can be had. A start beyond the limit by the local count
// is refused without writing to the shared count.
type linkStarts struct {
	local  *memoryStarts
	shared StartCounter // nil: per instance
}

// Where a start of a consent link was counted, for the refusal's message.
const (
	startsInFleet    = "across the fleet"
	startsAtInstance = "at this instance"
)

// start counts a start of the link stored under key, whose record is kept
// until kept, and reports whether it is within MaxStartsPerLink and where
// it was counted.
func (s linkStarts) start(ctx context.Context, key string, kept time.Time) (ok bool, where string) {
	n := s.local.count(key, kept)
	if n > MaxStartsPerLink || s.shared == nil {
		return n <= MaxStartsPerLink, startsAtInstance
	}
	total, err := s.shared.CountStart(ctx, key, kept)
	if err != nil { // the shared count's implementation logs it
		return true, startsAtInstance
	}
	return total <= MaxStartsPerLink, startsInFleet
}

// memoryStarts counts the starts of links at one instance. A count whose
// kept time has passed starts again from zero.
type memoryStarts struct {
	now func() time.Time

	mu     sync.Mutex
	m      map[string]memoryStart // by the link's store key
	pruned time.Time
}

// memoryStart is the count of one link's starts and when it is dropped.
type memoryStart struct {
	n    int64
	kept time.Time
}

// count adds one start to the count of the link stored under key, kept
// until kept, and returns the count, this start included.
func (s *memoryStarts) count(key string, kept time.Time) int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	now := s.now()
	if pruneDue(&s.pruned, now) {
		for k, st := range s.m {
			if !now.Before(st.kept) {
				delete(s.m, k)
			}
		}
	}
	if s.m == nil {
		s.m = map[string]memoryStart{}
	}
	st := s.m[key]
	if !now.Before(st.kept) { // none, or one not pruned yet
		st = memoryStart{}
	}
	st.n++
	st.kept = kept
	s.m[key] = st
	return st.n
}
