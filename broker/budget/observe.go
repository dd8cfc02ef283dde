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
// calls: its rate-limit headers lowering or closing a budget, its
// Retry-After closing it (Budget.Hold) or, without a budget, the broker's
// memory of it. A broken or hostile header cannot silence a provider for
// longer.
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
// read at now: the IETF draft's RateLimit (r=, t= parameters, or the older
// remaining=, reset=) and RateLimit-Policy (q=, w=), the draft's early
// RateLimit-Remaining/-Reset, and the common X-RateLimit-Remaining/-Reset
// (a reset in seconds or as a Unix time). The most restrictive quota read
// applies until its reset (at most MaxHold): a rate below the configured
// one (for a local share, WithLocalShare, its share of the rate) lowers
// the budget (to no fewer than one request per MaxHold, so that the
// requests it spends hold the bucket no longer than MaxHold), none left
// closes it until then. An answer whose
// quotas restrict nothing ends a lowering; one without a well-formed quota
// leaves the budget as it is (malformed values are ignored). A closed
// budget is never reopened by an answer (one sent before it closed may
// arrive after): it stays closed until the latest end any answer gave.
// None left speaks for the provider's API key, as a 429 does: it closes
// the budget as Hold does, in the same step as it reads the answer (no
// Take is served in between), and holds the key in the Store (every
// sidecar of a fleet), with ctx bounding that store call. A 429's
// Retry-After closes it through Hold, which the broker's failure policy
// calls.
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
// ("" when absent), of each quota the IETF draft's headers of h state: the
// RateLimit items (r=, t=), the older RateLimit dictionary (remaining=,
// reset=), and the early RateLimit-Remaining and RateLimit-Reset.
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
// refusing answer (a 429 or 503) say no request is left, reading the
// quotas of both families: the IETF draft's RateLimit (r=, t= items, or
// the older remaining=, reset=), RateLimit-Remaining and RateLimit-Reset,
// and the common X-RateLimit-Remaining and X-RateLimit-Reset (a reset in
// seconds, or a Unix time in seconds or milliseconds, as Observe reads
// it). Only a reset that is well-formed and in the future counts. When a
// quota says none remaining, the latest reset of those the IETF draft's
// headers state applies, else the latest of those X-RateLimit states.
// Otherwise, when any header of the answer gives a remaining count (a
// quota with requests left), 0. A reset without a remaining count counts
// only when uncounted is set (a 429: the refusal itself says nothing is
// left; not a 503, which a gateway may answer while its window runs) and
// no header of the answer gives a count: the IETF draft's latest first,
// else X-RateLimit-Reset. The result is at most a day; 0 when the headers
// say no such reset. RateLimit-Policy states a policy, not when the limit
// resets, so it is not read.
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

// Hold closes the budget for d from now (at most MaxHold): the provider
// answered 429 with a Retry-After of d, or without a usable one and the
// broker's failure policy holds it d. Callers queue (or are refused with
// the budget's wait when their deadline comes first) and refreshes are
// refused until then. It never shortens a closing.
//
// The 429 speaks for the provider's API key, so the budget's key is also
// held in its Store (Store.Hold): every budget spending that key (each
// sidecar of a fleet on one Redis) is refused by its Store until then,
// without calling the token API. Hold closes the budget at once and
// returns that store call, bounded by its ctx, for the caller to make
// once its own locks are released (a Redis call). The Store's check
// costs one more Redis call in each spend (AllowN), which happens only
// when a token API call is about to be made: budgets gate token API
// calls, never proxied requests. While the store fails, this budget's own
// closing holds as before and its fallback bucket answers after it; the
// store's error is not returned (a shared tier counts its failures).
func (b *Budget) Hold(now time.Time, d time.Duration) (store func(ctx context.Context)) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closeLocked(now, d)
}

// ClosedUntil returns until when the budget is closed (Hold, or an answer
// whose rate-limit headers say none is left): no token request is served
// before then. The end of its last closing is kept, so when the budget is
// open it returns a time not after now (zero if it was never closed). It
// makes no Store call, so a hold another budget set in a shared Store is
// not seen.
func (b *Budget) ClosedUntil() time.Time {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.closedUntil
}

// closeLocked closes the budget for d from now (at most MaxHold), never
// shortening a closing, and returns the call that holds its key in the
// Store for as long: make it once b.mu is released.
func (b *Budget) closeLocked(now time.Time, d time.Duration) (store func(ctx context.Context)) {
	if d <= 0 {
		return func(context.Context) {}
	}
	d = min(d, MaxHold)
	b.closedUntil = later(b.closedUntil, now.Add(d))
	return func(ctx context.Context) { _ = b.store.Hold(ctx, b.name, d) }
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
		o.b.Observe(r.Context(), resp.Header, o.b.now())
	}
	return resp, err
}
