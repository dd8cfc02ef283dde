package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestConsentDiscoveryHonoursRetryAfter: after a discovery answered 429
// or 503 (the OpenID document, or the RFC 8414 metadata after a 404),
// the consent flow does not discover again before the answer's
// Retry-After has passed, DiscoveryRetry at least and
// broker.MaxRetryAfterMemory at most: Start is refused and the callback
// gets ReasonRetryCallback with the wait left, without a request to the
// provider. A callback whose wait is over maxExchangeWait, longer than
// its code lives, spends its state (ReasonProviderFailure), as a code
// exchange's does.
func TestConsentDiscoveryHonoursRetryAfter(t *testing.T) {
	for _, tc := range []struct {
		name       string
		oidc404    bool   // the OpenID document answers 404, the RFC 8414 metadata the status
		status     int    // of the failed discovery
		retryAfter string // its Retry-After, "" for none
		wait       time.Duration
		kept       bool // whether the callback keeps its state for a reload
	}{
		{"429 Retry-After 20", false, http.StatusTooManyRequests, "20", 20 * time.Second, true},
		{"503 Retry-After 20", false, http.StatusServiceUnavailable, "20", 20 * time.Second, true},
		{"RFC 8414 metadata 503 Retry-After 20", true, http.StatusServiceUnavailable, "20", 20 * time.Second, true},
		{"RFC 8414 metadata 429 Retry-After 30", true, http.StatusTooManyRequests, "30", maxExchangeWait, true},
		{"503 without Retry-After", false, http.StatusServiceUnavailable, "", DiscoveryRetry, true},
		{"429 Retry-After shorter than DiscoveryRetry", false, http.StatusTooManyRequests, "2", DiscoveryRetry, true},
		{"503 Retry-After 60, longer than a code lives", false, http.StatusServiceUnavailable, "60", time.Minute, false},
		{"429 Retry-After of a day, capped", false, http.StatusTooManyRequests, "86400", broker.MaxRetryAfterMemory, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var broken atomic.Bool
			var discovered, exchanged atomic.Int64
			mux := http.NewServeMux()
			srv := httptest.NewServer(mux) // 127.0.0.1, port 0
			t.Cleanup(srv.Close)
			doc := func(w http.ResponseWriter) {
				json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "authorization_endpoint": srv.URL + "/authorize", "token_endpoint": srv.URL + "/token"})
			}
			fail := func(w http.ResponseWriter) {
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				http.Error(w, "busy", tc.status)
			}
			mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
				switch {
				case !broken.Load():
					doc(w)
				case tc.oidc404:
					http.NotFound(w, r)
				default:
					discovered.Add(1)
					fail(w)
				}
			})
			mux.HandleFunc("/.well-known/oauth-authorization-server", func(w http.ResponseWriter, r *http.Request) {
				discovered.Add(1)
				fail(w)
			})
			mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
				exchanged.Add(1)
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprint(w, `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"}`)
			})
			clock := newClock()
			src, flow := newFlow(t, Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, &MemoryStore{}, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}})
			ctx := context.Background()
			authURL, host, err := startLink(t, flow, "acme")
			if err != nil {
				t.Fatal(err)
			}
			a, _ := url.Parse(authURL)
			q := url.Values{"state": {a.Query().Get("state")}, "code": {"code-1"}}
			src.ep.invalidate() // as a failed token request does
			broken.Store(true)

			// callback checks a callback's refusal: reason, and for a kept
			// state the wait left.
			callback := func(step string, reason string, left time.Duration) {
				t.Helper()
				_, err := flow.Callback(ctx, host, q)
				ce, _ := errors.AsType[*ConsentError](err)
				if ce == nil {
					t.Fatalf("%s: callback = %v, want %s", step, err, reason)
				}
				if ce.Reason != reason || reason == ReasonRetryCallback && ce.RetryAfter != left {
					t.Fatalf("%s: callback = %v, RetryAfter %s; want %s, RetryAfter %s", step, err, ce.RetryAfter, reason, left)
				}
			}
			if tc.kept {
				callback("at the failure", ReasonRetryCallback, tc.wait)
			} else {
				callback("at the failure", ReasonProviderFailure, 0)
				callback("reloaded", ReasonUnknownState, 0) // the state is spent
			}

			clock.Add(tc.wait - time.Second)
			if tc.kept {
				callback("a second before the wait is over", ReasonRetryCallback, time.Second)
			}
			if _, _, err := startLink(t, flow, "acme"); err == nil {
				t.Fatalf("Start a second before the wait is over succeeded, want it refused")
			}
			if n := discovered.Load(); n != 1 {
				t.Fatalf("%d discovery requests within the wait, want 1", n)
			}

			broken.Store(false)
			clock.Add(time.Second)
			if tc.kept {
				if res, err := flow.Callback(ctx, host, q); err != nil || res.Merchant != "acme" || exchanged.Load() != 1 {
					t.Fatalf("the callback once the wait is over = %+v, %v (%d exchanges), want the consent stored", res, err, exchanged.Load())
				}
			} else if _, _, err := startLink(t, flow, "acme"); err != nil {
				t.Fatalf("Start once the wait is over: %v", err)
			}
		})
	}
}
