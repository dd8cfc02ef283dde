// Package breaker is a circuit breaker on an injected clock, shared by the
// broker (one per token API source) and the shared tier (one per Redis
// client). It opens after Threshold consecutive failures, refuses calls for
// Cooldown, then lets one probe through (half-open): the probe's success
// closes it, its failure opens it again for another Cooldown. A probe that
// is never reported stops blocking after a Cooldown. Times come from the
// caller, so tests move a clock and never sleep.
//
// A slow answer (outcome Slow: a call that timed out) is not a failure at
// first: a burst of them says the service is busy, not gone. Slow outcomes
// count as failures only once they have lasted SlowSpan without a healthy
// answer in between; from then on each one counts like Failed, so a
// service that stopped answering still opens the breaker, after SlowSpan
// plus Threshold slow calls.
package breaker

import (
	"sync"
	"time"
)

// State is the state of a breaker (the values are those of the metrics
// gauge).
type State int

// Breaker states.
const (
	Closed State = iota
	HalfOpen
	Open
)

// String names the state.
func (s State) String() string {
	switch s {
	case Closed:
		return "closed"
	case HalfOpen:
		return "half-open"
	case Open:
		return "open"
	}
	return "unknown"
}

// Outcome is what a call let through by Allow says about the service.
type Outcome uint8

// Outcomes of a call.
const (
	// Healthy: the call worked; the breaker closes.
	Healthy Outcome = iota
	// Failed: the service failed; it counts towards opening.
	Failed
	// Answered: the service answered but refused this caller (a
	// permanent or rate-limit refusal): a probe closes the breaker,
	// otherwise the count of failures is unchanged.
	Answered
	// Unknown: nothing was learnt (the caller gave up); a probe is
	// released without deciding.
	Unknown
	// Slow: the call timed out. Until slow outcomes have lasted SlowSpan
	// without a Healthy or Answered one in between, it is treated as
	// Unknown; after that, as Failed.
	Slow
)

// Breaker is one circuit breaker. The zero value is a closed breaker that
// never opens; set Threshold and Cooldown before use. Safe for concurrent
// use.
type Breaker struct {
	// Threshold is how many consecutive failures open the breaker.
	Threshold int
	// Cooldown is how long the open breaker refuses calls before a probe.
	Cooldown time.Duration
	// SlowSpan is how long slow outcomes must last, without a healthy
	// answer, before each one counts as a failure. Zero: a slow outcome
	// is a failure at once.
	SlowSpan time.Duration

	mu         sync.Mutex
	state      State
	failures   int
	openUntil  time.Time
	probeUntil time.Time // a probe is out until this; zero when none
	cause      error     // the failure that opened it
	lastUsed   time.Time
	slowSince  time.Time // the first slow outcome since the last healthy one; zero when none
}

// Allow reports whether a call may go out at now; if not, for how long
// calls stay refused and the failure that opened the breaker. changed is
// true when this call moved the breaker to half-open (it is the probe).
// A clock that went back more than Cooldown does not keep the breaker
// open for longer than Cooldown.
func (b *Breaker) Allow(now time.Time) (ok bool, wait time.Duration, changed bool, cause error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.lastUsed = now
	switch b.state {
	case Open:
		if now.Before(b.openUntil) && b.openUntil.Sub(now) <= b.Cooldown {
			return false, b.openUntil.Sub(now), false, b.cause
		}
		b.state, b.probeUntil = HalfOpen, now.Add(b.Cooldown)
		return true, 0, true, nil
	case HalfOpen:
		if !b.probeUntil.IsZero() && now.Before(b.probeUntil) && b.probeUntil.Sub(now) <= b.Cooldown {
			return false, b.Cooldown / 10, false, b.cause
		}
		b.probeUntil = now.Add(b.Cooldown)
	}
	return true, 0, false, nil
}

// Record notes the outcome of a call Allow let through, with the error
// behind a failure, and returns the state before and after it.
func (b *Breaker) Record(now time.Time, o Outcome, err error) (from, to State) {
	b.mu.Lock()
	defer b.mu.Unlock()
	from = b.state
	b.lastUsed = now
	if o == Slow {
		o = b.slow(now)
	}
	switch o {
	case Healthy:
		b.state, b.failures, b.cause, b.slowSince = Closed, 0, nil, time.Time{}
	case Answered:
		b.slowSince = time.Time{}
		if b.state == HalfOpen {
			b.state, b.failures, b.cause = Closed, 0, nil
		}
	case Failed:
		b.failures++
		if b.state == HalfOpen || (b.Threshold > 0 && b.failures >= b.Threshold) {
			b.state, b.openUntil, b.cause, b.failures = Open, now.Add(b.Cooldown), err, 0
		}
	}
	b.probeUntil = time.Time{}
	return from, b.state
}

// slow is what a slow outcome at now counts as: Unknown while slow
// outcomes have lasted less than SlowSpan, Failed after. b.mu is held.
func (b *Breaker) slow(now time.Time) Outcome {
	if b.slowSince.IsZero() || now.Before(b.slowSince) {
		b.slowSince = now
	}
	if now.Sub(b.slowSince) < b.SlowSpan {
		return Unknown
	}
	return Failed
}

// State returns the breaker's state.
func (b *Breaker) State() State {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.state
}

// Idle reports whether the breaker can be dropped: no probe out (a probe
// never reported counts as none once its time ended by cutoff), closed or
// open until before cutoff, and unused since before cutoff.
func (b *Breaker) Idle(cutoff time.Time) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	noProbe := b.probeUntil.IsZero() || !cutoff.Before(b.probeUntil)
	return b.lastUsed.Before(cutoff) && noProbe && (b.state != Open || b.openUntil.Before(cutoff))
}
