package oauth

import (
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestPARBusyCarriesItsWait: a pushed authorization request answered 429
// or 503 refuses Start as provider_unavailable with the provider's
// Retry-After (at most broker.MaxRetryAfterMemory) as its RetryAfter, for
// the start page's Retry-After; without one, none.
func TestPARBusyCarriesItsWait(t *testing.T) {
	for _, tc := range []struct {
		name       string
		status     int
		retryAfter string
		want       time.Duration
	}{
		{"503 Retry-After 20", http.StatusServiceUnavailable, "20", 20 * time.Second},
		{"429 Retry-After 7", http.StatusTooManyRequests, "7", 7 * time.Second},
		{"429 Retry-After of a day, capped", http.StatusTooManyRequests, "86400", broker.MaxRetryAfterMemory},
		{"503 without Retry-After", http.StatusServiceUnavailable, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mux := http.NewServeMux()
			srv := httptest.NewServer(mux) // 127.0.0.1, port 0
			t.Cleanup(srv.Close)
			mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
				json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "authorization_endpoint": srv.URL + "/authorize",
					"token_endpoint": srv.URL + "/token", "pushed_authorization_request_endpoint": srv.URL + "/par"})
			})
			mux.HandleFunc("/par", func(w http.ResponseWriter, r *http.Request) {
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				http.Error(w, "busy", tc.status)
			})
			clock := newClock()
			_, flow := newFlow(t, Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, &MemoryStore{},
				AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}, PAR: true})
			_, _, err := startLink(t, flow, "acme")
			ce, _ := errors.AsType[*ConsentError](err)
			if ce == nil || ce.Reason != ReasonProviderFailure || ce.RetryAfter != tc.want {
				t.Fatalf("Start = %v (%+v), want provider_unavailable with RetryAfter %s", err, ce, tc.want)
			}
		})
	}
}
