package adminapi

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// TestServe: each route answers; a path or a method a route does not
// serve is refused with its status, and so is a request while no app
// runs, but for the health routes, which answer 503 not live.
func TestServe(t *testing.T) {
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	in := &Instance{Broker: br, Logger: zap.NewNop()}
	tests := []struct {
		name         string
		method, path string
		in           *Instance
		wantStatus   int
		wantMessage  string
	}{
		{"tokens", http.MethodGet, "/token_broker/tokens", in, http.StatusOK, `"tokens":[]`},
		{"tokens by POST", http.MethodPost, "/token_broker/tokens", in, http.StatusMethodNotAllowed, "method not allowed: use GET"},
		{"not running", http.MethodGet, "/token_broker/tokens", nil, http.StatusNotFound, "the token_broker app is not running"},
		{"state not provisioned", http.MethodGet, "/token_broker/state", in, http.StatusServiceUnavailable, "not provisioned"},
		{"bad state query", http.MethodGet, "/token_broker/state?limit=x", in, http.StatusBadRequest, ""},
		{"unknown merchant action", http.MethodPost, "/token_broker/merchants/acme/forget", in, http.StatusNotFound, `unknown action "forget"`},
		{"purge by GET", http.MethodGet, "/token_broker/merchants/acme/purge", in, http.StatusMethodNotAllowed, "use POST"},
		{"purge", http.MethodPost, "/token_broker/merchants/acme/purge", in, http.StatusOK, `"purged":0`},
		{"refresh token by POST", http.MethodPost, "/token_broker/merchants/acme/refresh_token", in, http.StatusMethodNotAllowed, "use PUT"},
		{"provider without action", http.MethodGet, "/token_broker/providers/np", in, http.StatusNotFound, "use /token_broker/providers/{name}/organisations"},
		{"health not running", http.MethodGet, "/token_broker/health", nil, http.StatusServiceUnavailable, "not live"},
		{"health by POST", http.MethodPost, "/token_broker/health/live", nil, http.StatusMethodNotAllowed, "use GET"},
		{"health elsewhere", http.MethodGet, "/token_broker/health/deep", in, http.StatusNotFound, "use /token_broker/health"},
		{"links by GET", http.MethodGet, "/token_broker/consent/links", in, http.StatusMethodNotAllowed, "use POST"},
		{"consent merchants without a registry", http.MethodGet, "/token_broker/consent/merchants", in, http.StatusOK, `"merchants":[]`},
		{"no route", http.MethodGet, "/token_broker/nothing", in, http.StatusNotFound, "no token broker admin route"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			status, msg := answer(t, httptest.NewRequest(tt.method, tt.path, nil), tt.in)
			if status != tt.wantStatus || !strings.Contains(msg, tt.wantMessage) {
				t.Errorf("%s %s: %d %q, want %d with %q", tt.method, tt.path, status, msg, tt.wantStatus, tt.wantMessage)
			}
		})
	}
}

// TestMerchantRouteRefusals: a merchant route with a malformed merchant
// id says that the id is at fault, and a route without an action lists
// every action.
func TestMerchantRouteRefusals(t *testing.T) {
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	in := &Instance{Broker: br, Logger: zap.NewNop()}
	for _, tt := range []struct {
		path, want string
	}{
		{"/token_broker/merchants/-acme/check", `"-acme" is not a merchant id`},
		{"/token_broker/merchants/acme", "/check or /refresh_token"},
		{"/token_broker/merchants/acme/forget", "use purge, revoke, check or refresh_token"},
	} {
		err := Serve(httptest.NewRecorder(), httptest.NewRequest(http.MethodPost, tt.path, nil), in)
		var ae *Error
		if !errors.As(err, &ae) || ae.Status != http.StatusNotFound || !strings.Contains(ae.Error(), tt.want) {
			t.Errorf("POST %s: %v, want 404 with %q", tt.path, err, tt.want)
		}
	}
}

