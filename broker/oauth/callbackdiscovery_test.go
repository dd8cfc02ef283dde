package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestCallbackLeavesTheStateWhenDiscoveryFails: a callback that arrives
// while the provider's endpoints are not known and cannot be discovered
// (another instance, or a failed token request that made them be
// discovered again) is refused with ReasonRetryCallback without spending
// its state: once the provider answers again, the same callback (the
// browser reloading it, DiscoveryRetry later) completes the consent with
// its code. So does a callback request that ends (the browser leaves, a
// timeout) before the discovery does. A discovery document that names
// another issuer or no token_endpoint, or whose authorization_endpoint is
// not a usable URL, is a failure that trying again does not mend: the
// state is spent, as for any other failed callback.
func TestCallbackLeavesTheStateWhenDiscoveryFails(t *testing.T) {
	for _, tc := range []struct {
		name   string
		broken func(w http.ResponseWriter, srvURL string) // the discovery document once the callback comes; nil: held until the callback has returned
		reason string                                     // of the first callback
		kept   bool                                       // whether the state is left for the same callback
	}{
		{"discovery answers 503", func(w http.ResponseWriter, _ string) {
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
		}, ReasonRetryCallback, true},
		{"discovery answers 429", func(w http.ResponseWriter, _ string) {
			http.Error(w, "slow down", http.StatusTooManyRequests)
		}, ReasonRetryCallback, true},
		{"the callback request is cancelled during discovery", nil, ReasonRetryCallback, true},
		{"discovery names another issuer", func(w http.ResponseWriter, srvURL string) {
			json.NewEncoder(w).Encode(map[string]any{"issuer": srvURL + "/", "authorization_endpoint": srvURL + "/authorize", "token_endpoint": srvURL + "/token"})
		}, ReasonProviderFailure, false},
		{"discovery has no token_endpoint", func(w http.ResponseWriter, srvURL string) {
			json.NewEncoder(w).Encode(map[string]any{"issuer": srvURL, "authorization_endpoint": srvURL + "/authorize"})
		}, ReasonProviderFailure, false},
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
			held := make(chan struct{})
			release := sync.OnceFunc(func() { close(held) })
			mux := http.NewServeMux()
			srv := httptest.NewServer(mux)
			t.Cleanup(srv.Close)
			t.Cleanup(release) // before srv.Close, which waits for the held handler
			mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
				switch {
				case broken.Load() && tc.broken == nil:
					<-held // then the document, to a discovery that no callback waits for
				case broken.Load():
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
			src, flow := newFlow(t, Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, store, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}})
			ctx := context.Background()
			authURL, host, err := startLink(t, flow, "acme")
			if err != nil {
				t.Fatal(err)
			}
			a, _ := url.Parse(authURL)
			q := url.Values{"state": {a.Query().Get("state")}, "code": {"code-1"}}

			src.ep.invalidate() // as a failed token request does
			broken.Store(true)
			callbackCtx, cancel := context.WithCancel(ctx)
			if tc.broken == nil {
				cancel() // the discovery is held: the callback returns on its context
			}
			res, err := flow.Callback(callbackCtx, host, q)
			cancel()
			release()
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != tc.reason {
				t.Fatalf("Callback with discovery broken = %v, want %s", err, tc.reason)
			}
			if exchanged.Load() != 0 || tc.kept && res != (Result{}) {
				t.Errorf("Result %+v, %d code exchanges: want none before the endpoints are known", res, exchanged.Load())
			}

			broken.Store(false)
			clock.Add(DiscoveryRetry) // the consent flow discovers again DiscoveryRetry after a failure
			res, err = flow.Callback(ctx, host, q)
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

// TestCallbackRefusesAStateBeforeDiscovery: a callback whose state is
// unknown, or was started in another browser, is refused for that
// (ReasonUnknownState, ReasonWrongBrowser), whatever it carries, without
// a discovery of the provider's endpoints: while discovery fails, it
// does not get ReasonRetryCallback, and an unauthenticated request makes
// no request to the provider.
func TestCallbackRefusesAStateBeforeDiscovery(t *testing.T) {
	for _, tc := range []struct {
		name   string
		query  func(state string) url.Values
		reason string
	}{
		{"garbage state", func(string) url.Values { return url.Values{"state": {"garbage"}, "code": {"c"}} }, ReasonUnknownState},
		{"no state", func(string) url.Values { return url.Values{"code": {"c"}} }, ReasonUnknownState},
		{"access_denied with an unknown state", func(string) url.Values {
			return url.Values{"state": {"garbage"}, "error": {"access_denied"}}
		}, ReasonUnknownState},
		{"another browser", func(state string) url.Values { return url.Values{"state": {state}, "code": {"c"}} }, ReasonWrongBrowser},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var discovered atomic.Int64
			var srvURL string
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path != "/.well-known/openid-configuration" {
					http.NotFound(w, r)
					return
				}
				if discovered.Add(1) > 1 {
					http.Error(w, "maintenance", http.StatusServiceUnavailable)
					return
				}
				json.NewEncoder(w).Encode(map[string]any{"issuer": srvURL, "authorization_endpoint": srvURL + "/authorize", "token_endpoint": srvURL + "/token"})
			}))
			t.Cleanup(srv.Close)
			srvURL = srv.URL
			src, flow := newFlow(t, Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: newClock().Now}, &MemoryStore{}, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}})
			ctx := context.Background()
			authURL, host, err := startLink(t, flow, "acme", NewBrowser())
			if err != nil {
				t.Fatal(err)
			}
			a, _ := url.Parse(authURL)
			src.ep.invalidate() // the endpoints are to be discovered again, and discovery now fails

			_, err = flow.Callback(ctx, host, tc.query(a.Query().Get("state")))
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != tc.reason {
				t.Errorf("Callback = %v, want %s", err, tc.reason)
			}
			if n := discovered.Load(); n != 1 {
				t.Errorf("%d discovery requests, want the 1 of Start: none for the callback", n)
			}
		})
	}
}

