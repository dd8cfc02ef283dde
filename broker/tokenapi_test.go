package broker_test

import (
	"context"
	"encoding/base64"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

// The tests of this file drive the real sources (Nuapay, OAuth client
// credentials) through a real Broker against token APIs on 127.0.0.1 that
// misbehave, and count the calls those APIs get.

// apiSecret is the API key and client secret of the sources under test:
// no error may quote it.
const apiSecret = "s3cret-0123456789-key"

// tokenAPIClock is a settable broker clock, safe for concurrent use.
type tokenAPIClock struct{ ns atomic.Int64 }

func newTokenAPIClock() *tokenAPIClock {
	c := &tokenAPIClock{}
	c.ns.Store(time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC).UnixNano())
	return c
}

func (c *tokenAPIClock) Now() time.Time      { return time.Unix(0, c.ns.Load()).UTC() }
func (c *tokenAPIClock) Add(d time.Duration) { c.ns.Add(int64(d)) }

// countedAPI is a token API on 127.0.0.1 that answers with h and counts
// the requests it gets.
type countedAPI struct {
	*httptest.Server
	calls atomic.Int64
}

func newCountedAPI(t *testing.T, h http.HandlerFunc) *countedAPI {
	t.Helper()
	api := &countedAPI{}
	api.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		api.calls.Add(1)
		h(w, r)
	}))
	t.Cleanup(api.Close)
	return api
}

// tokenAPISource is one of the real sources, built for a token API at
// base on the broker clock now.
type tokenAPISource struct {
	name string
	make func(t *testing.T, base string, now func() time.Time) broker.Source
}

var tokenAPISources = []tokenAPISource{
	{"nuapay", func(t *testing.T, base string, now func() time.Time) broker.Source {
		s, err := nuapay.New(nuapay.Config{BaseURL: base, APIKey: apiSecret, Now: now})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}},
	{"oauth2", func(t *testing.T, base string, now func() time.Time) broker.Source {
		s, err := oauth.NewClientCredentials(oauth.Config{Name: "p", TokenURL: base + "/token", ClientID: "client",
			ClientSecret: apiSecret, AuthMethod: oauth.ClientSecretBasic, Now: now})
		if err != nil {
			t.Fatal(err)
		}
		return s
	}},
}

// merchantOf returns the binding of the i-th merchant of src: a key of its
// own (organisation and scope).
func merchantOf(src broker.Source, i int) *broker.Binding {
	return brokertest.NewBinding("p", src, broker.Request{Merchant: fmt.Sprint("m", i), Organisation: fmt.Sprint("org-", i), Scopes: []string{fmt.Sprint("scope-", i)}})
}

// noSecretIn fails t when err quotes the API secret, plain or as the
// Basic credential of either source.
func noSecretIn(t *testing.T, err error) {
	t.Helper()
	if err == nil {
		return
	}
	msg := err.Error()
	for _, s := range []string{apiSecret, base64.StdEncoding.EncodeToString([]byte(apiSecret + ":")),
		base64.StdEncoding.EncodeToString([]byte("client:" + apiSecret))} {
		if strings.Contains(msg, s) {
			t.Fatalf("the error quotes the secret: %s", msg)
		}
	}
}

func noSleep(context.Context, time.Duration) error { return nil }

