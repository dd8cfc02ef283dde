package broker

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// APIError is a failure reported by a provider's token API: an error status,
// an error body, or a success status whose body could not be used. Its
// fields never contain a credential or a token.
type APIError struct {
	// Provider is the source type ("nuapay", "oauth2").
	Provider string
	// StatusCode is the HTTP status the token API answered with.
	StatusCode int
	// Code is the provider's error code: Nuapay's returnCode, OAuth's
	// "error" ("invalid_client").
	Code string
	// Description is the provider's human-readable explanation: Nuapay's
	// returnDescription (with the details), OAuth's error_description.
	Description string
	// RetryAfter is the wait the provider asked for (ParseWait), zero
	// when it did not say.
	RetryAfter time.Duration
	// Details are Nuapay's error details, if any.
	Details []ErrorDetail
	// Err is the underlying cause, if any (a malformed response's,
	// ErrUnknownOrganisation).
	Err error
}

// ErrorDetail is one entry of Nuapay's error "details".
type ErrorDetail struct {
	// Code is the detail's error code.
	Code string `json:"code"`
	// Description explains the detail.
	Description string `json:"description"`
	// Field names the request field at fault, if any.
	Field string `json:"field"`
}

// Error describes the failure without any credential.
func (e *APIError) Error() string {
	msg := fmt.Sprintf("%s token API answered %d", e.Provider, e.StatusCode)
	if e.Code != "" {
		msg += " " + e.Code
	}
	if e.Description != "" {
		msg += ": " + e.Description
	}
	for _, d := range e.Details {
		if d.Code == "" && d.Field == "" {
			msg += " [" + d.Description + "]"
			continue
		}
		msg += fmt.Sprintf(" [%s %s: %s]", d.Code, d.Field, d.Description)
	}
	if e.Err != nil {
		msg += ": " + e.Err.Error()
	}
	return msg
}

// Unwrap returns the underlying cause.
func (e *APIError) Unwrap() error { return e.Err }

// CodeTooLarge is the Code of an *APIError for an answer whose body is
// over the limit a source reads (httpclient.MaxResponseBytes); its class
// follows the status.
const CodeTooLarge = "response_too_large"

// Temporary reports whether trying again later may succeed
// (TemporaryStatus).
func (e *APIError) Temporary() bool { return TemporaryStatus(e.StatusCode) }

// TemporaryStatus reports whether an answer's status says that the server
// failed or is busy, so that the same request may succeed later: 408,
// 425, 429 and 5xx.
func TemporaryStatus(status int) bool {
	switch status {
	case http.StatusRequestTimeout, http.StatusTooEarly, http.StatusTooManyRequests:
		return true
	}
	return status >= 500
}

// IsTimeout reports whether err is a deadline or network timeout.
func IsTimeout(err error) bool {
	if errors.Is(err, context.DeadlineExceeded) {
		return true
	}
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// IsTemporary reports whether err is worth retrying: a temporary API error,
// or any failure that is not an API error, a RequestError or a
// cancellation (timeouts, connection failures, a failed discovery).
func IsTemporary(err error) bool {
	if err == nil || errors.Is(err, context.Canceled) {
		return false
	}
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.Temporary()
	}
	var cfgErr *RequestError
	if errors.As(err, &cfgErr) {
		return false
	}
	return true // transport errors: refused, reset, DNS, timeouts
}

// RequestError is a token request the source refused to send because it
// could never succeed (an organisation id that is not a path segment, say).
type RequestError struct {
	// Merchant is the merchant the request was for.
	Merchant string
	// Field names the offending request field.
	Field string
	// Reason explains what is wrong.
	Reason string
}

// Error describes the refused request.
func (e *RequestError) Error() string {
	return fmt.Sprintf("merchant %q: %s: %s", e.Merchant, e.Field, e.Reason)
}

// maxRetryAfter caps a provider's Retry-After: a broken or hostile value must
// not silence a provider for days.
const maxRetryAfter = time.Hour

// ParseRetryAfter reads a Retry-After header in seconds or as an HTTP date,
// capped at one hour; 0 when absent or malformed.
func ParseRetryAfter(v string, now time.Time) time.Duration {
	if v == "" {
		return 0
	}
	secs, err := strconv.Atoi(strings.TrimSpace(v))
	if errors.Is(err, strconv.ErrRange) {
		err = nil // too many digits: secs is the longest wait, or a negative one
	}
	if err == nil {
		if secs < 0 {
			return 0
		}
		return time.Duration(min(secs, int(maxRetryAfter/time.Second))) * time.Second
	}
	if t, err := http.ParseTime(v); err == nil && t.After(now) {
		return min(t.Sub(now), maxRetryAfter)
	}
	return 0
}

// ParseWait returns the wait a token API's error answer of status with
// headers h asks for, read at now: its Retry-After (ParseRetryAfter), or
// for a 429 or a 503 the reset of a spent quota (budget.ResetAfter; a
// reset without a count only on a 429), capped as a Retry-After is; 0 for
// none. Every source reads an error answer's wait with it.
func ParseWait(status int, h http.Header, now time.Time) time.Duration {
	if d := ParseRetryAfter(h.Get("Retry-After"), now); d > 0 {
		return d
	}
	if status != http.StatusTooManyRequests && status != http.StatusServiceUnavailable {
		return 0
	}
	return min(budget.ResetAfter(h, now, status == http.StatusTooManyRequests), maxRetryAfter)
}

// ErrUnknownOrganisation is in the chain of a token request's error when
// the provider does not know the merchant's organisation. It is permanent.
var ErrUnknownOrganisation = errors.New("the provider does not know the merchant's organisation: check its organisation id in the registry")

// ErrExpiredToken is returned when a provider hands out a token that is
// already expired, or about to be.
var ErrExpiredToken = errors.New("the token API returned a token that is already expired (check the clocks and the configured token lifetime)")

// UnavailableError is returned without calling the token API: the source's
// circuit breaker is open after repeated failures.
type UnavailableError struct {
	// SourceID is the source whose breaker is open.
	SourceID string
	// RetryAfter is how long until the breaker lets a probe through.
	RetryAfter time.Duration
	// Until is when the breaker lets a probe through (broker clock).
	Until time.Time
	// Err is the last failure behind the open breaker, or this fetch's
	// last; nil when unknown.
	Err error
}

// Error describes the open breaker and the failure behind it.
func (e *UnavailableError) Error() string {
	when := "for another " + e.RetryAfter.Round(time.Millisecond).String()
	if !e.Until.IsZero() {
		when = "before " + e.Until.UTC().Format(time.RFC3339)
	}
	msg := fmt.Sprintf("token API of %s is failing: not called %s (circuit breaker open)", e.SourceID, when)
	if e.Err != nil {
		msg += "; last failure: " + e.Err.Error()
	}
	return msg
}

// Unwrap returns the provider failure behind the open breaker.
func (e *UnavailableError) Unwrap() error { return e.Err }

// RetryAfterOf returns how long a caller should wait before trying again
// after err, or 0 when nobody said: the failure policy's backoff first,
// then an open breaker's wait, an exhausted budget's, the provider's.
func RetryAfterOf(err error) time.Duration {
	var he *backoffError
	if errors.As(err, &he) {
		return he.retryAfter
	}
	var ue *UnavailableError
	if errors.As(err, &ue) {
		return ue.RetryAfter
	}
	var ee *budget.ExhaustedError
	if errors.As(err, &ee) {
		return ee.RetryAfter
	}
	var ae *APIError
	if errors.As(err, &ae) {
		return ae.RetryAfter
	}
	return 0
}
