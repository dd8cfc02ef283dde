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

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestCallbackLeavesTheStateWhenDiscoveryFails: a callback that arrives
// while the provider's endpoints are not known and cannot be discovered
// (another instance, or a failed token request that made them be
// discovered again) is refused with ReasonRetryCallback without spending
// its state: once the provider answers again, the same callback (the
// browser reloading it, DiscoveryRetry later) completes the consent with
// its code. A discovery document whose authorization_endpoint is not a
// usable URL is a configuration failure, not a transient one: the state
// is spent, as for any other failed callback.
func TestCallbackLeavesTheStateWhenDiscoveryFails(t *testing.T) {
	for _, tc := range []struct {
		name   string
		broken func(w http.ResponseWriter, srvURL string) // the discovery document once the callback comes
		reason string                                     // of the first callback
		kept   bool                                       // whether the state is left for the same callback
	}{
		{"discovery answers 503", func(w http.ResponseWriter, _ string) {
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
		}, ReasonRetryCallback, true},
		{"discovery cannot be reached", func(w http.ResponseWriter, _ string) {
			panic(http.ErrAbortHandler) // the connection is cut
		}, ReasonRetryCallback, true},
		{"authorization_endpoint not a URL", func(w http.ResponseWriter, srvURL string) {
			json.NewEncoder(w).Encode(map[string]any{"issuer": srvURL, "authorization_endpoint": "javascript:alert(1)", "token_endpoint": srvURL + "/token"})
		}, ReasonProviderFailure, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var broken atomic.Bool
			var exchanged atomic.Int64
			mux := http.NewServeMux()
			srv := httptest.NewServer(mux)
			t.Cleanup(srv.Close)
			mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
				if broken.Load() {
					tc.broken(w, srv.URL)
					return
				}
				json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL, "authorization_endpoint": srv.URL + "/authorize", "token_endpoint": srv.URL + "/token"})
			})
			mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
				exchanged.Add(1)
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprint(w, `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"}`)
			})
			clock := newClock()
			store := &MemoryStore{}
			src, err := NewRefreshToken(Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, store)
			if err != nil {
				t.Fatal(err)
			}
			flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}}, &Pendings{Store: &MemoryPendingStore{}})
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			link, err := flow.NewLink(ctx, "acme", "", "")
			if err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse(link.URL)
			authURL, _, err := flow.Start(ctx, u.Query().Get("link"), u.Host)
			if err != nil {
				t.Fatal(err)
			}
			a, _ := url.Parse(authURL)
			q := url.Values{"state": {a.Query().Get("state")}, "code": {"code-1"}}

			src.ep.invalidate() // as a failed token request does
			broken.Store(true)
			res, err := flow.Callback(ctx, u.Host, q)
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != tc.reason {
				t.Fatalf("Callback with discovery broken = %v, want %s", err, tc.reason)
			}
			if exchanged.Load() != 0 || tc.kept && res != (Result{}) {
				t.Errorf("Result %+v, %d code exchanges: want none before the endpoints are known", res, exchanged.Load())
			}

			broken.Store(false)
			clock.Add(DiscoveryRetry) // the consent flow discovers again DiscoveryRetry after a failure
			res, err = flow.Callback(ctx, u.Host, q)
			if !tc.kept {
				if !errors.As(err, &ce) || ce.Reason != ReasonUnknownState || exchanged.Load() != 0 {
					t.Errorf("the same callback again = %v (%d exchanges), want %s: the state was spent", err, exchanged.Load(), ReasonUnknownState)
				}
				return
			}
			if err != nil || res.Merchant != "acme" || exchanged.Load() != 1 {
				t.Fatalf("the same callback once the provider is back = %+v, %v (%d exchanges), want the consent stored", res, err, exchanged.Load())
			}
			if rt, err := store.Load(ctx, src.StoreKey("acme")); err != nil || rt != broker.Secret("rt-1") {
				t.Errorf("stored refresh token: %v", err)
			}
		})
	}
}