// resetMidBody answers status with header and start, the start of a JSON
// body that announces more, then resets the connection.
func resetMidBody(w http.ResponseWriter, status int, header http.Header, start string) {
	for k, v := range header {
		w.Header()[k] = v
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Content-Length", "1000")
	w.WriteHeader(status)
	io.WriteString(w, start)
	w.(http.Flusher).Flush()
	conn, _, err := http.NewResponseController(w).Hijack()
	if err != nil {
		panic(err)
	}
	if tc, ok := conn.(*net.TCPConn); ok {
		_ = tc.SetLinger(0) // a reset, not a clean close
	}
	_ = conn.Close()
}

// TestCutErrorBodyKeepsItsStatus: a 429 or 5xx answer whose body the
// connection reset cut short is still that status, with its Retry-After,
// for every source: a 429 Retry-After: 60 is one call that holds the
// provider (another merchant's lookup makes none) and answers 503
// token_rate_limited with Retry-After 60, not a transport failure retried
// three times; a cut 503 is retried, counted by the breaker, and answered
// 502 token_unavailable. A cut OAuth 400 lost the error code that
// classifies it (use_dpop_nonce is retried, a refresh token's
// invalid_grant asks for consent): it is a transport failure, retried and answered 502
// token_unavailable, not a refusal of the merchant. Nuapay classifies
// by status alone: its cut 400 is that merchant's refusal, one call each.
func TestCutErrorBodyKeepsItsStatus(t *testing.T) {
	tests := []struct {
		name      string
		source    string // only this source; "" for every source
		status    int
		header    http.Header
		start     string // of the body
		wantCalls int64  // after both merchants' lookups
		want      errcode.Code
		wantRA    time.Duration
	}{
		{"429 Retry-After 60", "", http.StatusTooManyRequests, http.Header{"Retry-After": {"60"}}, `{"error":"slow_`, 1, errcode.TokenRateLimited, time.Minute},
		{"503", "", http.StatusServiceUnavailable, nil, `{"error":"temporarily_`, 5, errcode.TokenUnavailable, 0}, // 3 attempts, 2 more: the breaker opens
		{"400 use_dpop_nonce", "oauth2", http.StatusBadRequest, nil, `{"error":"use_dpop_nonce","error_des`, 5, errcode.TokenUnavailable, 0},
		{"400 invalid_grant", "oauth2", http.StatusBadRequest, nil, `{"error":"invalid_grant","error_des`, 5, errcode.TokenUnavailable, 0},
		{"400", "nuapay", http.StatusBadRequest, nil, `{"returnCode":"INVALID_`, 2, errcode.TokenRefused, 0},
	}
	for _, tt := range tests {
		for _, ts := range tokenAPISources {
			if tt.source != "" && tt.source != ts.name {
				continue
			}
			t.Run(tt.name+"/"+ts.name, func(t *testing.T) {
				api := newCountedAPI(t, func(w http.ResponseWriter, r *http.Request) { resetMidBody(w, tt.status, tt.header, tt.start) })
				clock := newTokenAPIClock()
				src := ts.make(t, api.URL, clock.Now)
				br := broker.New(broker.Options{Now: clock.Now, Sleep: noSleep})
				defer br.Close()
				_, err := br.Token(context.Background(), merchantOf(src, 1))
				noSecretIn(t, err)
				if code := errcode.Classify(err); code != tt.want || code.RetryAfter(err) != tt.wantRA {
					t.Fatalf("caller gets %s (%d) Retry-After %v: %v; want %s, Retry-After %v", code, code.Status(), code.RetryAfter(err), err, tt.want, tt.wantRA)
				}
				_, err = br.Token(context.Background(), merchantOf(src, 2))
				noSecretIn(t, err)
				if got := api.calls.Load(); got != tt.wantCalls {
					t.Fatalf("%d calls to the token API, want %d", got, tt.wantCalls)
				}
			})
		}
	}
}

// TestRateLimitedHoldsTheProvider: a 429 throttles the provider's API key
// or client, whatever its Retry-After says. With a usable Retry-After
// (seconds, an HTTP date, an absurd value capped at 10 min) the provider
// is called once and every merchant is answered 503 token_rate_limited
// with the hold left; without one (absent, negative, a fraction, garbage,
// a date in the past) the rate-limit headers' reset of a spent quota
// holds it the same way (the IETF draft's RateLimit-Reset or RateLimit,
// then X-RateLimit-Reset in seconds or as a Unix time; Retry-After comes
// first); without either the provider is held too, FailureTTL doubled per
// consecutive 429, and not retried within the fetch: 20 merchants, one a
// second, cost 4 calls (at 0, 2, 6 and 14 s), not 3 each.
func TestRateLimitedHoldsTheProvider(t *testing.T) {
	retryAfter := func(v string) func(time.Time) http.Header {
		return func(time.Time) http.Header { return http.Header{"Retry-After": {v}} }
	}
	tests := []struct {
		name      string
		header    func(now time.Time) http.Header
		wantCalls int64
		wantRA    time.Duration // told the first merchant
	}{
		{"seconds", retryAfter("30"), 1, 30 * time.Second},
		{"HTTP date", func(now time.Time) http.Header {
			return http.Header{"Retry-After": {now.Add(40 * time.Second).Format(http.TimeFormat)}}
		}, 1, 40 * time.Second},
		{"absurdly large", retryAfter("99999999999999999999"), 1, broker.MaxRetryAfterMemory},
		{"absent", func(time.Time) http.Header { return nil }, 4, 2 * time.Second},
		{"negative", retryAfter("-5"), 4, 2 * time.Second},
		{"fraction", retryAfter("1.5"), 4, 2 * time.Second},
		{"garbage", retryAfter("soon"), 4, 2 * time.Second},
		{"date in the past", func(now time.Time) http.Header {
			return http.Header{"Retry-After": {now.Add(-time.Hour).Format(http.TimeFormat)}}
		}, 4, 2 * time.Second},
		{"RateLimit-Reset", func(time.Time) http.Header { return http.Header{"Ratelimit-Reset": {"25"}} }, 1, 25 * time.Second},
		{"RateLimit dictionary", func(time.Time) http.Header {
			return http.Header{"Ratelimit": {"limit=100, remaining=0, reset=35"}, "Ratelimit-Policy": {"100;w=60"}}
		}, 1, 35 * time.Second},
		{"RateLimit items", func(time.Time) http.Header { return http.Header{"Ratelimit": {`"default";r=0;t=45`}} }, 1, 45 * time.Second},
		{"X-RateLimit-Reset seconds", func(time.Time) http.Header {
			return http.Header{"X-Ratelimit-Remaining": {"0"}, "X-Ratelimit-Reset": {"30"}}
		}, 1, 30 * time.Second},
		{"X-RateLimit-Reset Unix time", func(now time.Time) http.Header {
			return http.Header{"X-Ratelimit-Reset": {fmt.Sprint(now.Add(50 * time.Second).Unix())}}
		}, 1, 50 * time.Second},
		{"Retry-After before RateLimit-Reset", func(time.Time) http.Header {
			return http.Header{"Retry-After": {"30"}, "Ratelimit-Reset": {"300"}}
		}, 1, 30 * time.Second},
		{"RateLimit-Reset before X-RateLimit-Reset", func(time.Time) http.Header {
			return http.Header{"Ratelimit-Reset": {"30"}, "X-Ratelimit-Reset": {"300"}}
		}, 1, 30 * time.Second},
		{"X-RateLimit-Reset with requests left", func(time.Time) http.Header {
			return http.Header{"X-Ratelimit-Remaining": {"7"}, "X-Ratelimit-Reset": {"30"}}
		}, 4, 2 * time.Second},
	}
	for _, tt := range tests {
		for _, ts := range tokenAPISources {
			t.Run(tt.name+"/"+ts.name, func(t *testing.T) {
				clock := newTokenAPIClock()
				api := newCountedAPI(t, func(w http.ResponseWriter, r *http.Request) {
					for k, v := range tt.header(clock.Now()) {
						w.Header()[k] = v
					}
					w.WriteHeader(http.StatusTooManyRequests)
				})
				src := ts.make(t, api.URL, clock.Now)
				br := broker.New(broker.Options{Now: clock.Now, Sleep: noSleep})
				defer br.Close()
				for i := range 20 {
					_, err := br.Token(context.Background(), merchantOf(src, i))
					noSecretIn(t, err)
					code := errcode.Classify(err)
					if code != errcode.TokenRateLimited || code.Status() != http.StatusServiceUnavailable {
						t.Fatalf("merchant %d gets %s (%d): %v; want 503 token_rate_limited", i, code, code.Status(), err)
					}
					if ra := code.RetryAfter(err); i == 0 && ra != tt.wantRA {
						t.Fatalf("merchant 0 told Retry-After %v, want %v", ra, tt.wantRA)
					}
					clock.Add(time.Second)
				}
				if got := api.calls.Load(); got != tt.wantCalls {
					t.Fatalf("%d calls to the token API in 20 s, want %d", got, tt.wantCalls)
				}
			})
		}
	}
}

// TestStalledTokenAPIBoundedByFetchTimeout: a token API whose headers
// never come, or whose 200 body stalls, is one call cut at FetchTimeout
// (its connection closed), answered 504 token_timeout; the next lookup
// within the key's backoff is answered at once without a call, and the
// one after it calls again rather than waiting on the stalled fetch.
func TestStalledTokenAPIBoundedByFetchTimeout(t *testing.T) {
	const fetchTimeout = 200 * time.Millisecond
	for _, stall := range []string{"headers", "body"} {
		for _, ts := range tokenAPISources {
			t.Run(stall+"/"+ts.name, func(t *testing.T) {
				closed := make(chan struct{}, 8)
				api := newCountedAPI(t, func(w http.ResponseWriter, r *http.Request) {
					_, _ = io.Copy(io.Discard, r.Body) // then the server notices the client closing
					if stall == "body" {
						w.Header().Set("Content-Type", "application/json")
						w.Header().Set("Content-Length", "1000")
						io.WriteString(w, `{"access_token":"tok`)
						w.(http.Flusher).Flush()
					}
					select {
					case <-r.Context().Done(): // the client closed the connection
						closed <- struct{}{}
					case <-time.After(10 * time.Second):
					}
				})
				clock := newTokenAPIClock()
				src := ts.make(t, api.URL, clock.Now)
				br := broker.New(broker.Options{Now: clock.Now, FetchTimeout: fetchTimeout, Sleep: noSleep})
				defer br.Close()
				b := merchantOf(src, 1)
				start := time.Now()
				_, err := br.Token(context.Background(), b)
				took := time.Since(start)
				noSecretIn(t, err)
				if code := errcode.Classify(err); code != errcode.TokenTimeout || code.Status() != http.StatusGatewayTimeout {
					t.Fatalf("caller gets %s (%d): %v; want 504 token_timeout", code, code.Status(), err)
				}
				if took < fetchTimeout || took > 5*time.Second {
					t.Fatalf("the lookup took %v, want about FetchTimeout (%v)", took, fetchTimeout)
				}
				select {
				case <-closed:
				case <-time.After(5 * time.Second):
					t.Fatal("the stalled connection was not closed")
				}
				if _, err := br.Token(context.Background(), b); errcode.Classify(err) != errcode.TokenTimeout || api.calls.Load() != 1 {
					t.Fatalf("within the backoff: %v after %d calls, want the timeout again without a call", err, api.calls.Load())
				}
				clock.Add(broker.DefaultFailureTTL)
				_, err = br.Token(context.Background(), b)
				if errcode.Classify(err) != errcode.TokenTimeout || api.calls.Load() != 2 {
					t.Fatalf("after the backoff: %v after %d calls, want a second call that times out", err, api.calls.Load())
				}
			})
		}
	}
}

// TestTokenAPIRedirectNotFollowed: a token endpoint that redirects, to
// another origin or to plain HTTP, is one call answered 502
// token_refused; the redirect's target gets nothing, so neither the API
// key nor the client secret leaves for it.
func TestTokenAPIRedirectNotFollowed(t *testing.T) {
	elsewhere := newCountedAPI(t, func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"access_token":"tok","token_type":"Bearer","expires_in":3600,"data":{"accessToken":"tok"}}`)
	})
	for _, status := range []int{http.StatusMovedPermanently, http.StatusFound, http.StatusSeeOther, http.StatusTemporaryRedirect, http.StatusPermanentRedirect} {
		for _, ts := range tokenAPISources {
			t.Run(fmt.Sprint(status, "/", ts.name), func(t *testing.T) {
				api := newCountedAPI(t, func(w http.ResponseWriter, r *http.Request) {
					http.Redirect(w, r, elsewhere.URL+r.URL.Path, status)
				})
				clock := newTokenAPIClock()
				br := broker.New(broker.Options{Now: clock.Now, Sleep: noSleep})
				defer br.Close()
				_, err := br.Token(context.Background(), merchantOf(ts.make(t, api.URL, clock.Now), 1))
				noSecretIn(t, err)
				if code := errcode.Classify(err); code != errcode.TokenRefused || code.Status() != http.StatusBadGateway {
					t.Fatalf("caller gets %s (%d): %v; want 502 token_refused", code, code.Status(), err)
				}
				if api.calls.Load() != 1 || elsewhere.calls.Load() != 0 {
					t.Fatalf("%d calls to the token API, %d to the redirect's target; want 1 and 0", api.calls.Load(), elsewhere.calls.Load())
				}
			})
		}
	}
}

// TestConcurrentRateLimitedCallOnce: 50 merchants whose lookups start
// together on a provider answering 429 without Retry-After cost one call
// each: a 429 that does not say how long to wait is not retried within
// the fetch (the provider's hold answers the next lookups), so the
// concurrent fetches do not send each merchant's retries before any of
// them has ended.
func TestConcurrentRateLimitedCallOnce(t *testing.T) {
	for _, ts := range tokenAPISources {
		t.Run(ts.name, func(t *testing.T) {
			api := newCountedAPI(t, func(w http.ResponseWriter, r *http.Request) { w.WriteHeader(http.StatusTooManyRequests) })
			clock := newTokenAPIClock()
			src := ts.make(t, api.URL, clock.Now)
			br := broker.New(broker.Options{Now: clock.Now})
			defer br.Close()
			const merchants = 50
			errs := make(chan error, merchants)
			for i := range merchants {
				go func() {
					_, err := br.Token(context.Background(), merchantOf(src, i))
					errs <- err
				}()
			}
			for range merchants {
				err := <-errs
				noSecretIn(t, err)
				if code := errcode.Classify(err); code != errcode.TokenRateLimited {
					t.Fatalf("a merchant gets %s: %v, want token_rate_limited", code, err)
				}
			}
			if got := api.calls.Load(); got > merchants {
				t.Fatalf("%d calls to the token API for %d merchants, want at most one each", got, merchants)
			}
		})
	}
}
