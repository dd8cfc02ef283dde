package broker

import "time"

// SourceHealth is what the broker knows of one source's recent failures.
type SourceHealth struct {
	// Breaker is the state of the source's circuit breaker.
	Breaker BreakerState
	// BackoffUntil is when the source's backoff ends; zero when none
	// applies.
	BackoffUntil time.Time
	// BackoffError is the failure behind BackoffUntil.
	BackoffError error
	// BackoffAt is when BackoffError happened (broker clock).
	BackoffAt time.Time
	// FailingKeys counts the source's keys in backoff now.
	FailingKeys int
	// LastError is the most recent failure of those keys, nil when none.
	LastError error
	// LastFailure is when LastError happened (broker clock).
	LastFailure time.Time
}

// Failing reports whether the source has failed recently: its breaker is
// not closed, it is in backoff, or some of its keys are.
func (h SourceHealth) Failing() bool {
	return h.Breaker != BreakerClosed || !h.BackoffUntil.IsZero() || h.FailingKeys > 0
}
