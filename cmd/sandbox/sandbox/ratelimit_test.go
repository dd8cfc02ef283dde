package sandbox

import (
	"encoding/json"
	"net/http/httptest"
	"testing"
	"time"
)

// newLimited serves a sandbox whose token endpoints enforce rl, on a
// settable clock that starts on a whole second.
func newLimited(t *testing.T, rl RateLimit, maxLife time.Duration) (*Server, *httptest.Server, *clock) {
	t.Helper()
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	s := New(Config{
		APIKeys:           []string{key},
		Organisations:     []Organisation{{"org-acme", "Acme", "ACME"}},
		OneIDClients:      map[string]string{"cid": "csecret"},
		BankClients:       []BankClient{{ID: "sec", Secret: "s3cret"}},
		NuapayMaxLifetime: maxLife,
		TokenRateLimit:    rl,
		Now:               clk.Now,
	})
	return s, serve(t, s), clk
}

// tokenEndpoints are the token endpoints with a request that succeeds, the
// success status and the JSON field that carries an error answer.
var tokenEndpoints = []struct {
	name, path string
	hdr        map[string]string
	body       string
	ok         int
	errField   string
}{
	{"nuapay", "/organisations/org-acme/tokens", jsonHdr(basic), `{"scopes":["openbanking_pisp"]}`, 201, "returnCode"},
	{"oneid", "/v1/token", map[string]string{"Content-Type": "application/x-www-form-urlencoded"},
		"grant_type=client_credentials&client_id=cid&client_secret=csecret", 200, "error"},
	{"bank", "/oauth2/token", map[string]string{"Content-Type": "application/x-www-form-urlencoded"},
		"grant_type=client_credentials&client_id=sec&client_secret=s3cret", 200, "error"},
}

func TestTokenRateLimit(t *testing.T) {
	for _, ep := range tokenEndpoints {
		t.Run(ep.name, func(t *testing.T) {
			s, srv, clk := newLimited(t, RateLimit{Rate: 2, Burst: 3}, 0)
			steps := []struct {
				advance    time.Duration
				want       int
				retryAfter string
			}{
				{0, ep.ok, ""}, {0, ep.ok, ""}, {0, ep.ok, ""}, // the burst
				{0, 429, "1"}, // a token comes back in 500 ms: rounded up
				{499 * time.Millisecond, 429, "1"},
				{time.Millisecond, ep.ok, ""}, // 500 ms: one token
				{0, 429, "1"},
				{1500 * time.Millisecond, ep.ok, ""}, // 3 tokens back: the burst again
				{0, ep.ok, ""}, {0, ep.ok, ""}, {0, 429, "1"},
			}
			limited := 0
			for i, st := range steps {
				clk.Advance(st.advance)
				r := do(t, srv, "POST", ep.path, ep.hdr, ep.body)
				if r.status != st.want {
					t.Fatalf("step %d: status %d, want %d: %s", i, r.status, st.want, r.raw)
				}
				if got := r.header.Get("Retry-After"); got != st.retryAfter {
					t.Errorf("step %d: Retry-After %q, want %q", i, got, st.retryAfter)
				}
				if st.want == 429 {
					limited++
					if r.body[ep.errField] == nil {
						t.Errorf("step %d: 429 without the endpoint's error body: %s", i, r.raw)
					}
				}
				if r.header.Get("RateLimit") != "" || r.header.Get("X-RateLimit-Remaining") != "" {
					t.Errorf("step %d: rate-limit headers without Headers: %v", i, r.header)
				}
			}
			st := s.TokenStats()
			if st.Total != int64(len(steps)) || st.Limited != int64(limited) || st.Rate != 2 || st.Burst != 3 {
				t.Errorf("stats total %d limited %d rate %g burst %d, want %d %d 2 3", st.Total, st.Limited, st.Rate, st.Burst, len(steps), limited)
			}
		})
	}
}

func TestTokenRateLimitHeaders(t *testing.T) {
	_, srv, clk := newLimited(t, RateLimit{Rate: 4, Burst: 2, Headers: true}, 0)
	ep := tokenEndpoints[0]
	for i, want := range []struct {
		status                                    int
		policy, limit, xLimit, xRemaining, xReset string
	}{
		// r= the requests left after this one, t= seconds until full (rounded up).
		{201, `"token";q=2;w=1`, `"token";r=1;t=1`, "2", "1", "1"},
		{201, `"token";q=2;w=1`, `"token";r=0;t=1`, "2", "0", "1"},
		{429, `"token";q=2;w=1`, `"token";r=0;t=1`, "2", "0", "1"},
	} {
		r := do(t, srv, "POST", ep.path, ep.hdr, ep.body)
		h := r.header
		if r.status != want.status || h.Get("RateLimit-Policy") != want.policy || h.Get("RateLimit") != want.limit ||
			h.Get("X-RateLimit-Limit") != want.xLimit || h.Get("X-RateLimit-Remaining") != want.xRemaining ||
			h.Get("X-RateLimit-Reset") != want.xReset {
			t.Errorf("request %d: %d RateLimit-Policy %q RateLimit %q X-RateLimit-Limit/Remaining/Reset %q/%q/%q, want %+v",
				i, r.status, h.Get("RateLimit-Policy"), h.Get("RateLimit"), h.Get("X-RateLimit-Limit"),
				h.Get("X-RateLimit-Remaining"), h.Get("X-RateLimit-Reset"), want)
		}
	}
	clk.Advance(time.Second) // 4 tokens back, capped at the burst
	if r := do(t, srv, "POST", ep.path, ep.hdr, ep.body); r.status != 201 || r.header.Get("RateLimit") != `"token";r=1;t=1` {
		t.Errorf("after 1 s: %d RateLimit %q", r.status, r.header.Get("RateLimit"))
	}
}

