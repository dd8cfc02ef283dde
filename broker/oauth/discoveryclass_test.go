package oauth

import (
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// TestDiscoveryFailureClass: a failed discovery is transient, for the
// consent callback (permanent, which keeps the state for a reload of a
// transient one), by one rule: no answer, or an answer whose status says
// the server failed or is busy (408, 425, 429, 5xx, as for a token
// request); a document that is wrong as it is (none, another issuer, no
// token_endpoint) is not. For the token API's failure policy
// (broker.IsTemporary, the source's Classify) every failed discovery is
// temporary: it fails all the provider's merchants, and its breaker counts
// it; one answered 429 is rate limited, as a token endpoint's 429 is.
func TestDiscoveryFailureClass(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	silent := "http://" + ln.Addr().String() // nothing listens there
	ln.Close()
	for _, tc := range []struct {
		name      string
		status    int                             // the discovery document's status, 0 for zitadel's
		edit      func(doc map[string]any)        // edits zitadel's document
		issuer    func(srv *optest.Server) string // the configured issuer; default the server's
		transient bool
	}{
		{name: "503", status: http.StatusServiceUnavailable, transient: true},
		{name: "502", status: http.StatusBadGateway, transient: true},
		{name: "429", status: http.StatusTooManyRequests, transient: true},
		{name: "408", status: http.StatusRequestTimeout, transient: true},
		{name: "425", status: http.StatusTooEarly, transient: true},
		{name: "no answer", issuer: func(*optest.Server) string { return silent }, transient: true},
		{name: "no discovery document", status: http.StatusNotFound},
		{name: "403", status: http.StatusForbidden},
		{name: "another issuer", issuer: func(srv *optest.Server) string { return srv.URL + "/" }},
		{name: "no token_endpoint", edit: func(doc map[string]any) { delete(doc, "token_endpoint") }},
		{name: "token_endpoint not a URL", edit: func(doc map[string]any) { doc["token_endpoint"] = "javascript:alert(1)" }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := optest.Start(t, optest.Options{}, &optest.Client{ID: "c", Secret: secretValue, Method: oidc.AuthMethodBasic})
			srv.DiscoveryStatus.Store(int32(tc.status))
			srv.EditDiscovery = tc.edit
			issuer := srv.URL
			if tc.issuer != nil {
				issuer = tc.issuer(srv)
			}
			src, err := NewClientCredentials(Config{Issuer: issuer, ClientID: "c", ClientSecret: secretValue})
			if err != nil {
				t.Fatal(err)
			}
			_, err = src.Token(context.Background(), broker.Request{Merchant: "m"})
			var de *DiscoveryError
			if !errors.As(err, &de) {
				t.Fatalf("Token = %v, want a *DiscoveryError", err)
			}
			class := broker.ClassTemporary
			if tc.status == http.StatusTooManyRequests {
				class = broker.ClassRateLimited
			}
			if !broker.IsTemporary(err) || src.Classify(err) != class || permanent(err) == tc.transient {
				t.Errorf("IsTemporary %v, Classify %d, permanent %v; want temporary, class %d, permanent %v: %v",
					broker.IsTemporary(err), src.Classify(err), permanent(err), class, !tc.transient, err)
			}
		})
	}
}

