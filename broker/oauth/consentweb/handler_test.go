package consentweb

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentpage"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// consentSite is the public consent handler of provider bank over a
// registry of the merchants given, its consents in progress and refresh
// tokens in stores shared across reloads.
type consentSite struct {
	reg *config.Registry
	web *Handler
}

// newConsentSite builds the registry of merchants (all at provider bank)
// over the shared stores, as a reload does, and its consent handler.
func newConsentSite(t *testing.T, tokenURL string, pend oauth.PendingStore, tokens oauth.Store, merchants ...string) consentSite {
	t.Helper()
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: tokenURL, ClientID: "tpp", ClientSecret: "bank-secret"}, tokens)
	if err != nil {
		t.Fatal(err)
	}
	return siteOf(t, src, oauth.AuthCodeConfig{RedirectURIs: []string{"https://cb.partner.example/consent/callback"},
		AuthorizationURL: "https://bank.invalid/authorize", Scopes: []string{"offline_access"}}, pend, merchants...)
}

// siteOf is the public consent handler of provider bank, the source src
// with the consent flow cfg, its consents in progress in pend, over a
// registry of the merchants given.
func siteOf(t *testing.T, src *oauth.RefreshToken, cfg oauth.AuthCodeConfig, pend oauth.PendingStore, merchants ...string) consentSite {
	t.Helper()
	flow, err := oauth.NewAuthCode(src, cfg, &oauth.Pendings{Store: pend})
	if err != nil {
		t.Fatal(err)
	}
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank", Source: src, Consent: flow}},
		Merchants: map[string]*config.Merchant{}}
	for _, m := range merchants {
		reg.Merchants[m] = &config.Merchant{ID: m, Terms: &config.Terms{Provider: "bank"}}
	}
	pages, err := consentpage.New(consentpage.Config{})
	if err != nil {
		t.Fatal(err)
	}
	web, err := New(Options{Provider: "bank", Registry: reg, Broker: broker.New(broker.Options{}), Pages: pages,
		Results: &consentpage.Results{Store: pend}, Logger: zap.NewNop(),
		Steps: prometheus.NewCounterVec(prometheus.CounterOpts{Name: "steps"}, []string{"provider", "step", "outcome"})})
	if err != nil {
		t.Fatal(err)
	}
	return consentSite{reg: reg, web: web}
}

// get serves GET u on s with the cookies.
func (s consentSite) get(u string, cookies ...*http.Cookie) *httptest.ResponseRecorder {
	return s.serve(httptest.NewRequest(http.MethodGet, u, nil), cookies...)
}

// serve serves r on s with the cookies.
func (s consentSite) serve(r *http.Request, cookies ...*http.Cookie) *httptest.ResponseRecorder {
	for _, c := range cookies {
		r.AddCookie(c)
	}
	w := httptest.NewRecorder()
	s.web.ServeHTTP(w, r)
	return w
}

// postStart posts the start page's form of link to the start URL of
// link's consent site, from a page of that origin (Sec-Fetch-Site
// same-origin), with the cookies.
func (s consentSite) postStart(t *testing.T, link string, cookies ...*http.Cookie) *httptest.ResponseRecorder {
	t.Helper()
	u, err := url.Parse(link)
	if err != nil {
		t.Fatal(err)
	}
	form := url.Values{"link": {u.Query().Get("link")}}
	u.RawQuery = ""
	r := httptest.NewRequest(http.MethodPost, u.String(), strings.NewReader(form.Encode()))
	r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	r.Header.Set("Sec-Fetch-Site", "same-origin")
	return s.serve(r, cookies...)
}

