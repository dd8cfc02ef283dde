package broker

import "time"

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

// rejectQuiet reports whether the key saw no rejection for a full window
// after its hold ended (or the clock went back): its strikes are
// forgotten.
func (ks *keyState) rejectQuiet(now time.Time) bool {
	since := later(ks.holdUntil, ks.lastRej)
	return now.Before(ks.lastRej) || !now.Before(since.Add(holdWindow(ks.strikes)))
}

// rejectHold is until when the key's purges by rejection are on hold at
// now; zero when they are not.
func (ks *keyState) rejectHold(now time.Time) time.Time {
	if now.Before(ks.holdUntil) {
		return ks.holdUntil
	}
	return time.Time{}
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
	if br.pol.rejectHeld(b, rejected, e.cachedAt(), br.opts.Now()) {
		br.mu.Unlock()
		return RejectionHeld
	}
	e.stale.Store(true)
	br.cache.Delete(b.key)
	br.purgingLocked(b.key, rejected.Fingerprint())
	br.mu.Unlock()
	br.purgeShared(b.key, rejected.Fingerprint())
	return RejectionPurged
}

// rejectHeld notes a rejection at now of b's cached token rejected,
// cached at cachedAt, and reports whether it is held (kept) rather than
// purged.
func (p *policy) rejectHeld(b *Binding, rejected Secret, cachedAt, now time.Time) bool {
	p.mu.Lock()
	defer p.mu.Unlock()
	ks := p.key(b)
	if ks.strikes > 0 && ks.rejectQuiet(now) {
		ks.strikes, ks.holdUntil = 0, time.Time{}
	}
	held := false
	switch {
	case ks.rejected == rejected:
		// The token purged before came back (another lookup adopted it
		// from the shared tier before its purge there reached it): it is
		// purged again, and that is no strike.
	case now.Before(ks.holdUntil) && ks.holdUntil.Sub(now) <= RejectHoldMax:
		held = true
	case !ks.purgedAt.IsZero() && !cachedAt.Before(ks.purgedAt) && now.Sub(cachedAt) < max(RejectMinAge, holdWindow(ks.strikes+1)):
		// The replacement of a rejected token is rejected too: the 401
		// is not about the token.
		ks.strikes++
		ks.holdUntil = now.Add(holdWindow(ks.strikes))
		held = true
	default:
		ks.purgedAt, ks.rejected = now, rejected
	}
	ks.lastRej = now
	return held
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
// when a request that saw the previous token rejected was sent again with
// it: that rejection was about the token (revoked, say), so a rejection of
// this token counts as a first one again. Only the retry of a rejected
// request is evidence: a caller cannot choose its outcome.
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
	if ks := p.keys[b.key]; ks != nil && !br.opts.Now().Before(ks.holdUntil) {
		ks.purgedAt = time.Time{}
	}
}
