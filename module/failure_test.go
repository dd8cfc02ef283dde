package module

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// scriptedGatekeeper is a Nuapay token API that answers the first `ok`
// calls with a token and every later one with `fail`.
type scriptedGatekeeper struct {
	ok    int64
	fail  http.HandlerFunc
	calls atomic.Int64
}

func (g *scriptedGatekeeper) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	n := g.calls.Add(1)
	if n <= g.ok {
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"data":{"id":"t%d","accessToken":"tok-%d","tokenType":"BEARER","expiryTime":%d,"status":"ACTIVE"}}`,
			n, n, time.Now().Add(time.Hour).UnixMilli())
		return
	}
	g.fail(w, r)
}

func status(code int, body string, header ...string) http.HandlerFunc {
	return func(w http.ResponseWriter, _ *http.Request) {
		for i := 0; i+1 < len(header); i += 2 {
			w.Header().Set(header[i], header[i+1])
		}
		w.WriteHeader(code)
		io.WriteString(w, body)
	}
}

// failureHandler is a handler for merchants acme and globex of one Nuapay
// source at url, on a broker that does not sleep between attempts.
func failureHandler(t *testing.T, url string, clientTimeout time.Duration, opts broker.Options) (*Handler, *atomic.Int64) {
	t.Helper()
	client, _ := httpclient.New(clientTimeout, httpclient.TLSOptions{})
	src, err := nuapay.New(nuapay.Config{BaseURL: url, APIKey: "canary-api-key", Client: client})
	if err != nil {
		t.Fatal(err)
	}
	var sleeps atomic.Int64
	opts.Sleep = func(ctx context.Context, d time.Duration) error { sleeps.Add(1); return nil }
	if opts.FetchTimeout == 0 {
		opts.FetchTimeout = 2 * time.Second
	}
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector()}
	h.broker = broker.New(opts)
	t.Cleanup(h.broker.Close)
	var bds []*broker.Binding
	for _, m := range []string{"acme", "globex"} {
		b := brokertest.NewBinding("nuapay#t", src, broker.Request{Merchant: m, Organisation: "org-" + m, Scopes: []string{"openbanking_pisp"}})
		bds = append(bds, b)
	}
	h.bindings = handTable("nuapay", "", bds...)
	h.instrument(nil)
	return h, &sleeps
}

func request(t *testing.T, h *Handler, merchant string) *httptest.ResponseRecorder {
	t.Helper()
	req := httptest.NewRequest("GET", "/tpp/payments", nil)
	req.Header.Set("X-Merchant-Id", merchant)
	rec, _, err := serve(t, h, req)
	if err != nil {
		t.Fatal(err)
	}
	if rec.Code == 0 || (rec.Code == 200 && rec.Body.Len() != 0) {
		t.Fatalf("unexpected recorder state %d %s", rec.Code, rec.Body)
	}
	return rec
}

func TestTokenAPIFailureClasses(t *testing.T) {
	// hang never answers: it returns when the client gives up (or after a
	// minute, so that a broken test ends).
	hang := func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body) // so that the server notices the client leaving
		select {
		case <-r.Context().Done():
		case <-time.After(time.Minute):
		}
	}
	tests := []struct {
		name           string
		fail           http.HandlerFunc
		down           bool // the token API stops listening after warming acme
		wantStatus     int
		wantCode       string
		wantRetryAfter string
		wantCalls      int64 // token-API calls for the cold merchant's request
	}{
		{"connection refused", nil, true, 502, "token_unavailable", "", 0},
		{"timeout", hang, false, 504, "token_timeout", "", 3},
		{"5xx", status(503, `<html>down</html>`), false, 502, "token_unavailable", "", 3},
		{"500 envelope", status(500, `{"returnCode":"50000","returnDescription":"oops"}`), false, 502, "token_unavailable", "", 3},
		{"429 with Retry-After", status(429, `{"returnCode":"42900"}`, "Retry-After", "7"), false, 503, "token_rate_limited", "7", 1},
		{"401 bad API key", status(401, `{"returnCode":"40100","returnDescription":"Unauthorized"}`), false, 502, "token_refused", "", 1},
		{"403 IP not allowed", status(403, `{"returnCode":"40300","details":{"code":"1","field":"ip"}}`), false, 502, "token_refused", "", 1},
		{"malformed body", status(201, `{"data":{"accessTok`), false, 502, "token_bad_response", "", 1},
		{"empty body", status(201, ``), false, 502, "token_bad_response", "", 1},
		{"html body", status(201, `<html>hi</html>`), false, 502, "token_bad_response", "", 1},
		{"body over the cap", status(201, `{"x":"`+strings.Repeat("a", httpclient.MaxResponseBytes)+`"}`), false, 502, "token_bad_response", "", 1},
		{"2xx carrying an error", status(200, `{"returnCode":"40000","returnDescription":"Invalid request"}`), false, 502, "token_bad_response", "", 1},
		{"token with CR/LF", status(201, `{"data":{"accessToken":"abc\r\nX-Evil: 1","tokenType":"BEARER"}}`), false, 502, "token_bad_response", "", 1},
		{"expired token", status(201, fmt.Sprintf(`{"data":{"accessToken":"abc","tokenType":"BEARER","expiryTime":%d}}`, time.Now().Add(-time.Hour).UnixMilli())), false, 502, "token_bad_response", "", 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			g := &scriptedGatekeeper{ok: 1, fail: tt.fail}
			srv := httptest.NewServer(g)
			defer srv.Close()
			// Only a call to a token API that never answers may time
			// out. The client timeout used to be 100 ms for every case:
			// under CPU load (-race, a parallel build) reading the 1 MiB
			// body over the cap, or even the warming call, took longer,
			// the timeout was retried as temporary, and the token API was
			// called twice. A timeout that
			// no healthy call reaches, and a token API that hangs until
			// the client gives up, keep the cases apart under any load.
			h, _ := failureHandler(t, srv.URL, time.Second, broker.Options{FetchTimeout: 30 * time.Second})

			if rec := request(t, h, "acme"); rec.Code != 200 {
				t.Fatalf("warming acme: %d %s", rec.Code, rec.Body)
			}
			if tt.down {
				srv.CloseClientConnections()
				srv.Listener.Close()
			}
			before := g.calls.Load()
			rec := request(t, h, "globex")
			if rec.Code != tt.wantStatus || rec.Header().Get("Retry-After") != tt.wantRetryAfter {
				t.Fatalf("status %d Retry-After %q, want %d %q; body %s", rec.Code, rec.Header().Get("Retry-After"), tt.wantStatus, tt.wantRetryAfter, rec.Body)
			}
			var body admission.ErrorBody
			if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Error != tt.wantCode || body.Merchant != "globex" || body.Message == "" {
				t.Fatalf("body %s, want error %s for globex", rec.Body, tt.wantCode)
			}
			for _, secret := range []string{"canary-api-key", "tok-", "oops", "Unauthorized", "html"} {
				if strings.Contains(rec.Body.String(), secret) {
					t.Fatalf("body leaks %q: %s", secret, rec.Body)
				}
			}
			if got := g.calls.Load() - before; got != tt.wantCalls {
				t.Fatalf("token API calls = %d, want %d", got, tt.wantCalls)
			}
			// The failure is remembered: a second request does not call again.
			if rec := request(t, h, "globex"); rec.Code != tt.wantStatus || g.calls.Load()-before != tt.wantCalls {
				t.Fatalf("second request: %d, calls %d; want the remembered failure", rec.Code, g.calls.Load()-before)
			}
			// The warm merchant keeps working from the cache.
			if rec := request(t, h, "acme"); rec.Code != 200 {
				t.Fatalf("warm merchant: %d %s", rec.Code, rec.Body)
			}
		})
	}
}

