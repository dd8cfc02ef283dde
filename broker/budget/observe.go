package budget

import (
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// maxLowering caps how long one answer's headers lower a budget: a broken
// or hostile header cannot silence a provider for longer.
const maxLowering = time.Hour

// epochSeconds: a reset above it is a Unix time, not a delay.
const epochSeconds = 1_000_000_000

// quota is what a provider's headers say: remaining requests until reset.
type quota struct {
	remaining int
	reset     time.Duration
}

// Observe lowers the budget from a token API answer's rate-limit headers,
// read at now: the IETF draft's RateLimit (r=, t= parameters, or the older
// remaining=, reset=) and RateLimit-Policy (q=, w=), the draft's early
// RateLimit-Remaining/-Reset, and the common X-RateLimit-Remaining/-Reset
// (a reset in seconds or as a Unix time). The most restrictive quota read
// applies until its reset (at most an hour): a rate below the configured
// one (for a local share, WithLocalShare, its share of the rate) lowers
// the budget, none left closes it until then. An answer whose
// quotas restrict nothing ends a lowering; one without a well-formed quota
// leaves the budget as it is (malformed values are ignored). A 429 with
// Retry-After is the failure policy's, not the budget's.
func (b *Budget) Observe(h http.Header, now time.Time) {
	qs := quotas(h, now)
	if len(qs) == 0 {
		return
	}
	b.mu.Lock()
	defer b.mu.Unlock()
	b.loweredUntil, b.closedUntil = time.Time{}, time.Time{}
	best, found := quota{}, false
	for _, q := range qs {
		if found && float64(q.remaining)/q.reset.Seconds() >= float64(best.remaining)/best.reset.Seconds() {
			continue
		}
		best, found = q, true
	}
	if !found {
		return
	}
	until := now.Add(best.reset)
	// Spread evenly: a burst on top would spend twice what is left. What
	// is left is the whole key's: this budget's share of it.
	lowered := Limit{Rate: best.remaining, Burst: 1, Period: best.reset}.Share(b.shareOf)
	switch {
	case best.remaining == 0:
		b.closedUntil = until
	case lowered.PerSecond() < b.limit.PerSecond():
		b.lowered, b.loweredUntil = lowered, until
	}
}

// quotas reads every well-formed quota h states.
func quotas(h http.Header, now time.Time) (qs []quota) {
	add := func(remaining, reset string) {
		r, ok1 := count(remaining)
		t, ok2 := delay(reset, now)
		if ok1 && ok2 {
			qs = append(qs, quota{remaining: r, reset: t})
		}
	}
	for _, v := range h.Values("RateLimit") {
		for _, item := range strings.Split(v, ",") {
			p := params(item)
			add(p["r"], p["t"])
		}
		p := params(strings.ReplaceAll(v, ",", ";")) // the older dictionary form
		add(p["remaining"], p["reset"])
	}
	for _, v := range h.Values("RateLimit-Policy") {
		for _, item := range strings.Split(v, ",") {
			p := params(item)
			q, w := p["q"], p["w"]
			if q == "" {
				q = p[""] // the older "100;w=10"
			}
			add(q, w)
		}
	}
	add(h.Get("RateLimit-Remaining"), h.Get("RateLimit-Reset"))
	add(h.Get("X-RateLimit-Remaining"), h.Get("X-RateLimit-Reset"))
	return qs
}

// params reads the parameters of one structured-field item: name=value
// pairs separated by ';'; a bare value is under "" (a quoted name is
// dropped).
func params(item string) map[string]string {
	out := map[string]string{}
	for _, part := range strings.Split(item, ";") {
		part = strings.TrimSpace(part)
		if part == "" || strings.HasPrefix(part, `"`) {
			continue
		}
		k, v, ok := strings.Cut(part, "=")
		if !ok {
			k, v = "", k
		}
		out[strings.ToLower(strings.TrimSpace(k))] = strings.Trim(strings.TrimSpace(v), `"`)
	}
	return out
}

// count reads a remaining count, capped at maxRate.
func count(v string) (int, bool) {
	n, err := strconv.ParseInt(strings.TrimSpace(v), 10, 64)
	if err != nil || n < 0 {
		return 0, false
	}
	return int(min(n, maxRate)), true
}

// delay reads a reset in seconds (fractions allowed) or as a Unix time in
// seconds, as a positive delay from now capped at maxLowering.
func delay(v string, now time.Time) (time.Duration, bool) {
	f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	if err != nil || f <= 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, false
	}
	if f >= epochSeconds {
		f = time.Unix(int64(f), 0).Sub(now).Seconds()
		if f <= 0 {
			return 0, false
		}
	}
	d := time.Duration(min(f, maxLowering.Seconds()) * float64(time.Second))
	return max(d, time.Millisecond), true
}

// Transport returns a RoundTripper that sends through base
// (http.DefaultTransport when nil) and lets the budget Observe the headers
// of every answer: wrap a provider's token API client with it.
func (b *Budget) Transport(base http.RoundTripper) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return observing{base: base, b: b}
}

// observing is the RoundTripper of Budget.Transport.
type observing struct {
	base http.RoundTripper
	b    *Budget
}

// RoundTrip implements http.RoundTripper.
func (o observing) RoundTrip(r *http.Request) (*http.Response, error) {
	resp, err := o.base.RoundTrip(r)
	if err == nil {
		o.b.Observe(resp.Header, o.b.now())
	}
	return resp, err
}