// TestQueryRefusals: a query string that cannot be parsed, a parameter
// a route does not take or gives twice, and a malformed merchant id are
// refused with 400 naming what is wrong, never answered as if the query
// were not there; a well-formed query is answered.
func TestQueryRefusals(t *testing.T) {
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank", ID: "bank#1"}}}
	in := &Instance{Registry: reg, Broker: br, Logger: zap.NewNop(), Tracker: opstate.NewTracker(opstate.TrackerOptions{})}
	for _, tt := range []struct {
		path, want string
	}{
		{"/token_broker/tokens?merchnt=acme", `unknown parameter "merchnt": use merchant, after, limit`},
		{"/token_broker/tokens?merchant=acme&merchant=ghost", `parameter "merchant" is given 2 times`},
		{"/token_broker/tokens?merchant=-acme", `merchant "-acme" is not a merchant id`},
		{"/token_broker/tokens?merchant=%zz", "the query string is malformed"},
		{"/token_broker/state?state=%zz", "the query string is malformed"},
		{"/token_broker/consent/merchants?provder=bank", `unknown parameter "provder": use provider, after, limit`},
		{"/token_broker/tokens?limit=0", `limit "0": must be a whole number from 1 to 1000`},
		{"/token_broker/tokens?limit=1001", `limit "1001": must be a whole number from 1 to 1000`},
		{"/token_broker/tokens?after=-acme", `after "-acme" is not a merchant id: pass the next of the previous page`},
		{"/token_broker/tokens?after=a&after=b", `parameter "after" is given 2 times`},
		{"/token_broker/consent/merchants?limit=ten", `limit "ten": must be a whole number from 1 to 1000`},
		{"/token_broker/consent/merchants?after=%20x", `after " x" is not a merchant id: pass the next of the previous page`},
		{"/token_broker/consent/merchants?provider=typo&limit=5", `provider "typo" is not in the registry`},
	} {
		t.Run(tt.path, func(t *testing.T) {
			rec := httptest.NewRecorder()
			err := Serve(rec, httptest.NewRequest(http.MethodGet, tt.path, nil), in)
			var ae *Error
			if !errors.As(err, &ae) || ae.Status != http.StatusBadRequest || !strings.Contains(ae.Error(), tt.want) {
				t.Fatalf("GET %s: %v (answered %d %s), want 400 with %q", tt.path, err, rec.Code, strings.TrimSpace(rec.Body.String()), tt.want)
			}
		})
	}
	for _, path := range []string{"/token_broker/tokens?merchant=acme", "/token_broker/tokens?after=acme&limit=1000",
		"/token_broker/state?provider=bank&limit=5", "/token_broker/consent/merchants?after=acme&limit=1"} {
		rec := httptest.NewRecorder()
		if err := Serve(rec, httptest.NewRequest(http.MethodGet, path, nil), in); err != nil || rec.Code != http.StatusOK {
			t.Errorf("GET %s: %v, %d %s", path, err, rec.Code, rec.Body.String())
		}
	}
}

// TestMethodNotAllowedSaysAllow: every 405 carries the Allow header
// listing the methods the route takes (RFC 9110 §15.5.5).
func TestMethodNotAllowedSaysAllow(t *testing.T) {
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	in := &Instance{Broker: br, Logger: zap.NewNop(), Tracker: opstate.NewTracker(opstate.TrackerOptions{})}
	for _, tt := range []struct {
		method, path, allow string
	}{
		{http.MethodPost, "/token_broker/tokens", "GET"},
		{http.MethodDelete, "/token_broker/state", "GET"},
		{http.MethodGet, "/token_broker/merchants/acme/purge", "POST"},
		{http.MethodPost, "/token_broker/merchants/acme/refresh_token", "PUT"},
		{http.MethodDelete, "/token_broker/providers/np/organisations", "GET, POST"},
		{http.MethodPost, "/token_broker/providers/np/organisations", "GET"}, // no list restricts the wildcard
		{http.MethodPost, "/token_broker/health", "GET, HEAD"},
		{http.MethodGet, "/token_broker/consent/links", "POST"},
		{http.MethodPost, "/token_broker/consent/merchants", "GET"},
	} {
		t.Run(tt.method+" "+tt.path, func(t *testing.T) {
			rec := httptest.NewRecorder()
			err := Serve(rec, httptest.NewRequest(tt.method, tt.path, nil), in)
			var ae *Error
			if !errors.As(err, &ae) || ae.Status != http.StatusMethodNotAllowed || rec.Header().Get("Allow") != tt.allow {
				t.Fatalf("%v, Allow %q; want 405 with Allow %q", err, rec.Header().Get("Allow"), tt.allow)
			}
		})
	}
}

