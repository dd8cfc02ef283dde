package broker

import (
	"context"
	"errors"
	"net/http"
)

// Class is what a failed token request tells the failure policy: whom the
// failure concerns (the key, or the source's credential) and whether trying
// again soon may help.
type Class uint8

// Classes of token API failures.
const (
	// ClassPermanent: a refusal about this key only (unknown
	// organisation, consent required, invalid scope, a malformed answer):
	// remembered for the key, never retried within a fetch.
	ClassPermanent Class = iota
	// ClassTemporary: the provider or the network failed (timeout,
	// refused connection, 5xx). Retried within a fetch with backoff,
	// remembered for the key, counted by the source's breaker.
	ClassTemporary
	// ClassRateLimited: the provider throttles the source's credential
	// (429). Retried within a fetch only when its Retry-After is short;
	// it puts the whole source in backoff: for its Retry-After, or
	// without one as a refused credential does. The breaker ignores it.
	ClassRateLimited
	// ClassCredential: the source's credential itself was refused (a bad
	// API key or client secret): the whole source is in backoff, doubled
	// at each consecutive refusal.
	ClassCredential
	// ClassRetryNow: not a failure. The provider asked for the request
	// to be sent again at once with what its answer gave (a new DPoP
	// nonce, RFC 9449 §8). The attempt is sent once more without a wait,
	// taking budget again like any call, holding the breaker's probe it
	// held, and neither the breaker nor the failure memory counts the
	// call; its observer is told of it with a *RetryNowError. Once per
	// attempt: the same answer to that second call is ClassTemporary. A
	// budget that refuses the second call ends the fetch as it ends one
	// it refuses before that attempt: in the first attempt with its
	// refusal, not recorded; in a later one with the error of the call
	// before the attempt, recorded.
	ClassRetryNow
)

// RetryNowError is the error an Observer is told (Fetched, and
// FetchDone's Attempt.Err) of a call answered ClassRetryNow: the provider
// asked for the call to be sent again at once. It is no failure: the
// call counts as a call, neither the provider's nor the merchant's
// failure. Err is the source's answer.
type RetryNowError struct {
	Err error
}

// Error describes the call the provider asked to be sent again.
func (e *RetryNowError) Error() string {
	return "asked to send the token request again at once: " + e.Err.Error()
}

// Unwrap returns the source's answer.
func (e *RetryNowError) Unwrap() error { return e.Err }

// IsRetryNow reports whether err is a call's *RetryNowError: a call that
// is no failure.
func IsRetryNow(err error) bool {
	_, ok := errors.AsType[*RetryNowError](err)
	return ok
}

// Classifier is an optional interface of a Source: it classifies the
// errors its Token returns, since only the source knows what its
// provider's answers mean (which status or code says the credential is
// bad). Sources without it get DefaultClass.
type Classifier interface {
	// Classify returns the class of an error the source's Token returned.
	Classify(err error) Class
}

// DefaultClass classifies err from its shape alone: a 429 is
// ClassRateLimited, a temporary failure (IsTemporary) ClassTemporary, and
// anything else ClassPermanent. Sources' Classify methods fall back on it.
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

// ClassOf classifies an error of src's Token call: the source's own
// classification when it has one. Cancellation is not classified (the
// caller reports it as nobody's failure).
func ClassOf(src Source, err error) Class {
	if errors.Is(err, context.Canceled) {
		return ClassPermanent
	}
	if c, ok := src.(Classifier); ok {
		return c.Classify(err)
	}
	return DefaultClass(err)
}
