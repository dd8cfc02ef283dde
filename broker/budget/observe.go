package budget

import (
	"context"
	"math"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// MaxHold caps how long one answer of a provider holds back its token API
// calls (a lowering, a closing, the broker's memory of a Retry-After), so
// that a broken or hostile header cannot silence it for longer.
const MaxHold = 10 * time.Minute

// maxReset caps the window a quota is read over: a day, like the longest
// period ParseRate accepts. How long the quota holds is capped at MaxHold.
const maxReset = 24 * time.Hour

// A reset at or above epochSeconds is a Unix time in seconds, not a delay;
// at or above epochMillis, a Unix time in milliseconds.
const (
	epochSeconds = 1_000_000_000
	epochMillis  = 1_000_000_000_000
)

// quota is what a provider's headers say: remaining requests until reset.
type quota struct {
	remaining int
	reset     time.Duration
}

// Observe lowers the budget from a token API answer's rate-limit headers,
// read at now: the IETF draft's RateLimit (r=, t=, or the older
// remaining=, reset=) and RateLimit-Policy (q=, w=), RateLimit-Remaining
// and -Reset, and X-RateLimit-Remaining and -Reset (a reset in seconds or
// as a Unix time). The most restrictive quota applies until its reset (at
// most MaxHold): a rate below the configured one (or its share, WithLocalShare)
// lowers the budget, to at least one request per MaxHold; none left
// closes it as Hold does, in the same step, ctx bounding the Store call.
// Quotas that restrict nothing end a lowering; an answer without a
// well-formed quota changes nothing; no answer reopens a closed budget.
func (b *Budget) Observe(ctx context.Context, h http.Header, now time.Time) {
	qs := quotas(h, now)
	if len(qs) == 0 {
		return
	}
	b.mu.Lock()
	b.loweredUntil = time.Time{}
	best := qs[0]
	for _, q := range qs[1:] {
		// Of several spent quotas, the one whose reset comes last closes
		// the budget (the key is refused until then).
		if float64(q.remaining)/q.reset.Seconds() < float64(best.remaining)/best.reset.Seconds() ||
			q.remaining == 0 && best.remaining == 0 && q.reset > best.reset {
			best = q
		}
	}
	until := now.Add(min(best.reset, MaxHold))
	// Spread evenly: a burst on top would spend twice what is left. What
	// is left is the whole key's: this budget's share of it.
	lowered := Limit{Rate: best.remaining, Burst: 1, Period: best.reset}.Share(b.shareOf)
	if lowered.interval() > MaxHold {
		// Fewer than one request per MaxHold: the bucket spent at the
		// lowered interval would stay closed that long after the lowering
		// ends.
		lowered = Limit{Rate: 1, Burst: 1, Period: MaxHold}
	}
	if best.remaining > 0 && lowered.PerSecond() < b.limit.PerSecond() {
		b.lowered, b.loweredUntil = lowered, until
	}
	hold := func(context.Context) {}
	if best.remaining == 0 {
		hold = b.closeLocked(now, best.reset)
	}
	b.mu.Unlock()
	hold(ctx)
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
	draftFields(h, add)
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
	legacyFields(h, add)
	return qs
}

// draftFields calls add with the remaining and reset fields, as sent
// ("" when absent), of each quota the IETF draft's headers of h state.
func draftFields(h http.Header, add func(remaining, reset string)) {
	for _, v := range h.Values("RateLimit") {
		for _, item := range strings.Split(v, ",") {
			p := params(item)
			add(p["r"], p["t"])
		}
		p := params(strings.ReplaceAll(v, ",", ";")) // the older dictionary form
		add(p["remaining"], p["reset"])
	}
	add(h.Get("RateLimit-Remaining"), h.Get("RateLimit-Reset"))
}

// legacyFields calls add with the common X-RateLimit-Remaining and
// X-RateLimit-Reset of h, as sent ("" when absent).
func legacyFields(h http.Header, add func(remaining, reset string)) {
	add(h.Get("X-RateLimit-Remaining"), h.Get("X-RateLimit-Reset"))
}

// ResetAfter returns how long, from now, the rate-limit headers of a
// refusing answer (a 429 or 503) say no request is left, read as Observe
// reads them (RateLimit-Policy aside): the latest future reset of a quota
// with none remaining, the IETF draft's headers before X-RateLimit's. When
// no quota is spent, 0 if any header gives a remaining count; otherwise,
// when uncounted is set (a 429, whose refusal says nothing is left), the
// latest bare reset, the draft's first. At most a day; 0 for none.
func ResetAfter(h http.Header, now time.Time, uncounted bool) time.Duration {
	// By family: the IETF draft's headers, then X-RateLimit.
	var spent, bare [2]time.Duration
	counted := false
	for i, fields := range []func(http.Header, func(remaining, reset string)){draftFields, legacyFields} {
		fields(h, func(remaining, reset string) {
			r, isCount := count(remaining)
			counted = counted || isCount
			t, ok := delay(reset, now)
			switch {
			case !ok:
			case isCount && r == 0:
				spent[i] = max(spent[i], t)
			case remaining == "":
				bare[i] = max(bare[i], t)
			}
		})
	}
	for _, t := range spent {
		if t > 0 {
			return t
		}
	}
	if counted || !uncounted {
		return 0
	}
	for _, t := range bare {
		if t > 0 {
			return t
		}
	}
	return 0
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
// seconds or milliseconds, as a positive delay from now capped at
// maxReset.
func delay(v string, now time.Time) (time.Duration, bool) {
	f, err := strconv.ParseFloat(strings.TrimSpace(v), 64)
	if err != nil || f <= 0 || math.IsInf(f, 0) || math.IsNaN(f) {
		return 0, false
	}
	switch {
	case f >= epochMillis:
		f = time.UnixMilli(int64(min(f, math.MaxInt64/2))).Sub(now).Seconds()
	case f >= epochSeconds:
		f = time.Unix(int64(f), 0).Sub(now).Seconds()
	}
	if f <= 0 {
		return 0, false
	}
	d := time.Duration(min(f, maxReset.Seconds()) * float64(time.Second))
	return max(d, time.Millisecond), true
}

// Hold closes the budget for d from now (at most MaxHold), after a 429:
// callers queue or are refused, refreshes are refused until then. It never
// shortens a closing. A 429 speaks for the provider's API key, so Hold
// returns the call that closes the budget's key in its Store too (every
// sidecar spending it), for the caller to make once its own locks are
// released; a Store failure is not returned.
func (b *Budget) Hold(now time.Time, d time.Duration) (store func(ctx context.Context)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closeLocked(now, d)
}

// ClosedUntil returns the end of the budget's last closing (zero if
// none): no token request is served before then. It makes no Store call,
// so another sidecar's closing in a shared Store is not seen.
func (b *Budget) ClosedUntil() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closedUntil
}

// closeLocked is Hold with b.mu held.
func (b *Budget) closeLocked(now time.Time, d time.Duration) (store func(ctx context.Context)) {
	if d <= 0 {
		return func(context.Context) {}
	}
	d = min(d, MaxHold)
	b.closedUntil = later(b.closedUntil, now.Add(d))
	return func(ctx context.Context) { _ = b.store.Hold(ctx, b.name, d) }
}

// Transport returns a RoundTripper that sends through base
// (http.DefaultTransport when nil) and lets the budget Observe every
// answer's headers.
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
		o.b.Observe(r.Context(), resp.Header, o.b.now())
	}
	return resp, err
}
