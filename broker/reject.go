package broker

import (
	"sync"
	"time"
)

// Purges by rejection are limited per key: an upstream's 401 is not always
// about the token (a resource server answers invalid_token for a wrong
// audience or tenant, and the caller picks the path), and each purge costs
// a token request. The rule, on the broker clock:
//
//   - the first rejection of a cached token purges it (the next lookup
//     fetches a new one);
//   - when a token cached after such a purge is itself rejected before it
//     is RejectMinAge old (or the next hold window, if longer), the 401 is
//     not about the token: it is not purged, it keeps being served, and
//     every rejection of the key is held (not purged) for a window. Each
//     such strike doubles the window, from RejectHoldBase up to
//     RejectHoldMax;
//   - a rejection the retry of the request shows to be about the token
//     (the upstream accepts the new token, see Accepted) is no strike;
//   - the strikes are forgotten once the key sees no rejection for a full
//     window after its hold ended.
//
// A caller provoking 401s at will thus causes at most one token request per
// RejectMinAge and key (7 an hour with the first), and about one an hour
// when it keeps provoking them (the holds grow to the hour).
const (
	// RejectMinAge is the age before which a token that replaced a
	// rejected one is not purged by rejection.
	RejectMinAge = 10 * time.Minute
	// RejectHoldBase is the first hold window of a key whose replacement
	// token was rejected too.
	RejectHoldBase = time.Minute
	// RejectHoldMax caps the hold window.
	RejectHoldMax = time.Hour
)

// Rejection is the outcome of Broker.Reject.
type Rejection uint8

// Outcomes of Broker.Reject.
const (
	// RejectionStale: the rejected token is no longer the cached one
	// (another rejection purged it, or a newer token replaced it): nothing
	// was done.
	RejectionStale Rejection = iota
	// RejectionPurged: the token was purged; the next lookup fetches.
	RejectionPurged
	// RejectionHeld: the key's purges are on hold (see RejectHoldBase): the
	// token was kept and is still served.
	RejectionHeld
)

// String names the outcome for logs.
func (r Rejection) String() string {
	switch r {
	case RejectionPurged:
		return "purged"
	case RejectionHeld:
		return "held"
	}
	return "stale"
}

// rejectState is the purge-by-rejection memory of one key.
type rejectState struct {
	mu        sync.Mutex
	strikes   int       // replacement tokens rejected soon after they were cached
	holdUntil time.Time // no purge by rejection before this
	purgedAt  time.Time // last purge by rejection
	rejected  Secret    // the token that purge dropped: never adopted again
	last      time.Time // last rejection, purged or not
}

// holdWindow is the hold after the n-th strike (n ≥ 1).
func holdWindow(n int) time.Duration {
	if n < 1 {
		n = 1
	}
	if n > 7 {
		return RejectHoldMax
	}
	return min(RejectHoldBase<<(n-1), RejectHoldMax)
}

// quiet reports whether the key saw no rejection for a full window after
// its hold ended (or the clock went back): its strikes are forgotten.
func (s *rejectState) quiet(now time.Time) bool {
	since := s.holdUntil
	if s.last.After(since) {
		since = s.last
	}
	return now.Before(s.last) || !now.Before(since.Add(holdWindow(s.strikes)))
}

// Reject is what a caller that saw the upstream reject the binding's token
// (401) calls: the token is purged if it is still the cached one, unless the
// key's purges by rejection are on hold (see RejectHoldBase). A burst of
// rejections of one token causes at most one new fetch.
func (br *Broker) Reject(b *Binding, rejected Secret) Rejection {
	br.mu.Lock()
	v, ok := br.cache.Get(b.key)
	if !ok || v.(*Entry).value() != rejected {
		br.mu.Unlock()
		return RejectionStale
	}
	e := v.(*Entry)
	now := br.opts.Now()
	sv, _ := br.rejections.LoadOrStore(b.key, &rejectState{})
	st := sv.(*rejectState)
	st.mu.Lock()
	if st.strikes > 0 && st.quiet(now) {
		st.strikes, st.holdUntil = 0, time.Time{}
	}
	held := false
	switch {
	case st.rejected == rejected:
		// The token purged before came back (another lookup adopted it
		// from the shared tier before its purge there reached it): it is
		// purged again, and that is no strike.
	case now.Before(st.holdUntil) && st.holdUntil.Sub(now) <= RejectHoldMax:
		held = true
	case !st.purgedAt.IsZero() && !e.cachedAt().Before(st.purgedAt) && now.Sub(e.cachedAt()) < max(RejectMinAge, holdWindow(st.strikes+1)):
		// The replacement of a rejected token is rejected too: the 401
		// is not about the token.
		st.strikes++
		st.holdUntil = now.Add(holdWindow(st.strikes))
		held = true
	default:
		st.purgedAt, st.rejected = now, rejected
	}
	st.last = now
	st.mu.Unlock()
	if held {
		br.mu.Unlock()
		return RejectionHeld
	}
	e.stale.Store(true)
	br.cache.Delete(b.key)
	br.mu.Unlock()
	br.purgeShared(b.key, rejected.Fingerprint())
	return RejectionPurged
}

// rejectedToken is the token of key last purged by rejection, which the
// shared tier must not hand out again.
func (br *Broker) rejectedToken(key string) Secret {
	v, ok := br.rejections.Load(key)
	if !ok {
		return ""
	}
	st := v.(*rejectState)
	st.mu.Lock()
	defer st.mu.Unlock()
	return st.rejected
}

// Accepted tells the broker that the upstream accepted the binding's token
// when a request that saw the previous token rejected was sent again with
// it: that rejection was about the token (revoked, say), so a rejection of
// this token counts as a first one again. Only the retry of a rejected
// request is evidence: a caller cannot choose its outcome.
func (br *Broker) Accepted(b *Binding, tok Secret) {
	v, ok := br.rejections.Load(b.key)
	if !ok {
		return
	}
	br.mu.Lock()
	cur, cached := br.cache.Get(b.key)
	br.mu.Unlock()
	if !cached || cur.(*Entry).value() != tok {
		return
	}
	st := v.(*rejectState)
	st.mu.Lock()
	if !br.opts.Now().Before(st.holdUntil) {
		st.purgedAt = time.Time{}
	}
	st.mu.Unlock()
}

// RejectHold returns until when purges by rejection of the key are on hold
// and how many strikes it has; zero when no hold is in force.
func (br *Broker) RejectHold(key string) (until time.Time, strikes int) {
	v, ok := br.rejections.Load(key)
	if !ok {
		return time.Time{}, 0
	}
	st := v.(*rejectState)
	now := br.opts.Now()
	st.mu.Lock()
	defer st.mu.Unlock()
	if now.Before(st.holdUntil) {
		return st.holdUntil, st.strikes
	}
	return time.Time{}, st.strikes
}

// sweepRejections drops the memory of keys that would forget their
// strikes anyway.
func (br *Broker) sweepRejections(now time.Time) {
	br.rejections.Range(func(k, v any) bool {
		st := v.(*rejectState)
		st.mu.Lock()
		done := st.quiet(now) && !now.Before(st.purgedAt.Add(RejectHoldMax))
		st.mu.Unlock()
		if done {
			br.rejections.CompareAndDelete(k, v)
		}
		return true
	})
}