// TestConsentOfMerchantRemovedByReload: a consent link, or an
// authorization state, of a merchant that a reload removed from the
// registry is refused: the browser is not sent to the bank, the code is
// not exchanged and no refresh token is stored for a merchant the broker
// no longer serves.
func TestConsentOfMerchantRemovedByReload(t *testing.T) {
	ctx := context.Background()
	var exchanges atomic.Int32
	bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		exchanges.Add(1)
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"}`))
	}))
	t.Cleanup(bank.Close)
	pend, tokens := &oauth.MemoryPendingStore{}, &oauth.MemoryStore{}
	before := newConsentSite(t, bank.URL, pend, tokens, "acme", "globex")
	after := newConsentSite(t, bank.URL, pend, tokens, "globex")

	link := func() string {
		t.Helper()
		l, _, err := CreateLink(ctx, before.reg, LinkRequest{Merchant: "acme"})
		if err != nil {
			t.Fatal(err)
		}
		return l.URL
	}
	t.Run("start", func(t *testing.T) {
		l := link()
		if w := after.get(l); w.Code == http.StatusOK || !strings.Contains(w.Body.String(), "<html") {
			t.Fatalf("start page after the merchant's removal: %d; want a refusal page", w.Code)
		}
		w := after.postStart(t, l)
		if w.Code == http.StatusSeeOther || !strings.Contains(w.Body.String(), "<html") {
			t.Fatalf("start after the merchant's removal: %d, Location %q; want a page", w.Code, w.Header().Get("Location"))
		}
	})
	t.Run("callback", func(t *testing.T) {
		w := before.postStart(t, link())
		if w.Code != http.StatusSeeOther {
			t.Fatalf("start: %d", w.Code)
		}
		auth, _ := url.Parse(w.Header().Get("Location"))
		cb := "https://cb.partner.example/consent/callback?" + url.Values{"state": {auth.Query().Get("state")}, "code": {"code-1"}}.Encode()
		w = after.get(cb, w.Result().Cookies()...)
		if exchanges.Load() != 0 {
			t.Errorf("the code of a removed merchant was exchanged")
		}
		src, _ := after.reg.Providers["bank"].RefreshToken()
		if _, err := tokens.Load(ctx, src.StoreKey("acme")); !errors.Is(err, oauth.ErrNoRefreshToken) {
			t.Errorf("refresh token of the removed merchant: %v, want none stored", err)
		}
		loc := w.Header().Get("Location")
		if w.Code == http.StatusSeeOther {
			w = after.get("https://cb.partner.example/consent/" + loc)
		}
		if !strings.Contains(w.Body.String(), "not recorded") {
			t.Errorf("callback after the merchant's removal: %d, %s; want a page saying the consent was not recorded", w.Code, w.Body)
		}
	})
}

// TestCallbackSiteNeedsHTTPS: a consent site whose redirect URI is plain
// HTTP on a host that is not loopback is refused when the handler is
// made: the code would travel in clear, and the browser would drop the
// Secure consent cookie, so every callback would be refused
// (wrong_browser). Plain HTTP on a loopback host is allowed.
func TestCallbackSiteNeedsHTTPS(t *testing.T) {
	for _, tc := range []struct {
		redirect string
		ok       bool
	}{
		{"https://cb.partner.example/consent/callback", true},
		{"http://127.0.0.1:81/consent/callback", true},
		{"http://localhost:81/consent/callback", true},
		{"http://[::1]:81/consent/callback", true},
		{"http://127.9.8.7:81/consent/callback", true},
		{"http://cb.partner.example/consent/callback", false},
		{"http://127.0.0.1.nip.io/consent/callback", false},
		{"HTTP://cb.partner.example:8080/consent/callback", false},
	} {
		t.Run(tc.redirect, func(t *testing.T) {
			src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.invalid/token", ClientID: "tpp", ClientSecret: "bank-secret"}, &oauth.MemoryStore{})
			if err != nil {
				t.Fatal(err)
			}
			flow, err := oauth.NewAuthCode(src, oauth.AuthCodeConfig{RedirectURIs: []string{tc.redirect},
				AuthorizationURL: "https://bank.invalid/authorize", Scopes: []string{"offline_access"}}, &oauth.Pendings{Store: &oauth.MemoryPendingStore{}})
			if err != nil {
				t.Fatal(err)
			}
			reg := &config.Registry{Path: "merchants.toml", Providers: map[string]*config.Provider{"bank": {Name: "bank", Line: 3, Source: src, Consent: flow}}}
			_, err = New(Options{Provider: "bank", Registry: reg, Logger: zap.NewNop()})
			if (err == nil) != tc.ok || err != nil && !strings.Contains(err.Error(), "https") {
				t.Errorf("New = %v, want ok %v (an error asking for https)", err, tc.ok)
			}
		})
	}
}

