package broker

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"testing"
	"time"
)

// ParseRetryAfter reads delay-seconds and HTTP dates, capped at an hour:
// a value too long for an int is the longest wait, not none.
func TestParseRetryAfter(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	for _, tt := range []struct {
		in   string
		want time.Duration
	}{
		{"", 0},
		{"120", 2 * time.Minute},
		{" 7 ", 7 * time.Second},
		{"-5", 0},
		{"soon", 0},
		{"7200", time.Hour},
		{"99999999999999999999", time.Hour},
		{"-99999999999999999999", 0},
		{now.Add(90 * time.Second).Format(http.TimeFormat), 90 * time.Second},
		{now.Add(-time.Minute).Format(http.TimeFormat), 0},
		{now.Add(48 * time.Hour).Format(http.TimeFormat), time.Hour},
	} {
		if got := ParseRetryAfter(tt.in, now); got != tt.want {
			t.Errorf("ParseRetryAfter(%q) = %s, want %s", tt.in, got, tt.want)
		}
	}
}

// ParseWait reads an error answer's Retry-After and, without a usable one
// on a 429 or 503, the reset of a quota its rate-limit headers say is
// spent: the IETF draft's RateLimit (both forms) or RateLimit-Reset
// before X-RateLimit-Reset (seconds, or a Unix time), each capped as a
// Retry-After is. A 429's reset without a count is read only when no
// header gives a count; a 503's only when a quota says none remaining. A
// quota with requests left (and none spent), a reset in the past, a
// policy (RateLimit-Policy) or another status give no wait.
func TestParseWait(t *testing.T) {
	now := time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)
	unix := func(d time.Duration) string { return strconv.FormatInt(now.Add(d).Unix(), 10) }
	hdr := func(kv ...string) http.Header {
		h := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			h.Add(kv[i], kv[i+1])
		}
		return h
	}
	for _, tt := range []struct {
		name   string
		status int
		h      http.Header
		want   time.Duration
	}{
		{"nothing", 429, nil, 0},
		{"Retry-After", 429, hdr("Retry-After", "7"), 7 * time.Second},
		{"Retry-After on another status", 400, hdr("Retry-After", "7"), 7 * time.Second},
		{"Retry-After before RateLimit", 429, hdr("Retry-After", "7", "RateLimit-Reset", "30"), 7 * time.Second},
		{"unusable Retry-After, then RateLimit", 429, hdr("Retry-After", "soon", "RateLimit-Reset", "30"), 30 * time.Second},
		{"draft RateLimit-Reset alone", 429, hdr("RateLimit-Reset", "30"), 30 * time.Second},
		{"draft RateLimit-Reset, none remaining", 429, hdr("RateLimit-Remaining", "0", "RateLimit-Reset", "30"), 30 * time.Second},
		{"draft RateLimit-Reset, some remaining", 429, hdr("RateLimit-Remaining", "4", "RateLimit-Reset", "30"), 0},
		{"RateLimit dictionary", 429, hdr("RateLimit", "limit=100, remaining=0, reset=30", "RateLimit-Policy", "100;w=60"), 30 * time.Second},
		{"RateLimit dictionary, some remaining", 429, hdr("RateLimit", "limit=100, remaining=5, reset=30"), 0},
		{"RateLimit items, the spent one", 429, hdr("RateLimit", `"burst";r=5;t=1, "day";r=0;t=600`, "RateLimit-Policy", `"burst";q=10;w=1, "day";q=1000;w=86400`), 10 * time.Minute},
		{"RateLimit items, two spent: the later", 429, hdr("RateLimit", `"a";r=0;t=20, "b";r=0;t=40`), 40 * time.Second},
		{"RateLimit-Policy alone", 429, hdr("RateLimit-Policy", "100;w=60"), 0},
		{"RateLimit fraction", 429, hdr("RateLimit-Reset", "1.5"), 1500 * time.Millisecond},
		{"RateLimit before X-RateLimit", 429, hdr("RateLimit-Reset", "30", "X-RateLimit-Reset", "90"), 30 * time.Second},
		{"malformed RateLimit, then X-RateLimit", 429, hdr("RateLimit-Reset", "later", "X-RateLimit-Reset", "90"), 90 * time.Second},
		{"X-RateLimit-Reset seconds", 429, hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "45"), 45 * time.Second},
		{"X-RateLimit-Reset Unix time", 429, hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", unix(50*time.Second)), 50 * time.Second},
		{"X-RateLimit-Reset Unix time in the past", 429, hdr("X-RateLimit-Reset", unix(-time.Minute)), 0},
		{"X-RateLimit-Reset, some remaining", 429, hdr("X-RateLimit-Remaining", "10", "X-RateLimit-Reset", "45"), 0},
		{"X-RateLimit-Reset on a 503", 503, hdr("X-RateLimit-Reset", "45"), 0},
		{"RateLimit-Reset on a 503", 503, hdr("RateLimit-Reset", "45"), 0},
		{"X-RateLimit-Reset on a 503, none remaining", 503, hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "45"), 45 * time.Second},
		{"RateLimit items on a 503, one spent", 503, hdr("RateLimit", `"burst";r=5;t=1, "day";r=0;t=30`), 30 * time.Second},
		{"RateLimit dictionary with some remaining, then RateLimit-Reset", 429, hdr("RateLimit", "limit=100, remaining=5, reset=30", "RateLimit-Reset", "3000"), 0},
		{"RateLimit items with some remaining, then X-RateLimit-Reset", 429, hdr("RateLimit", `"default";r=50;t=30`, "X-RateLimit-Reset", unix(50*time.Minute)), 0},
		{"RateLimit-Remaining some, then X-RateLimit-Reset", 429, hdr("RateLimit-Remaining", "9", "RateLimit-Reset", "30", "X-RateLimit-Reset", "3000"), 0},
		{"X-RateLimit spent, RateLimit with some remaining", 429, hdr("RateLimit", `"default";r=50;t=30`, "X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "90"), 90 * time.Second},
		{"RateLimit spent before X-RateLimit spent", 429, hdr("RateLimit-Remaining", "0", "RateLimit-Reset", "30", "X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "90"), 30 * time.Second},
		{"spent before a reset without a count", 429, hdr("RateLimit-Reset", "300", "X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "90"), 90 * time.Second},
		{"X-RateLimit-Reset on a 400", 400, hdr("X-RateLimit-Remaining", "0", "X-RateLimit-Reset", "45"), 0},
		{"capped as Retry-After", 429, hdr("RateLimit-Reset", "7200"), time.Hour},
		{"Unix time capped", 429, hdr("X-RateLimit-Reset", unix(5*time.Hour)), time.Hour},
		{"negative and zero", 429, hdr("RateLimit-Reset", "-5", "X-RateLimit-Reset", "0"), 0},
	} {
		if got := ParseWait(tt.status, tt.h, now); got != tt.want {
			t.Errorf("%s: ParseWait(%d, %v) = %s, want %s", tt.name, tt.status, tt.h, got, tt.want)
		}
	}
}

// TestIsTemporary: a temporary API error (TemporaryStatus: 408, 425,
// 429, 5xx) and any failure that is neither an API error nor a
// RequestError (a transport error, a source's own failure such as a
// failed discovery) are temporary; permanent API errors, RequestErrors
// and cancellations are not.
func TestIsTemporary(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want bool
	}{
		{"nil", nil, false},
		{"canceled", fmt.Errorf("token: %w", context.Canceled), false},
		{"deadline", context.DeadlineExceeded, true},
		{"408", &APIError{StatusCode: http.StatusRequestTimeout}, true},
		{"425", &APIError{StatusCode: http.StatusTooEarly}, true},
		{"429", &APIError{StatusCode: http.StatusTooManyRequests}, true},
		{"500", &APIError{StatusCode: http.StatusInternalServerError}, true},
		{"400", &APIError{StatusCode: http.StatusBadRequest, Code: "invalid_scope"}, false},
		{"401", &APIError{StatusCode: http.StatusUnauthorized}, false},
		{"request error", &RequestError{Merchant: "m", Field: "organisation", Reason: "not a path segment"}, false},
		{"transport error", errors.New("dial tcp: connection refused"), true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := IsTemporary(tc.err); got != tc.want {
				t.Errorf("IsTemporary(%v) = %v, want %v", tc.err, got, tc.want)
			}
		})
	}
}
