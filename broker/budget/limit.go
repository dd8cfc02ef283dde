package budget

import (
	"fmt"
	"math"
	"strconv"
	"strings"
	"time"
)

// Limit is a token API's rate limit: Rate requests per Period, and up to
// Burst at once from a full bucket (redis_rate's Limit).
type Limit struct {
	// Rate is how many requests Period allows; at least 1.
	Rate int
	// Burst is how many requests a full bucket lets through at once; at
	// least 1. ParseRate sets it to one second's worth of Rate.
	Burst int
	// Period is the time Rate is counted over; positive.
	Period time.Duration
}

// maxRate bounds Limit.Rate, within the arithmetic's precision.
const maxRate = 1_000_000_000

// ParseRate reads a rate limit written as a count per unit: "20/s",
// "1200/m", "72000/h", or a count per Go duration ("5/10s", "100/1m30s").
// The Limit's Burst is one second's worth of the rate, at least 1.
func ParseRate(s string) (Limit, error) {
	count, per, ok := strings.Cut(strings.TrimSpace(s), "/")
	if !ok {
		return Limit{}, fmt.Errorf("rate %q: want a count per unit, like 20/s, 1200/m or 72000/h", s)
	}
	n, err := strconv.Atoi(strings.TrimSpace(count))
	if err != nil || n < 1 || n > maxRate {
		return Limit{}, fmt.Errorf("rate %q: the count must be a whole number from 1 to %d", s, maxRate)
	}
	var d time.Duration
	switch per = strings.TrimSpace(per); per {
	case "s":
		d = time.Second
	case "m":
		d = time.Minute
	case "h":
		d = time.Hour
	default:
		d, err = time.ParseDuration(per)
		if err != nil || d < time.Millisecond || d > 24*time.Hour {
			return Limit{}, fmt.Errorf("rate %q: the unit must be s, m, h or a duration from 1ms to 24h (10s, 1m30s)", s)
		}
	}
	l := Limit{Rate: n, Period: d}
	l.Burst = l.secondsWorth()
	if err := l.Validate(); err != nil {
		return Limit{}, fmt.Errorf("rate %q: %w", s, err)
	}
	return l, nil
}

// PerSecond is the rate in requests per second.
func (l Limit) PerSecond() float64 {
	if l.Period <= 0 {
		return 0
	}
	return float64(l.Rate) / l.Period.Seconds()
}

// Share is what one of n brokers spending the limit each on its own may
// spend: the same count over n times the period, and an n-th of the burst
// (at least 1). Share(1) is l.
func (l Limit) Share(n int) Limit {
	if n <= 1 {
		return l
	}
	return Limit{Rate: l.Rate, Burst: max(1, l.Burst/n), Period: l.Period * time.Duration(n)}
}

// Validate reports what makes l unusable, nil when it is usable.
func (l Limit) Validate() error {
	switch {
	case l.Rate < 1 || l.Rate > maxRate:
		return fmt.Errorf("rate limit: rate %d, want 1 to %d requests per period", l.Rate, maxRate)
	case l.Period <= 0:
		return fmt.Errorf("rate limit: period %s, want a positive duration", l.Period)
	case l.interval() <= 0:
		return fmt.Errorf("rate limit: %d per %s is more than one request per nanosecond", l.Rate, l.Period)
	case l.Burst < 1:
		return fmt.Errorf("rate limit: burst %d, want at least 1", l.Burst)
	}
	return nil
}

// String writes l for logs and admin output: "20/s burst 20".
func (l Limit) String() string {
	per := l.Period.String()
	switch l.Period {
	case time.Second:
		per = "s"
	case time.Minute:
		per = "m"
	case time.Hour:
		per = "h"
	}
	return fmt.Sprintf("%d/%s burst %d", l.Rate, per, l.Burst)
}

// secondsWorth is one second's worth of l's rate, rounded up, at least 1.
func (l Limit) secondsWorth() int {
	return int(max(1, math.Ceil(min(l.PerSecond(), maxRate))))
}

// interval is the time between two requests at l's rate.
func (l Limit) interval() time.Duration {
	if l.Rate <= 0 {
		return l.Period
	}
	return l.Period / time.Duration(l.Rate)
}