// TestCallbackAsksForAReload: a callback that reaches an instance that
// cannot discover the bank's endpoints now gets the retry_callback page
// (503, Retry-After, "reload this page"), its state kept; the browser's
// reload of the same URL, once the bank answers, stores the consent. The
// page's Retry-After is the bank's (DiscoveryRetry without one, or for a
// shorter one): the bank is not asked again before. A callback with a
// state that is no consent's gets the unknown_state page meanwhile,
// without asking the bank.
func TestCallbackAsksForAReload(t *testing.T) {
	for _, tc := range []struct {
		bankRetryAfter string // of the bank's 503, "" for none
		wait           time.Duration
	}{
		{"", oauth.DiscoveryRetry},
		{"2", oauth.DiscoveryRetry},
		{"20", 20 * time.Second},
	} {
		name := "bank Retry-After " + tc.bankRetryAfter
		if tc.bankRetryAfter == "" {
			name = "no bank Retry-After"
		}
		t.Run(name, func(t *testing.T) { testCallbackAsksForAReload(t, tc.bankRetryAfter, tc.wait) })
	}
}

func testCallbackAsksForAReload(t *testing.T, bankRetryAfter string, wait time.Duration) {
	ctx := context.Background()
	var down atomic.Bool
	var discoveries atomic.Int64
	mux := http.NewServeMux()
	bank := httptest.NewServer(mux)
	t.Cleanup(bank.Close)
	mux.HandleFunc("/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		discoveries.Add(1)
		if down.Load() {
			if bankRetryAfter != "" {
				w.Header().Set("Retry-After", bankRetryAfter)
			}
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
			return
		}
		_, _ = fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q}`, bank.URL, bank.URL+"/authorize", bank.URL+"/token")
	})
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"}`))
	})
	var now atomic.Int64
	now.Store(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano())
	clock := func() time.Time { return time.Unix(0, now.Load()) }
	pend, tokens := &oauth.MemoryPendingStore{}, &oauth.MemoryStore{}
	// Two instances of the consent site over the same stores: the first
	// starts the consent, the second, which has not discovered the bank
	// yet, gets the callback.
	site := func() consentSite {
		src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", Issuer: bank.URL, ClientID: "tpp", ClientSecret: "bank-secret", Now: clock}, tokens)
		if err != nil {
			t.Fatal(err)
		}
		return siteOf(t, src, oauth.AuthCodeConfig{RedirectURIs: []string{"https://cb.partner.example/consent/callback"}, Scopes: []string{"offline_access"}}, pend, "acme")
	}
	first, second := site(), site()
	l, _, err := CreateLink(ctx, first.reg, LinkRequest{Merchant: "acme"})
	if err != nil {
		t.Fatal(err)
	}
	w := first.postStart(t, l.URL)
	if w.Code != http.StatusSeeOther {
		t.Fatalf("start: %d", w.Code)
	}
	cookies := w.Result().Cookies()
	auth, _ := url.Parse(w.Header().Get("Location"))
	cb := "https://cb.partner.example/consent/callback?" + url.Values{"state": {auth.Query().Get("state")}, "code": {"code-1"}}.Encode()

	down.Store(true)
	before := discoveries.Load()
	w = second.get("https://cb.partner.example/consent/callback?state=garbage&code=c", cookies...)
	if w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), oauth.ReasonUnknownState) || discoveries.Load() != before {
		t.Errorf("callback with a garbage state: %d, %d discoveries; want 400, the unknown_state page and none:\n%s", w.Code, discoveries.Load()-before, w.Body)
	}
	w = second.get(cb, cookies...)
	if w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") != fmt.Sprint(wait.Seconds()) ||
		!strings.Contains(w.Body.String(), "Please reload this page in a moment.") || !strings.Contains(w.Body.String(), oauth.ReasonRetryCallback) {
		t.Fatalf("callback while the bank cannot be discovered: %d, Retry-After %q, %s; want 503, the retry_callback page", w.Code, w.Header().Get("Retry-After"), w.Body)
	}

	now.Add(int64(wait - time.Second))
	before = discoveries.Load()
	if w = second.get(cb, cookies...); w.Code != http.StatusServiceUnavailable || w.Header().Get("Retry-After") != "1" || discoveries.Load() != before {
		t.Fatalf("callback a second before the wait is over: %d, Retry-After %q, %d discoveries; want 503, 1 and none", w.Code, w.Header().Get("Retry-After"), discoveries.Load()-before)
	}

	down.Store(false)
	now.Add(int64(time.Second))
	w = second.get(cb, cookies...)
	if w.Code != http.StatusSeeOther || !strings.HasPrefix(w.Header().Get("Location"), "done?") {
		t.Fatalf("the reloaded callback: %d, Location %q; want the result page", w.Code, w.Header().Get("Location"))
	}
	src, _ := second.reg.Providers["bank"].RefreshToken()
	if rt, err := tokens.Load(ctx, src.StoreKey("acme")); err != nil || rt != "rt-1" {
		t.Errorf("refresh token after the reload: %q, %v; want the bank's", rt, err)
	}
}

