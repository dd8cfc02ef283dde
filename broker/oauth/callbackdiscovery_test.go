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

// TestCallbackLeavesTheStateWhenDiscoveryFails: a callback that arrives
// while the provider's endpoints are not known and cannot be discovered
// (after a restart, or a failed token request that made them be
// discovered again) is refused as provider_unavailable without spending
// its state: once the provider answers again, the same callback (the
// browser reloading it) completes the consent with its code.
func TestCallbackLeavesTheStateWhenDiscoveryFails(t *testing.T) {
	var down atomic.Bool
	var exchanged atomic.Int64
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		if down.Load() {
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
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
	down.Store(true)
	res, err := flow.Callback(ctx, u.Host, q)
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonProviderFailure {
		t.Fatalf("Callback with discovery down = %v, want %s", err, ReasonProviderFailure)
	}
	if res.Merchant != "" || exchanged.Load() != 0 {
		t.Errorf("Result %+v, %d code exchanges: want none before the endpoints are known", res, exchanged.Load())
	}

	down.Store(false)
	clock.Add(5 * time.Second) // the consent flow discovers again 5 s after a failure
	res, err = flow.Callback(ctx, u.Host, q)
	if err != nil || res.Merchant != "acme" || exchanged.Load() != 1 {
		t.Fatalf("the same callback once the provider is back = %+v, %v (%d exchanges), want the consent stored", res, err, exchanged.Load())
	}
	if rt, err := store.Load(ctx, src.StoreKey("acme")); err != nil || rt != broker.Secret("rt-1") {
		t.Errorf("stored refresh token: %v", err)
	}
}