// TestCallbackDiscoveryRetryCountsFromTheFailure: after a discovery that
// failed slowly (longer than DiscoveryRetry), the callback reloaded
// within DiscoveryRetry of the failure gets ReasonRetryCallback without
// a request to the provider; once DiscoveryRetry has passed since the
// failure, it discovers again.
func TestCallbackDiscoveryRetryCountsFromTheFailure(t *testing.T) {
	clock := newClock()
	var discovered atomic.Int64
	var broken atomic.Bool
	var srvURL string
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/.well-known/openid-configuration" {
			http.NotFound(w, r)
			return
		}
		if broken.Load() {
			discovered.Add(1)
			clock.Add(2 * DiscoveryRetry) // a slow failure
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
			return
		}
		json.NewEncoder(w).Encode(map[string]any{"issuer": srvURL, "authorization_endpoint": srvURL + "/authorize", "token_endpoint": srvURL + "/token"})
	}))
	t.Cleanup(srv.Close)
	srvURL = srv.URL
	src, flow := newFlow(t, Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, &MemoryStore{}, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}})
	ctx := context.Background()
	authURL, host, err := startLink(t, flow, "acme")
	if err != nil {
		t.Fatal(err)
	}
	a, _ := url.Parse(authURL)
	q := url.Values{"state": {a.Query().Get("state")}, "code": {"code-1"}}
	src.ep.invalidate()
	broken.Store(true)
	for i, step := range []struct {
		wait       time.Duration // on the clock before the callback
		discovered int64         // discovery requests in all after it
	}{
		{0, 1},
		{DiscoveryRetry - time.Second, 1}, // a reload within DiscoveryRetry of the failure
		{time.Second, 2},
	} {
		clock.Add(step.wait)
		_, err := flow.Callback(ctx, host, q)
		var ce *ConsentError
		if !errors.As(err, &ce) || ce.Reason != ReasonRetryCallback {
			t.Errorf("callback %d = %v, want %s", i, err, ReasonRetryCallback)
		}
		if n := discovered.Load(); n != step.discovered {
			t.Errorf("callback %d: %d discovery requests, want %d", i, n, step.discovered)
		}
	}
}