// TestConsentRefusesUnusableDiscoveredEndpoints: a discovery document
// whose authorization_endpoint (also none) is not a usable URL, or whose
// pushed_authorization_request_endpoint is not one while the consent
// pushes its requests (par, or require_pushed_authorization_requests),
// refuses the consent (the start page's bank, the start) with
// ReasonProviderFailure naming the field, unless the consent table
// configures that endpoint; an unusable PAR endpoint of a consent that
// does not push its requests is not used, nor refused. The provider's
// token requests, which need neither, go on.
func TestConsentRefusesUnusableDiscoveredEndpoints(t *testing.T) {
	ctx := context.Background()
	badPAR := func(doc map[string]any) { doc["pushed_authorization_request_endpoint"] = "ftp://bank.example/par" }
	for _, tc := range []struct {
		name      string
		opts      optest.Options // the bank's (RequirePAR)
		edit      func(doc map[string]any)
		configure func(cfg *AuthCodeConfig, bank string) // the consent table
		refused   string                                 // the field the refusal names, "" for none
	}{
		{name: "authorization_endpoint not a URL", refused: "authorization_endpoint",
			edit: func(doc map[string]any) { doc["authorization_endpoint"] = "javascript:alert(1)" }},
		{name: "no authorization_endpoint", refused: "authorization_endpoint",
			edit: func(doc map[string]any) { delete(doc, "authorization_endpoint") }},
		{name: "authorization_endpoint not a URL, authorization_url configured",
			edit:      func(doc map[string]any) { doc["authorization_endpoint"] = "javascript:alert(1)" },
			configure: func(cfg *AuthCodeConfig, bank string) { cfg.AuthorizationURL = bank + "/authorize" }},
		{name: "PAR endpoint not a URL, par on", refused: "pushed_authorization_request_endpoint", edit: badPAR,
			configure: func(cfg *AuthCodeConfig, _ string) { cfg.PAR = true }},
		{name: "PAR endpoint not a URL, PAR required", refused: "pushed_authorization_request_endpoint", edit: badPAR,
			opts: optest.Options{RequirePAR: true}},
		{name: "PAR endpoint not a URL, PAR off", edit: badPAR},
		{name: "PAR endpoint not a URL, par on, par_url configured", edit: badPAR,
			configure: func(cfg *AuthCodeConfig, bank string) { cfg.PAR, cfg.PARURL = true, bank+"/par" }},
		{name: "usable endpoints", edit: func(map[string]any) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, tc.opts, ClientSecretBasic, false)
			f.op.EditDiscovery = tc.edit
			if tc.configure != nil {
				withConsentConfig(t, f, func(cfg *AuthCodeConfig) { tc.configure(cfg, f.op.URL) })
			}
			_, originErr := f.flow.AuthorizationOrigin(ctx)
			_, _, startErr := startLink(t, f.flow, "acme")
			for _, err := range []error{originErr, startErr} {
				switch {
				case tc.refused == "" && err != nil:
					t.Errorf("refused: %v", err)
				case tc.refused != "" && (reasonOf(err) != ReasonProviderFailure || !strings.Contains(err.Error(), tc.refused)):
					t.Errorf("err %v, want %s naming %s", err, ReasonProviderFailure, tc.refused)
				}
			}
			rt := f.op.Storage.SeedRefreshToken("bank-client", "id1", "openid", "offline_access")
			if err := f.store.Save(ctx, f.src.StoreKey("acme"), broker.Secret(rt)); err != nil {
				t.Fatal(err)
			}
			if _, err := f.src.Token(ctx, broker.Request{Merchant: "acme"}); err != nil {
				t.Errorf("Token: %v, want a token: the refresh needs neither endpoint", err)
			}
		})
	}
}

// TestDiscoveryFailureOpensTheBreaker: a discovery document that is wrong
// as it is (no token_endpoint, another issuer) fails every merchant of
// the provider: the broker's breaker counts the failures of the
// merchants' keys and opens after BreakerThreshold of them, so that the
// merchants after are refused
// (*broker.UnavailableError) without another discovery; as it does while
// the server fails (503).
func TestDiscoveryFailureOpensTheBreaker(t *testing.T) {
	const threshold = 3
	for _, tc := range []struct {
		name   string
		status int                      // the discovery document's status, 0 for zitadel's
		edit   func(doc map[string]any) // edits zitadel's document
	}{
		{name: "no token_endpoint", edit: func(doc map[string]any) { delete(doc, "token_endpoint") }},
		{name: "another issuer", edit: func(doc map[string]any) { doc["issuer"] = "https://another.example" }},
		{name: "503", status: http.StatusServiceUnavailable},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := optest.Start(t, optest.Options{}, &optest.Client{ID: "c", Secret: secretValue, Method: oidc.AuthMethodBasic})
			srv.DiscoveryStatus.Store(int32(tc.status))
			var served atomic.Int64
			srv.EditDiscovery = func(doc map[string]any) {
				served.Add(1)
				tc.edit(doc)
			}
			store := &MemoryStore{}
			src, err := NewRefreshToken(Config{Name: "bank", Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue}, store)
			if err != nil {
				t.Fatal(err)
			}
			br := broker.New(broker.Options{MaxAttempts: 1, BreakerThreshold: threshold})
			defer br.Close()
			for i := range threshold + 2 { // a key of its own each
				merchant := fmt.Sprint("m", i)
				if err := store.Save(context.Background(), src.StoreKey(merchant), "a-refresh-token"); err != nil {
					t.Fatal(err)
				}
				_, err := brokertest.Token(context.Background(), br, brokertest.NewBinding("bank", src, broker.Request{Merchant: merchant}))
				var de *DiscoveryError
				var ue *broker.UnavailableError
				switch {
				case i < threshold && !errors.As(err, &de):
					t.Fatalf("merchant %d: %v, want the *DiscoveryError", i, err)
				case i >= threshold && !errors.As(err, &ue):
					t.Fatalf("merchant %d: %v, want the open breaker's *broker.UnavailableError", i, err)
				}
			}
			if tc.edit != nil && served.Load() != threshold {
				t.Errorf("%d discovery documents served, want %d: the open breaker asks no more", served.Load(), threshold)
			}
		})
	}
}

