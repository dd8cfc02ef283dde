package broker

import (
	"errors"
	"net/http"
	"time"
)

// Some token API failures are about the source's credential, not about a
// key: a 429 with Retry-After throttles the API key or client, and a client
// authentication failure (OAuth invalid_client, Nuapay 401) says the
// credential itself is bad. They hold the whole source (every organisation,
// scope set and merchant of it), checked before the key's failure memory,
// for foreground and refresh-ahead fetches alike:
//
//   - 429 with Retry-After: no call to the source until it has passed
//     (capped at MaxRetryAfterMemory);
//   - client authentication failure: FailureTTL, doubled with each
//     consecutive one, up to FailureMax.
//
// Other refusals (Nuapay 403/404/422, invalid_scope) can be about one
// organisation and stay in the key's memory only.

// sourceHold is the failure memory of one source.
type sourceHold struct {
	err      error
	at       time.Time // when it was set (broker clock)
	until    time.Time
	failures int // consecutive client authentication failures
	obs      Observer
}

func (h *sourceHold) holds(now time.Time) bool {
	return !now.Before(h.at) && now.Before(h.until)
}

// SourceObserver is an optional interface of an Observer: it is told when a
// source starts being held (its token API is not called for any key, see
// Broker.SourceHold) and when it stops.
type SourceObserver interface {
	SourceBackingOff(sourceID string, on bool)
}

// isClientAuthFailure reports whether err says the source's credential is
// bad: OAuth invalid_client, or Nuapay's 401 (bad API key).
func isClientAuthFailure(err error) bool {
	var ae *APIError
	if !errors.As(err, &ae) {
		return false
	}
	return ae.Code == "invalid_client" || (ae.Provider == "nuapay" && ae.StatusCode == http.StatusUnauthorized)
}

// sourceHeld returns the hold of b's source if it answers at now.
func (br *Broker) sourceHeld(b *Binding, now time.Time) *sourceHold {
	if v, ok := br.sourceHolds.Load(b.SourceID); ok {
		if h := v.(*sourceHold); h.holds(now) {
			return h
		}
	}
	return nil
}

// rememberSource holds b's source after a fetch failed with err, when err is
// about the source's credential; a success (err nil) forgets a hold.
func (br *Broker) rememberSource(b *Binding, err error, calls int, now time.Time) {
	var prev *sourceHold
	if v, ok := br.sourceHolds.Load(b.SourceID); ok {
		prev = v.(*sourceHold)
	}
	if err == nil {
		if prev != nil && br.sourceHolds.CompareAndDelete(b.SourceID, prev) {
			sourceBackingOff(prev.obs, b.SourceID, false)
		}
		return
	}
	if calls == 0 || br.opts.FailureTTL < 0 {
		return
	}
	var wait time.Duration
	n := 0
	switch {
	case isRateLimit(err) && RetryAfterOf(err) > 0:
		wait = min(RetryAfterOf(err), MaxRetryAfterMemory)
		if prev != nil {
			n = prev.failures
		}
	case isClientAuthFailure(err):
		if prev != nil && !now.Before(prev.at) && now.Before(prev.until.Add(br.opts.FailureMax)) {
			n = prev.failures
		}
		n++
		wait = br.opts.FailureMax
		if n < 31 {
			wait = min(br.opts.FailureTTL<<(n-1), br.opts.FailureMax)
		}
	default:
		return
	}
	h := &sourceHold{err: err, at: now, until: now.Add(wait), failures: n, obs: br.observer(b)}
	if old, loaded := br.sourceHolds.Swap(b.SourceID, h); loaded {
		h.obs = old.(*sourceHold).obs // told already
		return
	}
	sourceBackingOff(h.obs, b.SourceID, true)
}

func sourceBackingOff(obs Observer, sourceID string, on bool) {
	if so, ok := obs.(SourceObserver); ok {
		so.SourceBackingOff(sourceID, on)
	}
}

// SourceHold returns until when a source's token API is not called for any
// key, and the failure behind it; zero when no hold is in force.
func (br *Broker) SourceHold(sourceID string) (until time.Time, err error) {
	if v, ok := br.sourceHolds.Load(sourceID); ok {
		if h := v.(*sourceHold); h.holds(br.opts.Now()) {
			return h.until, h.err
		}
	}
	return time.Time{}, nil
}

// sweepSources forgets source holds that ended more than FailureMax ago.
func (br *Broker) sweepSources(now time.Time) {
	br.sourceHolds.Range(func(k, v any) bool {
		if h := v.(*sourceHold); now.Before(h.at) || !now.Before(h.until.Add(br.opts.FailureMax)) {
			if br.sourceHolds.CompareAndDelete(k, v) {
				sourceBackingOff(h.obs, k.(string), false)
			}
		}
		return true
	})
}