// TestOutage: the token API goes down; warm merchants see no failure, cold
// merchants get 503 at once once the breaker is open, and service comes
// back by itself when the API does.
func TestOutage(t *testing.T) {
	var down atomic.Bool
	var calls atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		if down.Load() {
			w.WriteHeader(http.StatusBadGateway)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"data":{"accessToken":"tok-%d","tokenType":"BEARER","expiryTime":%d}}`, calls.Load(), time.Now().Add(time.Hour).UnixMilli())
	}))
	defer srv.Close()
	var mu sync.Mutex
	now := time.Now()
	clock := func() time.Time { mu.Lock(); defer mu.Unlock(); return now }
	advance := func(d time.Duration) { mu.Lock(); now = now.Add(d); mu.Unlock() }
	h, _ := failureHandler(t, srv.URL, time.Second, broker.Options{Now: clock, BreakerThreshold: 5, BreakerCooldown: 10 * time.Second, FailureTTL: time.Second})

	if rec := request(t, h, "acme"); rec.Code != 200 {
		t.Fatal(rec.Code)
	}
	down.Store(true)
	// Cold globex: 3 attempts, then 3 more after the failure expires: the
	// 5th consecutive failure opens the breaker.
	request(t, h, "globex")
	advance(2 * time.Second)
	request(t, h, "globex")
	if st := h.broker.SourceHealth("nuapay#t").Breaker; st != broker.BreakerOpen {
		t.Fatalf("breaker %s after 6 failures, want open", st)
	}
	advance(2 * time.Second)
	for range 20 {
		before := calls.Load()
		rec := request(t, h, "globex")
		if rec.Code != http.StatusServiceUnavailable || rec.Header().Get("Retry-After") == "" || calls.Load() != before {
			t.Fatalf("cold merchant with the breaker open: %d Retry-After %q, %d calls; want 503 without calling", rec.Code, rec.Header().Get("Retry-After"), calls.Load()-before)
		}
		if rec := request(t, h, "acme"); rec.Code != 200 {
			t.Fatalf("warm merchant failed during the outage: %d", rec.Code)
		}
		advance(100 * time.Millisecond)
	}
	// The API comes back; after the cooldown one probe closes the breaker.
	down.Store(false)
	advance(10 * time.Second)
	if rec := request(t, h, "globex"); rec.Code != 200 {
		t.Fatalf("after recovery: %d %s", rec.Code, rec.Body)
	}
	if st := h.broker.SourceHealth("nuapay#t").Breaker; st != broker.BreakerClosed {
		t.Fatalf("breaker %s after a successful probe, want closed", st)
	}
}
