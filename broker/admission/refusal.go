// Package admission decides, in plain net/http, which merchant a request
// is for and how a refused request is answered: it reads and checks the
// merchant (Selector, HeaderMerchant, CheckMerchant), gives a
// binding table the organisation check of a provider's listing (Allow),
// and answers a refusal (Refusal: the error code's status, the JSON error
// body or the message for an error page, Retry-After, the Allow header of
// a refused method), logging the refusals of one backoff once per
// RepeatInterval (NewRepeatLimiter).
package admission

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/internal/lograte"
)

// ErrorBody is the JSON body of a refused request.
type ErrorBody struct {
	Error    string `json:"error"`              // the error code (errcode.Code)
	Message  string `json:"message"`            // the code's message for the provider type
	Merchant string `json:"merchant,omitempty"` // the merchant, when known
}

// Refusal is a refused request; its status, message and Retry-After come
// from the code (package errcode).
type Refusal struct {
	Code         errcode.Code // what the caller is told
	Merchant     string       // "" before the merchant is known
	ProviderType string       // "" before the provider is known
	Cause        error        // logged, never sent to the caller
	// RetryAfter is the wait Retry-After tells the caller when Cause does
	// not say a longer one (the next read of an organisation list); 0 for
	// none.
	RetryAfter time.Duration
}

// Prepare logs the cause, if any (it never holds a secret), and sets the
// refusal's headers in h: Retry-After when the cause or RetryAfter says
// when to come back, Allow for a refused method. The lines of a cause the
// failure policy answered (broker.BackoffOf) are limited per backoff by
// limit (nil: not limited); the next line logged says how many were left
// out ("suppressed", "suppressed_since").
func (rf Refusal) Prepare(h http.Header, logger *zap.Logger, limit *lograte.Limiter[broker.Backoff]) {
	ra := rf.RetryAfter
	if rf.Cause != nil {
		rf.log(logger, limit)
		ra = max(ra, rf.Code.RetryAfter(rf.Cause))
	}
	if ra > 0 {
		h.Set("Retry-After", strconv.Itoa(int((ra+time.Second-1)/time.Second)))
	}
	if rf.Code == errcode.MethodRefused {
		h.Set("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
	}
}

// RepeatInterval is how often Prepare logs the refusals of one backoff of
// the failure policy (broker.BackoffOf).
const RepeatInterval = time.Minute

// NewRepeatLimiter returns a limiter for Prepare: one line per backoff per
// RepeatInterval, on the clock now.
func NewRepeatLimiter(now func() time.Time) *lograte.Limiter[broker.Backoff] {
	return &lograte.Limiter[broker.Backoff]{Every: RepeatInterval, Now: now}
}

// log logs the refusal's cause, unless limit leaves it out.
func (rf Refusal) log(logger *zap.Logger, limit *lograte.Limiter[broker.Backoff]) {
	fields := []zap.Field{zap.String("merchant", rf.Merchant), zap.String("error_code", rf.Code.String()),
		zap.Int("status", rf.Code.Status()), zap.Error(rf.Cause)}
	if bo, ok := broker.BackoffOf(rf.Cause); ok {
		ok, left := limit.Allow(bo)
		if !ok {
			return
		}
		scope := "key"
		switch {
		case bo.Source():
			scope = "source"
		case bo.Budget():
			scope = "budget"
		}
		fields = append(fields, zap.String("source", bo.SourceID), zap.String("backoff", scope))
		if left.Count > 0 {
			fields = append(fields, zap.Int("suppressed", left.Count), zap.Time("suppressed_since", left.Since))
		}
	}
	logger.Warn("no token for request", fields...)
}

// Write answers the refusal with its status and JSON body (ErrorBody),
// not to be cached.
func (rf Refusal) Write(w http.ResponseWriter) error {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(rf.Code.Status())
	return json.NewEncoder(w).Encode(ErrorBody{Error: rf.Code.String(), Message: rf.Code.Message(rf.ProviderType), Merchant: rf.Merchant})
}

// Public returns what the caller may be shown of the refusal, for a
// server's own error pages: "code: message", never the cause, which may
// quote the provider (Prepare logs it).
func (rf Refusal) Public() error {
	return errors.New(rf.Code.String() + ": " + rf.Code.Message(rf.ProviderType))
}

// Unbound returns the refusal of a valid merchant id whose binding
// bindings.Table.Get did not give (err).
func Unbound(merchant string, err error) Refusal {
	var lr *listingRefusal
	switch {
	case errors.As(err, &lr):
		return Refusal{Code: lr.code, Merchant: merchant, RetryAfter: lr.retryAfter}
	case errors.Is(err, bindings.ErrTooManyMerchants):
		return Refusal{Code: errcode.TooManyMerchants, Merchant: merchant}
	case errors.Is(err, bindings.ErrUnknownMerchant):
		return Refusal{Code: errcode.UnknownMerchant, Merchant: merchant}
	}
	return Refusal{Code: errcode.UnknownMerchant, Merchant: merchant, Cause: err}
}

// Allow returns the listing's check as bindings.Config.Allow: nil when
// there is no listing. Its errors are answered by Unbound with the
// listing's code; organisations_unavailable carries the wait until the
// list is read again (listing.Listing.RetryAfter) as Retry-After.
func Allow(l *listing.Listing) func(organisation string) error {
	if l == nil {
		return nil
	}
	return func(org string) error {
		code := l.Allows(org)
		if code == 0 {
			return nil
		}
		lr := &listingRefusal{code: code}
		if code == errcode.OrganisationsUnavailable {
			lr.retryAfter = l.RetryAfter()
		}
		return lr
	}
}

// listingRefusal is the organisation listing's refusal of a wildcard
// merchant (listing.Listing.Allows).
type listingRefusal struct {
	code errcode.Code
	// retryAfter is how long until the list is read again (RetryAfter of
	// the listing); 0 when not known.
	retryAfter time.Duration
}

func (e *listingRefusal) Error() string { return "organisation refused: " + e.code.String() }
