package broker

import (
	"context"
	"errors"
	"net/http"
)

// Class is what a failed token request tells the failure policy: whom the
// failure concerns and whether trying again soon may help.
type Class uint8

// Classes of token API failures.
const (
	// ClassPermanent: a refusal about this key only (unknown
	// organisation, invalid scope): remembered for the key, not retried.
	ClassPermanent Class = iota
	// ClassTemporary: the provider or the network failed. Retried within
	// a fetch, remembered for the key, counted by the source's breaker.
	ClassTemporary
	// ClassRateLimited: the provider throttles the source's credential
	// (429). Retried within a fetch only after a short Retry-After; the
	// whole source backs off (policy.go). The breaker ignores it.
	ClassRateLimited
	// ClassCredential: the source's credential was refused: the whole
	// source backs off, doubled at each consecutive refusal.
	ClassCredential
	// ClassRetryNow: not a failure. The provider asked for the request
	// to be sent again at once with what its answer gave (a new DPoP
	// nonce, RFC 9449 §8). The attempt is resent once, taking budget
	// again, and the call counts for neither breaker nor failure memory;
	// the same answer to the resend is ClassTemporary.
	ClassRetryNow
)

// RetryNowError is what an Observer is told of a call answered
// ClassRetryNow: no failure. Err is the source's answer.
type RetryNowError struct {
	Err error
}

// Error describes the call the provider asked to be sent again.
func (e *RetryNowError) Error() string {
	return "asked to send the token request again at once: " + e.Err.Error()
}

// Unwrap returns the source's answer.
func (e *RetryNowError) Unwrap() error { return e.Err }

// IsRetryNow reports whether err is a *RetryNowError.
func IsRetryNow(err error) bool {
	_, ok := errors.AsType[*RetryNowError](err)
	return ok
}

// Classifier is an optional interface of a Source that classifies the
// errors its Token returns. Sources without it get DefaultClass.
type Classifier interface {
	// Classify returns the class of an error the source's Token returned.
	Classify(err error) Class
}

// DefaultClass classifies err from its shape alone: a 429 is
// ClassRateLimited, a temporary failure (IsTemporary) ClassTemporary,
// anything else ClassPermanent.
func DefaultClass(err error) Class {
	var ae *APIError
	switch {
	case errors.As(err, &ae) && ae.StatusCode == http.StatusTooManyRequests:
		return ClassRateLimited
	case IsTemporary(err):
		return ClassTemporary
	}
	return ClassPermanent
}

// ClassOf classifies an error of src's Token call, by src's Classifier
// when it has one. A cancellation is ClassPermanent, and the policy
// records it as nobody's failure.
func ClassOf(src Source, err error) Class {
	if errors.Is(err, context.Canceled) {
		return ClassPermanent
	}
	if c, ok := src.(Classifier); ok {
		return c.Classify(err)
	}
	return DefaultClass(err)
}