// TestDiscoveryRetryAfterHoldsTheProvider: a discovery answered 429 with
// Retry-After (the OpenID document, or the RFC 8414 metadata after a
// 404) holds the provider as a token endpoint's 429 does: a minute of
// lookups by 20 merchants (one every 100 ms) makes one discovery, whose
// Retry-After the refused callers are told, not one per breaker
// cooldown; the failure carries the 429 (token_rate_limited).
func TestDiscoveryRetryAfterHoldsTheProvider(t *testing.T) {
	for _, tc := range []struct {
		name    string
		oidc404 bool // /.well-known/openid-configuration answers 404, the RFC 8414 metadata 429
		calls   int64
	}{
		{name: "OpenID discovery document", calls: 1},
		{name: "RFC 8414 metadata", oidc404: true, calls: 2},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				calls.Add(1)
				if tc.oidc404 && strings.HasSuffix(r.URL.Path, "/openid-configuration") {
					http.NotFound(w, r)
					return
				}
				w.Header().Set("Retry-After", "60")
				w.WriteHeader(http.StatusTooManyRequests)
			}))
			t.Cleanup(srv.Close)
			clock := clocktest.New(time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC))
			src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now})
			if err != nil {
				t.Fatal(err)
			}
			br := broker.New(broker.Options{Now: clock.Now, Sleep: func(context.Context, time.Duration) error { return nil }})
			t.Cleanup(br.Close)
			for i := range 600 {
				b := brokertest.NewBinding("bank", src, broker.Request{Merchant: fmt.Sprint("m", i%20), Scopes: []string{fmt.Sprint("s", i%20)}})
				_, _, err = br.Get(context.Background(), b)
				if want := 60*time.Second - time.Duration(i)*100*time.Millisecond; broker.RetryAfterOf(err) != want {
					t.Fatalf("lookup %d: Retry-After %s, want %s: %v", i, broker.RetryAfterOf(err), want, err)
				}
				clock.Add(100 * time.Millisecond)
			}
			ae, _ := errors.AsType[*broker.APIError](err)
			if calls.Load() != tc.calls || ae == nil || ae.StatusCode != http.StatusTooManyRequests {
				t.Fatalf("%d discovery requests in a minute, last error %v; want %d, an answer 429 (token_rate_limited)", calls.Load(), err, tc.calls)
			}
		})
	}
}

// TestDiscovery503CarriesItsWait: a discovery answered 503 (the OpenID
// document, or the RFC 8414 metadata after a 404) carries the wait it
// asks for, its Retry-After or its rate-limit headers' reset, in the
// error's answer (broker.RetryAfterOf); it stays temporary (counted by
// the breaker, not rate limited): the broker does not discover again
// for that key before the wait is over, and does once it is.
func TestDiscovery503CarriesItsWait(t *testing.T) {
	for _, tc := range []struct {
		name    string
		oidc404 bool   // /.well-known/openid-configuration answers 404, the RFC 8414 metadata 503
		header  string // the header of the wait
		value   string
	}{
		{name: "OpenID discovery document, Retry-After", header: "Retry-After", value: "30"},
		{name: "RFC 8414 metadata, Retry-After", oidc404: true, header: "Retry-After", value: "30"},
		{name: "OpenID discovery document, RateLimit-Reset", header: "RateLimit", value: `"default";r=0;t=30`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var calls atomic.Int64
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.oidc404 && strings.HasSuffix(r.URL.Path, "/openid-configuration") {
					http.NotFound(w, r)
					return
				}
				calls.Add(1)
				w.Header().Set(tc.header, tc.value)
				w.WriteHeader(http.StatusServiceUnavailable)
			}))
			t.Cleanup(srv.Close)
			clock := clocktest.New(time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC))
			src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue, Now: clock.Now})
			if err != nil {
				t.Fatal(err)
			}
			_, err = src.Token(context.Background(), broker.Request{Merchant: "m"})
			if ae, _ := errors.AsType[*broker.APIError](err); ae == nil || ae.StatusCode != http.StatusServiceUnavailable || broker.RetryAfterOf(err) != 30*time.Second || src.Classify(err) != broker.ClassTemporary {
				t.Fatalf("Token = %v: Retry-After %s, class %d; want an answer 503 asking 30s, temporary", err, broker.RetryAfterOf(err), src.Classify(err))
			}

			br := broker.New(broker.Options{MaxAttempts: 1, Now: clock.Now, Sleep: func(context.Context, time.Duration) error { return nil }})
			t.Cleanup(br.Close)
			b := brokertest.NewBinding("bank", src, broker.Request{Merchant: "m"})
			for i, step := range []struct {
				wait  time.Duration // on the clock before the lookup
				calls int64         // discovery requests in all after it
			}{
				{0, 2},
				{29 * time.Second, 2},
				{time.Second, 3},
			} {
				clock.Add(step.wait)
				if _, _, err := br.Get(context.Background(), b); err == nil {
					t.Fatalf("lookup %d: a token", i)
				}
				if calls.Load() != step.calls {
					t.Fatalf("lookup %d: %d discovery requests, want %d: none until the 503's wait is over", i, calls.Load(), step.calls)
				}
			}
		})
	}
}