// TestConsentMerchantsProvider: the consent merchants of a refresh_token
// provider are listed; a provider that is not in the registry, or does
// not use the refresh_token grant, is refused with 400 naming the
// providers that do.
func TestConsentMerchantsProvider(t *testing.T) {
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.example/token", ClientID: "c", ClientSecret: "s"}, &oauth.MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank", Source: src}, "np": {Name: "np", ID: "np#1"}},
		Merchants: map[string]*config.Merchant{"acme": {ID: "acme", Terms: &config.Terms{Provider: "bank"}}}}
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	in := &Instance{Registry: reg, Broker: br, Logger: zap.NewNop()}
	for _, tt := range []struct {
		query, want string
		status      int
	}{
		{"", `"merchant":"acme"`, http.StatusOK},
		{"?provider=bank", `"merchant":"acme"`, http.StatusOK},
		{"?provider=typo", `provider "typo" is not in the registry: use one of bank, or leave provider out`, http.StatusBadRequest},
		{"?provider=np", `provider "np" does not use the refresh_token grant: use one of bank, or leave provider out`, http.StatusBadRequest},
	} {
		t.Run(tt.query, func(t *testing.T) {
			status, msg := answer(t, httptest.NewRequest(http.MethodGet, "/token_broker/consent/merchants"+tt.query, nil), in)
			if status != tt.status || !strings.Contains(msg, tt.want) {
				t.Errorf("GET %s: %d %s, want %d with %s", tt.query, status, strings.TrimSpace(msg), tt.status, tt.want)
			}
		})
	}
}

// TestConsentMerchantsUnreadableToken: a merchant whose stored refresh
// token cannot be read (sealed with a key this instance lacks) is listed
// with an error saying so, never the token, and not as needing consent;
// the other merchants are listed as usual.
func TestConsentMerchantsUnreadableToken(t *testing.T) {
	ctx := context.Background()
	fs := &certmagic.FileStorage{Path: t.TempDir()}
	var locks keylock.Map
	keys, err := seal.New(bytes.Repeat([]byte{'k'}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	store := kvstore.Refresh{S: fs, Locks: &locks} // no keys: cannot open a sealed token
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.example/token", ClientID: "c", ClientSecret: "s"}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := (kvstore.Refresh{S: fs, Locks: &locks, Keys: keys}).Save(ctx, src.StoreKey("acme"), "rt-acme-SECRET"); err != nil {
		t.Fatal(err)
	}
	if err := store.Save(ctx, src.StoreKey("zeta"), "rt-zeta-SECRET"); err != nil {
		t.Fatal(err)
	}
	terms := &config.Terms{Provider: "bank"}
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank", Source: src}},
		Merchants: map[string]*config.Merchant{"acme": {ID: "acme", Terms: terms}, "bob": {ID: "bob", Terms: terms}, "zeta": {ID: "zeta", Terms: terms}}}
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	rec := httptest.NewRecorder()
	if err := Serve(rec, httptest.NewRequest(http.MethodGet, "/token_broker/consent/merchants", nil), &Instance{Registry: reg, Broker: br, Logger: zap.NewNop()}); err != nil {
		t.Fatalf("GET /token_broker/consent/merchants: %v", err)
	}
	if strings.Contains(rec.Body.String(), "SECRET") {
		t.Fatalf("the list shows a refresh token: %s", rec.Body)
	}
	var got struct {
		Merchants []struct {
			Merchant        string `json:"merchant"`
			HasRefreshToken bool   `json:"has_refresh_token"`
			ConsentRequired bool   `json:"consent_required"`
			Error           string `json:"error"`
		} `json:"merchants"`
	}
	if err := json.Unmarshal(rec.Body.Bytes(), &got); err != nil || len(got.Merchants) != 3 {
		t.Fatalf("%v: %s; want 3 merchants", err, rec.Body)
	}
	acme, bob, zeta := got.Merchants[0], got.Merchants[1], got.Merchants[2]
	if acme.Merchant != "acme" || acme.HasRefreshToken || acme.ConsentRequired ||
		!strings.HasPrefix(acme.Error, "its stored refresh token cannot be read: ") || !strings.Contains(acme.Error, "storage_encryption_key") {
		t.Errorf("acme: %+v; want an error naming the unreadable refresh token", acme)
	}
	if bob.Merchant != "bob" || bob.HasRefreshToken || !bob.ConsentRequired || bob.Error != "" {
		t.Errorf("bob: %+v; want no refresh token, consent required and no error", bob)
	}
	if zeta.Merchant != "zeta" || !zeta.HasRefreshToken || zeta.Error != "" {
		t.Errorf("zeta: %+v; want its refresh token and no error", zeta)
	}
}

// answer serves r and returns the status and the text the admin API
// answers it with: a refusal's (*Error) or the written answer's.
func answer(t *testing.T, r *http.Request, in *Instance) (int, string) {
	t.Helper()
	rec := httptest.NewRecorder()
	err := Serve(rec, r, in)
	var ae *Error
	if errors.As(err, &ae) {
		return ae.Status, ae.Error()
	} else if err != nil {
		t.Fatal(err)
	}
	return rec.Code, rec.Body.String()
}