func TestTokenStats(t *testing.T) {
	s, srv, clk := newLimited(t, RateLimit{}, 0) // no limit: counted only
	ep := tokenEndpoints[0]
	start := clk.Now().Unix()
	// Second 0: 2 requests at 0.9 s; second 1: 3 at its start, 1 at 1.8 s.
	// The window (0.8 s, 1.8 s] holds all 6, no calendar second more than 4.
	for _, at := range []time.Duration{900 * time.Millisecond, 0, 100 * time.Millisecond, 0, 0, 800 * time.Millisecond} {
		clk.Advance(at)
		if r := do(t, srv, "POST", ep.path, ep.hdr, ep.body); r.status != 201 {
			t.Fatalf("no limit: %d %s", r.status, r.raw)
		}
	}
	do(t, srv, "GET", "/echo", nil, "") // not a token request
	clk.Advance(2 * time.Second)
	do(t, srv, "POST", tokenEndpoints[1].path, tokenEndpoints[1].hdr, tokenEndpoints[1].body)

	want := TokenStats{Total: 7, PeakSecond: 4, PeakWindow: 6, Seconds: []SecondCount{
		{Second: start, Requests: 2}, {Second: start + 1, Requests: 4}, {Second: start + 3, Requests: 1}}}
	check := func(name string, got TokenStats) {
		t.Helper()
		if got.Total != want.Total || got.Limited != 0 || got.PeakSecond != want.PeakSecond ||
			got.PeakWindow != want.PeakWindow || len(got.Seconds) != len(want.Seconds) {
			t.Fatalf("%s: %+v, want %+v", name, got, want)
		}
		for i := range want.Seconds {
			if got.Seconds[i] != want.Seconds[i] {
				t.Errorf("%s: second %d: %+v, want %+v", name, i, got.Seconds[i], want.Seconds[i])
			}
		}
	}
	check("TokenStats", s.TokenStats())

	r := do(t, srv, "GET", TokenStatsPath, nil, "")
	var got TokenStats
	if err := json.Unmarshal([]byte(r.raw), &got); r.status != 200 || err != nil {
		t.Fatalf("GET %s: %d %s %v", TokenStatsPath, r.status, r.raw, err)
	}
	check("GET "+TokenStatsPath, got)
	if r := do(t, srv, "POST", TokenStatsPath, nil, ""); r.status != 405 {
		t.Errorf("POST %s: %d", TokenStatsPath, r.status)
	}
}

func TestTokenStatsKeepsAnHour(t *testing.T) {
	g := newTokenGate(RateLimit{}, nil)
	t0 := time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)
	for i := range statsSeconds + 10 {
		g.count(t0.Add(time.Duration(i)*time.Second), false)
	}
	st := g.snapshot()
	if len(st.Seconds) != statsSeconds || st.Seconds[0].Second != t0.Unix()+10 || st.Total != statsSeconds+10 || st.PeakWindow != 1 {
		t.Errorf("%d seconds from %d, total %d, peak window %d", len(st.Seconds), st.Seconds[0].Second-t0.Unix(), st.Total, st.PeakWindow)
	}
}

func TestNuapayMaxLifetime(t *testing.T) {
	for _, tc := range []struct {
		name     string
		max      time.Duration
		body     string
		wantLife time.Duration
	}{
		{"capped", 3 * time.Second, `{"scopes":["a"],"expiresIn":60}`, 3 * time.Second},
		{"shorter asked", 30 * time.Second, `{"scopes":["a"],"expiresIn":10}`, 10 * time.Second},
		{"no cap", 0, `{"scopes":["a"],"expiresIn":60}`, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, srv, clk := newLimited(t, RateLimit{}, tc.max)
			d := requestToken(t, srv, "org-acme", tc.body)
			if got := int64(d["expiryTime"].(float64)); got != clk.Now().Add(tc.wantLife).UnixMilli() {
				t.Errorf("expiryTime %d, want now + %s", got, tc.wantLife)
			}
			tok := d["accessToken"].(string)
			clk.Advance(tc.wantLife - time.Millisecond)
			if _, _, valid := s.Issued(tok); !valid {
				t.Error("invalid before its expiry")
			}
			clk.Advance(time.Millisecond)
			if _, _, valid := s.Issued(tok); valid {
				t.Error("valid at its expiry")
			}
		})
	}
}
