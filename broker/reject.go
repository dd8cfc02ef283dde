package broker

import (
	"context"
	"time"
)

// Purges by rejection are limited per key: an upstream's 401 is not always
// about the token (a wrong audience or tenant, on a path the caller picks),
// and each purge costs a token request. On the broker clock:
//
//   - the first rejection of a cached token purges it;
//   - when its replacement is rejected too before it is RejectMinAge old
//     (or the next pause, if longer), the 401 is not about the token: it
//     is kept, and the key's purges by rejection pause; each such strike
//     doubles the pause, from RejectPauseBase up to RejectPauseMax;
//   - a rejection that the retry shows was about the token (Accepted) is
//     no strike;
//   - the strikes are forgotten once the key sees no rejection for a full
//     pause after its pause ended.
//
// A caller provoking 401s thus causes at most one token request per
// RejectMinAge and key, and about one an hour when it keeps at it.
const (
	// RejectMinAge is the age before which a token that replaced a
	// rejected one is not purged by rejection.
	RejectMinAge = 10 * time.Minute
	// RejectPauseBase is the first pause of the purges by rejection of a
	// key whose replacement token was rejected too.
	RejectPauseBase = time.Minute
	// RejectPauseMax caps the pause.
	RejectPauseMax = time.Hour
)

// Rejection is the outcome of Broker.Reject.
type Rejection uint8

// Outcomes of Broker.Reject.
const (
	// RejectionStale: the rejected token is no longer the cached one:
	// nothing was done.
	RejectionStale Rejection = iota
	// RejectionPurged: the token was purged; the next lookup fetches.
	RejectionPurged
	// RejectionKept: the key's purges by rejection are paused: the token
	// was kept and is still served.
	RejectionKept
)

// String names the outcome for logs.
func (r Rejection) String() string {
	switch r {
	case RejectionPurged:
		return "purged"
	case RejectionKept:
		return "kept"
	}
	return "stale"
}

// pauseWindow is the pause after the n-th strike (n ≥ 1).
func pauseWindow(n int) time.Duration { return doubled(RejectPauseBase, RejectPauseMax, n) }

// rejectQuiet reports whether the key saw no rejection for a full pause
// after its pause ended (or the clock went back).
func (ks *keyState) rejectQuiet(now time.Time) bool {
	since := later(ks.pausedUntil, ks.lastRej)
	return now.Before(ks.lastRej) || !now.Before(since.Add(pauseWindow(ks.strikes)))
}

// purgePause is until when the key's purges by rejection are paused at
// now; zero when they are not.
func (ks *keyState) purgePause(now time.Time) time.Time {
	if now.Before(ks.pausedUntil) {
		return ks.pausedUntil
	}
	return time.Time{}
}

// Reject is called when the upstream rejected the binding's token (401):
// the token is purged, here and in the shared tier, if it is still the
// cached one and the key's purges by rejection are not paused. A burst of
// rejections of one token causes at most one new fetch.
func (br *Broker) Reject(b *Binding, rejected Secret) Rejection {
	br.mu.Lock()
	v, ok := br.cache.Get(b.key)
	if !ok || v.(*Entry).value() != rejected {
		br.mu.Unlock()
		return RejectionStale
	}
	e := v.(*Entry)
	if br.pol.rejectKept(b, rejected, e.cachedAt(), br.opts.Now()) {
		br.mu.Unlock()
		return RejectionKept
	}
	br.purgeLocked(b.key, e)
	br.mu.Unlock()
	br.purgeShared(context.Background(), b.key, e.Fingerprint())
	return RejectionPurged
}

// rejectKept notes a rejection at now of b's cached token rejected,
// cached at cachedAt, and reports whether the token is kept rather than
// purged.
func (p *policy) rejectKept(b *Binding, rejected Secret, cachedAt, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ks := p.key(b)
	if ks.strikes > 0 && ks.rejectQuiet(now) {
		ks.strikes, ks.pausedUntil = 0, time.Time{}
	}
	kept := false
	switch {
	case ks.rejected == rejected:
		// The token purged before came back from the shared tier:
		// purged again, no strike.
	case now.Before(ks.pausedUntil) && ks.pausedUntil.Sub(now) <= RejectPauseMax:
		kept = true
	case !ks.purgedAt.IsZero() && !cachedAt.Before(ks.purgedAt) && now.Sub(cachedAt) < max(RejectMinAge, pauseWindow(ks.strikes+1)):
		// The replacement of a rejected token is rejected too: the 401
		// is not about the token.
		ks.strikes++
		ks.pausedUntil = now.Add(pauseWindow(ks.strikes))
		kept = true
	default:
		ks.purgedAt, ks.rejected = now, rejected
	}
	ks.lastRej = now
	return kept
}

// rejectedToken is the token of key last purged by rejection, which the
// shared tier must not hand out again.
func (br *Broker) rejectedToken(key string) Secret {
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ks := p.keys[key]; ks != nil {
		return ks.rejected
	}
	return ""
}

// Accepted tells the broker that the upstream accepted the binding's token
// on the retry of a request that saw the previous token rejected: that
// rejection was about the token, so a rejection of this one counts as a
// first one again. Only such a retry is evidence: a caller cannot choose
// its outcome.
func (br *Broker) Accepted(b *Binding, tok Secret) {
	br.mu.Lock()
	cur, cached := br.cache.Get(b.key)
	br.mu.Unlock()
	if !cached || cur.(*Entry).value() != tok {
		return
	}
	p := &br.pol
	p.mu.Lock()
	defer p.mu.Unlock()
	if ks := p.keys[b.key]; ks != nil && !br.opts.Now().Before(ks.pausedUntil) {
		ks.purgedAt = time.Time{}
	}
}
