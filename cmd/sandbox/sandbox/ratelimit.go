package sandbox

import (
	"fmt"
	"math"
	"net/http"
	"slices"
	"strconv"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// TokenStatsPath answers GET with the token requests' statistics
// (TokenStats as JSON).
const TokenStatsPath = "/_sandbox/token-stats"

// statsSeconds is how many of the latest seconds TokenStats lists.
const statsSeconds = 3600

// RateLimit is the token-request rate limit the sandbox enforces, like a
// provider's limit per partner: one limit for its token endpoints together
// (Nuapay POST .../tokens, OneID and bank POST .../token), a token bucket
// of Rate requests per second holding Burst. A request above it is
// answered 429 with a Retry-After header (whole seconds, rounded up) and the
// endpoint's error body, before its credentials are looked at.
type RateLimit struct {
	// Rate is the requests per second the token endpoints accept; 0 means
	// no limit (requests are still counted in TokenStats).
	Rate float64
	// Burst is how many requests the token endpoints accept at once, after
	// a quiet spell; at least 1 when Rate is set (0 means 1). In any
	// 1-second window at most Rate+Burst requests are accepted.
	Burst int
	// Headers adds the provider-style rate-limit headers to every token
	// answer: RateLimit-Policy and RateLimit (the IETF httpapi draft's
	// structured fields, q= the burst, w= 1 second, r= the requests left,
	// t= the seconds until the bucket is full) and X-RateLimit-Limit,
	// X-RateLimit-Remaining and X-RateLimit-Reset (seconds).
	Headers bool
}

// TokenStats counts the requests that reached the token endpoints (Nuapay,
// OneID and bank together), rate-limited ones included.
type TokenStats struct {
	// Rate and Burst are the enforced limit (0: none).
	Rate  float64 `json:"rate"`
	Burst int     `json:"burst"`
	// Total is every token request; Limited those answered 429 by the
	// rate limit.
	Total   int64 `json:"total"`
	Limited int64 `json:"limited"`
	// PeakSecond is the most requests in one calendar second (Unix
	// seconds of the sandbox's clock); PeakWindow the most in any sliding
	// window of one second.
	PeakSecond int64 `json:"peak_second"`
	PeakWindow int64 `json:"peak_window"`
	// Seconds are the per-second counts, oldest first, of the latest hour
	// that saw a token request (seconds without one are left out).
	Seconds []SecondCount `json:"seconds"`
}

// SecondCount is the token requests of one calendar second.
type SecondCount struct {
	// Second is the Unix time of the second.
	Second int64 `json:"second"`
	// Requests reached a token endpoint in it; Limited of them were
	// answered 429.
	Requests int64 `json:"requests"`
	Limited  int64 `json:"limited"`
}

// tokenGate applies the RateLimit and keeps the TokenStats; safe for
// concurrent use.
type tokenGate struct {
	cfg RateLimit
	now func() time.Time

	mu      sync.Mutex
	lim     *rate.Limiter // nil: no limit
	stats   TokenStats    // without Seconds
	seconds []SecondCount // ascending, at most statsSeconds
	window  []time.Time   // arrivals of the last second, ascending
}

func newTokenGate(cfg RateLimit, now func() time.Time) *tokenGate {
	g := &tokenGate{cfg: cfg, now: now}
	if cfg.Rate > 0 {
		g.cfg.Burst = max(cfg.Burst, 1)
		g.lim = rate.NewLimiter(rate.Limit(cfg.Rate), g.cfg.Burst)
		g.stats.Rate, g.stats.Burst = cfg.Rate, g.cfg.Burst
	}
	return g
}

// verdict is what the gate decided for one token request.
type verdict struct {
	limited    bool
	remaining  int           // requests left in the bucket
	retryAfter time.Duration // limited: until one request is accepted
	full       time.Duration // until the bucket is full again
}

// admit counts one token request and decides whether the limit lets it
// through.
func (g *tokenGate) admit() verdict {
	now := g.now()
	g.mu.Lock()
	defer g.mu.Unlock()
	var v verdict
	if g.lim != nil {
		r := g.lim.ReserveN(now, 1)
		if d := r.DelayFrom(now); d > 0 {
			r.CancelAt(now)
			v.limited, v.retryAfter = true, d
		}
		tokens := g.lim.TokensAt(now)
		v.remaining = max(int(math.Floor(tokens)), 0)
		v.full = time.Duration((float64(g.cfg.Burst) - tokens) / g.cfg.Rate * float64(time.Second))
	}
	g.count(now, v.limited)
	return v
}

// count records one arrival at now; g.mu is held.
func (g *tokenGate) count(now time.Time, limited bool) {
	lim := int64(0)
	if limited {
		lim = 1
	}
	g.stats.Total++
	g.stats.Limited += lim
	sec := now.Unix()
	if n := len(g.seconds); n == 0 || g.seconds[n-1].Second < sec {
		g.seconds = append(g.seconds, SecondCount{Second: sec})
		if len(g.seconds) > statsSeconds {
			g.seconds = slices.Delete(g.seconds, 0, len(g.seconds)-statsSeconds)
		}
	}
	// A clock that stepped back counts into the latest second.
	last := &g.seconds[len(g.seconds)-1]
	last.Requests++
	last.Limited += lim
	g.stats.PeakSecond = max(g.stats.PeakSecond, last.Requests)
	cut := 0
	for cut < len(g.window) && now.Sub(g.window[cut]) >= time.Second {
		cut++
	}
	g.window = append(slices.Delete(g.window, 0, cut), now)
	g.stats.PeakWindow = max(g.stats.PeakWindow, int64(len(g.window)))
}

// snapshot returns a copy of the statistics.
func (g *tokenGate) snapshot() TokenStats {
	g.mu.Lock()
	defer g.mu.Unlock()
	st := g.stats
	st.Seconds = slices.Clone(g.seconds)
	if st.Seconds == nil {
		st.Seconds = []SecondCount{}
	}
	return st
}

// gateToken counts a token request and applies the rate limit: it sets the
// rate-limit headers when configured and, above the limit, answers 429
// with Retry-After through limited (the endpoint's error body) and
// returns false.
func (s *Server) gateToken(w http.ResponseWriter, limited func(w http.ResponseWriter)) bool {
	v := s.gate.admit()
	if s.gate.lim != nil && s.gate.cfg.Headers {
		h, full := w.Header(), ceilSeconds(v.full)
		h.Set("RateLimit-Policy", fmt.Sprintf(`"token";q=%d;w=1`, s.gate.cfg.Burst))
		h.Set("RateLimit", fmt.Sprintf(`"token";r=%d;t=%d`, v.remaining, full))
		h.Set("X-RateLimit-Limit", strconv.Itoa(s.gate.cfg.Burst))
		h.Set("X-RateLimit-Remaining", strconv.Itoa(v.remaining))
		h.Set("X-RateLimit-Reset", strconv.Itoa(full))
	}
	if !v.limited {
		return true
	}
	w.Header().Set("Retry-After", strconv.Itoa(max(ceilSeconds(v.retryAfter), 1)))
	limited(w)
	return false
}

// ceilSeconds is d in whole seconds, rounded up.
func ceilSeconds(d time.Duration) int {
	return int((d + time.Second - 1) / time.Second)
}

// TokenStats returns the statistics of the token requests so far.
func (s *Server) TokenStats() TokenStats { return s.gate.snapshot() }

// tokenStats answers GET TokenStatsPath.
func (s *Server) tokenStats(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet {
		w.Header().Set("Allow", http.MethodGet)
		writeJSON(w, http.StatusMethodNotAllowed, map[string]string{"error": "use GET"})
		return
	}
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, http.StatusOK, s.TokenStats())
}

// rateLimitedNuapay is the Gatekeeper's answer above the rate limit.
func rateLimitedNuapay(w http.ResponseWriter) {
	nuapayError(w, http.StatusTooManyRequests, "token request rate limit exceeded: retry after Retry-After seconds", "")
}

// rateLimitedOAuth is the OAuth token endpoints' answer above the rate
// limit (RFC 6749 §5.2 body; the RFC has no code for it).
func rateLimitedOAuth(w http.ResponseWriter) {
	oauthError(w, http.StatusTooManyRequests, "temporarily_unavailable", "token request rate limit exceeded: retry after Retry-After seconds")
}
