package broker

import (
	"context"
	"errors"
	"sync"
	"time"
)

// BreakerState is the state of a source's circuit breaker.
type BreakerState int

// Breaker states (the values are those of the metrics gauge).
const (
	BreakerClosed BreakerState = iota
	BreakerHalfOpen
	BreakerOpen
)

// String names the state.
func (s BreakerState) String() string {
	switch s {
	case BreakerClosed:
		return "closed"
	case BreakerHalfOpen:
		return "half-open"
	case BreakerOpen:
		return "open"
	}
	return "unknown"
}

// breaker is a per-source circuit breaker on the broker's clock: it opens
// after Threshold consecutive temporary failures, refuses calls for the
// configured cooldown, then lets one probe through (half-open) and closes on
// the probe's success. Permanent errors (bad credentials for one merchant,
// unknown organisation) and 429s do not count: they say nothing about the
// provider's health. A provider's Retry-After does not lengthen the
// cooldown: it is kept in the failure memory of the key that received it.
//
// It is written here rather than taken from a library because it must run
// on the injected clock, so that tests move time instead of sleeping.
type breaker struct {
	mu        sync.Mutex
	state     BreakerState
	failures  int
	openUntil time.Time
	probing   bool
	lastErr   error     // the failure that opened it, for UnavailableError
	lastUsed  time.Time // broker clock; idle breakers are dropped
}

// allow reports whether a call may go out now; if not, for how long the
// breaker stays open and the failure that opened it. halfOpen is true when
// this call moved the breaker from open to half-open (the probe).
func (b *breaker) allow(now time.Time, cooldown time.Duration) (ok bool, wait time.Duration, halfOpen bool, cause error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lastUsed = now
	switch b.state {
	case BreakerOpen:
		// A clock that went back more than the cooldown must not keep
		// the breaker open for longer than the cooldown.
		if now.Before(b.openUntil) && b.openUntil.Sub(now) <= cooldown {
			return false, b.openUntil.Sub(now), false, b.lastErr
		}
		b.state, b.probing = BreakerHalfOpen, true
		return true, 0, true, nil
	case BreakerHalfOpen:
		if b.probing {
			return false, cooldown / 10, false, b.lastErr
		}
		b.probing = true
		return true, 0, false, nil
	}
	return true, 0, false, nil
}

// record notes the outcome of a call let through by allow and returns the
// new state and whether it changed.
func (b *breaker) record(now time.Time, err error, threshold int, cooldown time.Duration) (BreakerState, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	before := b.state
	b.lastUsed = now
	switch {
	case errors.Is(err, context.Canceled):
		// Nobody learnt anything about the provider.
	case err == nil || !IsTemporary(err) || isRateLimit(err):
		// A 429 throttles one client or organisation; it is remembered for
		// its key (Retry-After) but says nothing about the provider's health.
		if err == nil || b.state == BreakerHalfOpen {
			b.state, b.failures, b.lastErr = BreakerClosed, 0, nil
		}
	default:
		b.failures++
		if b.state == BreakerHalfOpen || b.failures >= threshold {
			b.state, b.openUntil, b.lastErr = BreakerOpen, now.Add(cooldown), err
		}
	}
	b.probing = false
	return b.state, b.state != before
}

func (b *breaker) current() BreakerState {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state
}

// idle reports whether the breaker can be dropped: closed, or open long
// enough ago, and unused since before cutoff.
func (b *breaker) idle(cutoff time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.lastUsed.Before(cutoff) && !b.probing && (b.state != BreakerOpen || b.openUntil.Before(cutoff))
}

// breaker returns the breaker of a source, creating it.
func (br *Broker) breaker(sourceID string) *breaker {
	if v, ok := br.breakers.Load(sourceID); ok {
		return v.(*breaker)
	}
	v, _ := br.breakers.LoadOrStore(sourceID, &breaker{lastUsed: br.opts.Now()})
	return v.(*breaker)
}

// BreakerState returns the state of a source's circuit breaker (closed for a
// source that has none yet).
func (br *Broker) BreakerState(sourceID string) BreakerState {
	if v, ok := br.breakers.Load(sourceID); ok {
		return v.(*breaker).current()
	}
	return BreakerClosed
}
