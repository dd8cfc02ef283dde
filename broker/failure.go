package broker

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"net/http"
	"sync"
	"time"
)

// Defaults of the failure policy in Options.
const (
	DefaultMaxAttempts      = 3
	DefaultBackoffBase      = 100 * time.Millisecond
	DefaultBackoffMax       = 2 * time.Second
	DefaultFailureTTL       = 2 * time.Second
	DefaultBreakerThreshold = 5
	DefaultBreakerCooldown  = 10 * time.Second
)

// UnavailableError is returned without calling the token API: the source's
// circuit breaker is open after repeated failures. RetryAfter says when the
// next attempt will be let through.
type UnavailableError struct {
	// SourceID is the source whose breaker is open.
	SourceID string
	// RetryAfter is how long until the breaker lets a probe through.
	RetryAfter time.Duration
}

// Error describes the open breaker.
func (e *UnavailableError) Error() string {
	return fmt.Sprintf("token API of %s is failing: not called for another %s (circuit breaker open)", e.SourceID, e.RetryAfter.Round(time.Millisecond))
}

// RetryAfterOf returns how long a caller should wait before trying again
// after err, or 0 when nobody said.
func RetryAfterOf(err error) time.Duration {
	var ue *UnavailableError
	if errors.As(err, &ue) {
		return ue.RetryAfter
	}
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.RetryAfter
	}
	return 0
}

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
	return [...]string{"closed", "half-open", "open"}[s]
}

// breaker is a per-source circuit breaker on the broker's clock: it opens
// after Threshold consecutive temporary failures, lets one probe through
// after Cooldown (half-open), and closes on the probe's success. Permanent
// errors (bad credentials for one merchant, unknown organisation) do not
// count: they say nothing about the provider's health.
//
// It is written here rather than taken from a library because it must run
// on the injected clock, so that tests move time instead of sleeping.
type breaker struct {
	mu        sync.Mutex
	state     BreakerState
	failures  int
	openUntil time.Time
	probing   bool
}

// allow reports whether a call may go out now, and if not, for how long the
// breaker stays open.
func (b *breaker) allow(now time.Time, cooldown time.Duration) (bool, time.Duration) {
	b.mu.Lock()
	defer b.mu.Unlock()
	switch b.state {
	case BreakerOpen:
		if now.Before(b.openUntil) {
			return false, b.openUntil.Sub(now)
		}
		b.state, b.probing = BreakerHalfOpen, true
		return true, 0
	case BreakerHalfOpen:
		if b.probing {
			return false, cooldown / 10
		}
		b.probing = true
		return true, 0
	}
	return true, 0
}

// record notes the outcome of a call let through by allow and returns the
// new state and whether it changed.
func (b *breaker) record(now time.Time, err error, threshold int, cooldown time.Duration) (BreakerState, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	before := b.state
	switch {
	case err == nil || !IsTemporary(err) || isRateLimit(err):
		// A 429 throttles one client or organisation; it is remembered for
		// its key (Retry-After) but says nothing about the provider's health.
		if err == nil || b.state == BreakerHalfOpen {
			b.state, b.failures = BreakerClosed, 0
		}
	default:
		b.failures++
		if b.state == BreakerHalfOpen || b.failures >= threshold {
			wait := max(cooldown, RetryAfterOf(err))
			b.state, b.openUntil = BreakerOpen, now.Add(wait)
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

// failure is a remembered fetch failure of one key.
type failure struct {
	err   error
	until time.Time
}

// backoff returns the wait before attempt n+1 (n ≥ 1): exponential from
// base, capped at max, with full jitter (uniform in [d/2, d]).
func backoff(n int, base, maxWait time.Duration) time.Duration {
	d := base << (n - 1)
	if d > maxWait || d <= 0 {
		d = maxWait
	}
	return d/2 + rand.N(d/2+1)
}

// sleepCtx waits d or until ctx ends.
func sleepCtx(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// isRateLimit reports whether err is a 429 from the token API.
func isRateLimit(err error) bool {
	var ae *APIError
	return errors.As(err, &ae) && ae.StatusCode == http.StatusTooManyRequests
}