// TestStartAnswersTheDiscoveryWait: while the consent flow holds off a
// bank whose discovery failed for a while (503, its Retry-After), the
// start page and the start form answer 503 with Retry-After, the wait
// left, and no discovery, and the refused starts do not count against the
// link's MaxStartsPerLink; a discovery that failed for good (404 on both
// documents) answers without one.
func TestStartAnswersTheDiscoveryWait(t *testing.T) {
	for _, tc := range []struct {
		name       string
		status     int    // of the bank's discovery
		retryAfter string // of its answer, "" for none
		wait       time.Duration
	}{
		{"503 without Retry-After", http.StatusServiceUnavailable, "", oauth.DiscoveryRetry},
		{"503 Retry-After 20", http.StatusServiceUnavailable, "20", 20 * time.Second},
		{"429 Retry-After of a day, capped", http.StatusTooManyRequests, "86400", broker.MaxRetryAfterMemory},
		{"404: no wait", http.StatusNotFound, "", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var discoveries atomic.Int64
			var up atomic.Bool
			mux := http.NewServeMux()
			bank := httptest.NewServer(mux) // 127.0.0.1, port 0
			t.Cleanup(bank.Close)
			fail := func(w http.ResponseWriter, r *http.Request) {
				if up.Load() {
					_, _ = fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q}`, bank.URL, bank.URL+"/authorize", bank.URL+"/token")
					return
				}
				discoveries.Add(1)
				if tc.retryAfter != "" {
					w.Header().Set("Retry-After", tc.retryAfter)
				}
				http.Error(w, "down", tc.status)
			}
			mux.HandleFunc("/.well-known/openid-configuration", fail)
			mux.HandleFunc("/.well-known/oauth-authorization-server", fail)
			var now atomic.Int64
			now.Store(time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC).UnixNano())
			clock := func() time.Time { return time.Unix(0, now.Load()) }
			src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", Issuer: bank.URL, ClientID: "tpp", ClientSecret: "bank-secret", Now: clock}, &oauth.MemoryStore{})
			if err != nil {
				t.Fatal(err)
			}
			site := siteOf(t, src, oauth.AuthCodeConfig{RedirectURIs: []string{"https://cb.partner.example/consent/callback"}, Scopes: []string{"offline_access"}}, &oauth.MemoryPendingStore{}, "acme")
			l, _, err := CreateLink(context.Background(), site.reg, LinkRequest{Merchant: "acme"})
			if err != nil {
				t.Fatal(err)
			}
			want := func(step string, w *httptest.ResponseRecorder, retryAfter string) {
				t.Helper()
				if w.Code != http.StatusServiceUnavailable && tc.wait > 0 || w.Code == http.StatusSeeOther || w.Header().Get("Retry-After") != retryAfter {
					t.Fatalf("%s: %d, Retry-After %q; want a refusal with Retry-After %q:\n%s", step, w.Code, w.Header().Get("Retry-After"), retryAfter, w.Body)
				}
			}
			seconds := ""
			if tc.wait > 0 {
				seconds = fmt.Sprint(tc.wait.Seconds())
			}
			want("start page", site.get(l.URL), seconds)
			before := discoveries.Load()
			if tc.wait == 0 {
				return
			}
			now.Add(int64(tc.wait - time.Second))
			want("start page a second before the wait is over", site.get(l.URL), "1")
			for range oauth.MaxStartsPerLink {
				want("start form a second before the wait is over", site.postStart(t, l.URL), "1")
			}
			if n := discoveries.Load() - before; n != 0 {
				t.Fatalf("%d discoveries within the wait, want none", n)
			}
			if tc.wait >= oauth.DefaultLinkTTL {
				return // the link has expired meanwhile
			}
			up.Store(true)
			now.Add(int64(time.Second))
			if w := site.postStart(t, l.URL); w.Code != http.StatusSeeOther {
				t.Fatalf("start once the bank is back: %d, want 303 to the bank (the refused starts not counted):\n%s", w.Code, w.Body)
			}
		})
	}
}
