package consentweb

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// opCallback and opReturn are the registered callback and the app's
// return URL of the consent site against the test authorization server.
const (
	opCallback = "https://cb.partner.example/consent/callback"
	opReturn   = "https://app.partner.example/consent/done"
)

// countingPendings is a MemoryPendingStore that counts the records put:
// consent links and authorization states.
type countingPendings struct {
	oauth.MemoryPendingStore
	puts atomic.Int64
}

// Put counts the record and stores it.
func (s *countingPendings) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	s.puts.Add(1)
	return s.MemoryPendingStore.Put(ctx, key, val, expires)
}

// opSite is the consent site of merchant acme at provider bank, whose
// authorization server is zitadel's (integration/optest), with pushed
// authorization requests; its logs are observed.
type opSite struct {
	consentSite
	op     *optest.Server
	pend   *countingPendings
	tokens oauth.Store
	src    *oauth.RefreshToken
	logs   *observer.ObservedLogs
	ahead  *atomic.Int64 // how far the site's clock is ahead of the wall clock, in nanoseconds
}

// newOPSite starts the authorization server and the consent site.
func newOPSite(t *testing.T) *opSite {
	t.Helper()
	const secret = "bank-client-secret"
	op := optest.Start(t, optest.Options{}, &optest.Client{ID: "bank-client", Secret: secret, Method: oidc.AuthMethodBasic, Redirects: []string{opCallback}})
	tokens := &oauth.MemoryStore{}
	ahead := new(atomic.Int64)
	now := func() time.Time { return time.Now().Add(time.Duration(ahead.Load())) }
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", Issuer: op.URL, ClientID: "bank-client", ClientSecret: secret, Now: now}, tokens)
	if err != nil {
		t.Fatal(err)
	}
	pend := &countingPendings{}
	site := siteOf(t, src, oauth.AuthCodeConfig{RedirectURIs: []string{opCallback}, ReturnURLs: []string{opReturn}, PAR: true}, pend, "acme")
	core, logs := observer.New(zap.DebugLevel)
	site.web.o.Logger = zap.New(core)
	return &opSite{consentSite: site, op: op, pend: pend, tokens: tokens, src: src, logs: logs, ahead: ahead}
}

// link asks for a consent link of acme (with the return URL, if any).
func (s *opSite) link(t *testing.T, returnURL string) string {
	t.Helper()
	l, _, err := CreateLink(context.Background(), s.reg, LinkRequest{Merchant: "acme", ReturnURL: returnURL})
	if err != nil {
		t.Fatal(err)
	}
	return l.URL
}

// start opens the link's start page and posts its form, as the
// merchant's browser with the cookies; it returns the authorization URL
// and the browser's cookies after the post.
func (s *opSite) start(t *testing.T, link string, cookies []*http.Cookie) (string, []*http.Cookie) {
	t.Helper()
	if w := s.get(link, cookies...); w.Code != http.StatusOK || !strings.Contains(w.Body.String(), `<form method="post" action="start">`) {
		t.Fatalf("start page: %d %.300s", w.Code, w.Body)
	}
	w := s.postStart(t, link, cookies...)
	if w.Code != http.StatusSeeOther || !strings.HasPrefix(w.Header().Get("Location"), s.op.URL) {
		t.Fatalf("start: %d to %q: %.300s", w.Code, w.Header().Get("Location"), w.Body)
	}
	if got := w.Result().Cookies(); len(got) > 0 {
		cookies = got
	}
	return w.Header().Get("Location"), cookies
}

// approve logs in and approves at the authorization server, and returns
// the callback URL it sends the browser back to.
func (s *opSite) approve(t *testing.T, authURL string) string {
	t.Helper()
	back, err := s.op.Authorize(authURL, true)
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(back.String(), opCallback+"?") {
		t.Fatalf("the server sent the browser to %s, want the callback", back.Redacted())
	}
	return back.String()
}

// finish opens the callback with the cookies and returns its answer and,
// when it redirects to the result page, that page.
func (s *opSite) finish(t *testing.T, callback string, cookies []*http.Cookie) (cb, page *httptest.ResponseRecorder) {
	t.Helper()
	cb = s.get(callback, cookies...)
	if loc := cb.Header().Get("Location"); strings.HasPrefix(loc, "done?") {
		return cb, s.get("https://cb.partner.example/consent/" + loc)
	}
	return cb, nil
}

// storedFingerprint is the fingerprint of acme's stored refresh token.
func (s *opSite) storedFingerprint(t *testing.T) string {
	t.Helper()
	rt, err := s.tokens.Load(context.Background(), s.src.StoreKey("acme"))
	if err != nil {
		t.Fatalf("acme's refresh token: %v", err)
	}
	return rt.Fingerprint()
}

// checkLogsHide fails when a log entry holds one of the secrets: a link,
// a state or a code.
func (s *opSite) checkLogsHide(t *testing.T, secrets ...string) {
	t.Helper()
	for _, e := range s.logs.All() {
		line := fmt.Sprint(e.Message, e.ContextMap())
		for _, sec := range secrets {
			if sec != "" && strings.Contains(line, sec) {
				t.Errorf("a log entry holds a link, state or code: %q", e.Message)
			}
		}
	}
}

// secretsOf are the link of a consent link URL, and the state and code
// of callback URLs.
func secretsOf(t *testing.T, link string, callbacks ...string) []string {
	t.Helper()
	var out []string
	for i, u := range append([]string{link}, callbacks...) {
		pu, err := url.Parse(u)
		if err != nil {
			t.Fatal(err)
		}
		if i == 0 {
			out = append(out, pu.Query().Get("link"))
			continue
		}
		out = append(out, pu.Query().Get("state"), pu.Query().Get("code"))
	}
	return out
}

// TestScannerLeavesLinkUsable: a mail or chat scanner that fetches a
// consent link (GET, HEAD, several times, without cookies) gets the
// start page: no cookie, no authorization state stored, no pushed
// request at the bank, nothing to cache or index. The merchant then
// opens the same link, posts its form and consents.
func TestScannerLeavesLinkUsable(t *testing.T) {
	s := newOPSite(t)
	link := s.link(t, "")
	for _, method := range []string{http.MethodHead, http.MethodGet, http.MethodGet, http.MethodHead} {
		w := s.serve(httptest.NewRequest(method, link, nil))
		h := w.Header()
		if w.Code != http.StatusOK || h.Get("Cache-Control") != "no-store" || h.Get("Referrer-Policy") != "no-referrer" || h.Values("Set-Cookie") != nil {
			t.Fatalf("%s by a scanner: %d, headers %v", method, w.Code, h)
		}
		if csp := h.Get("Content-Security-Policy"); !strings.Contains(csp, "form-action 'self' https: "+s.op.URL+";") {
			t.Errorf("CSP %q: the form's redirect to the bank is not allowed", csp)
		}
		if method == http.MethodGet {
			id := secretsOf(t, link)[0]
			for _, want := range []string{`<meta name="robots" content="noindex">`, `<form method="post" action="start"><input type="hidden" name="link" value="` + id + `">`, "Consent for acme"} {
				if !strings.Contains(w.Body.String(), want) {
					t.Errorf("start page lacks %q: %.600s", want, w.Body)
				}
			}
		}
	}
	if puts, pushed := s.pend.puts.Load(), s.op.Pushed.Load(); puts != 1 || pushed != 0 {
		t.Fatalf("after the scanner: %d records stored, %d pushed requests; want the link alone and none", puts, pushed)
	}

	authURL, cookies := s.start(t, link, nil)
	callback := s.approve(t, authURL)
	_, page := s.finish(t, callback, cookies)
	if page == nil || page.Code != http.StatusOK || !strings.Contains(page.Body.String(), "Consent given") {
		t.Fatalf("result page after the scanner: %v", page)
	}
	if s.op.Pushed.Load() != 1 {
		t.Errorf("%d pushed requests, want the merchant's alone", s.op.Pushed.Load())
	}
	s.storedFingerprint(t)
	s.checkLogsHide(t, secretsOf(t, link, callback)...)
}

// TestStartPostSameOriginOnly: the start page's form is accepted from its
// own origin (by Sec-Fetch-Site, or by Origin from a browser without it),
// or from a client that is not a browser (no Sec-Fetch-Site, no Origin);
// a post from another site gets the cross_site page (403), counted as the
// start's outcome, starts nothing and leaves the link usable.
func TestStartPostSameOriginOnly(t *testing.T) {
	s := newOPSite(t)
	var refused float64   // the cross_site starts counted so far
	link := s.link(t, "") // usable until a consent completes: every case posts it
	for _, tc := range []struct {
		name    string
		headers map[string]string
		status  int
	}{
		{"cross-site", map[string]string{"Sec-Fetch-Site": "cross-site"}, http.StatusForbidden},
		{"same-site", map[string]string{"Sec-Fetch-Site": "same-site"}, http.StatusForbidden},
		{"another origin, no Sec-Fetch-Site", map[string]string{"Origin": "https://evil.example"}, http.StatusForbidden},
		{"same origin", map[string]string{"Sec-Fetch-Site": "same-origin"}, http.StatusSeeOther},
		{"same origin, no Sec-Fetch-Site", map[string]string{"Origin": "https://cb.partner.example"}, http.StatusSeeOther},
		{"no browser", nil, http.StatusSeeOther},
	} {
		t.Run(tc.name, func(t *testing.T) {
			form := url.Values{"link": secretsOf(t, link)[:1]}
			r := httptest.NewRequest(http.MethodPost, opCallback[:len(opCallback)-len("callback")]+"start", strings.NewReader(form.Encode()))
			r.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			for k, v := range tc.headers {
				r.Header.Set(k, v)
			}
			pushed := s.op.Pushed.Load()
			w := s.serve(r)
			if w.Code != tc.status {
				t.Fatalf("%d %.300s, want %d", w.Code, w.Body, tc.status)
			}
			if tc.status == http.StatusForbidden {
				if s.op.Pushed.Load() != pushed || w.Header().Values("Set-Cookie") != nil {
					t.Fatalf("a refused post started a consent")
				}
				for _, want := range []string{"Please open the consent link again", "started from another site", "Reference: <code>cross_site</code>"} {
					if !strings.Contains(w.Body.String(), want) {
						t.Errorf("the refusal's page lacks %q: %.600s", want, w.Body)
					}
				}
				if n := testutil.ToFloat64(s.web.o.Steps.WithLabelValues("bank", StepStart, ReasonCrossSite)); n != refused+1 {
					t.Errorf("%v cross_site starts counted, want %v", n, refused+1)
				}
				refused++
				s.start(t, link, nil) // still usable
			}
		})
	}
}

// TestConsentLinkInTwoTabs: the merchant opens one link in two tabs (or
// clicks twice) and consents in both; the tabs come back in the other
// order. The first callback stores its refresh token; the later one gets
// the used page (400, as for any used link), or outcome unknown_state at the app's return
// URL, its code is not exchanged and the first refresh token stays. The
// link is used up then.
func TestConsentLinkInTwoTabs(t *testing.T) {
	for _, returnURL := range []string{"", opReturn} {
		t.Run("return URL "+returnURL, func(t *testing.T) {
			s := newOPSite(t)
			link := s.link(t, returnURL)
			auth1, cookies := s.start(t, link, nil)
			auth2, cookies2 := s.start(t, link, cookies)
			if cookies2[0].Value != cookies[0].Value {
				t.Fatalf("the second tab got another consent cookie")
			}
			cb1, cb2 := s.approve(t, auth1), s.approve(t, auth2)

			first, page := s.finish(t, cb2, cookies)
			if returnURL == "" && (page == nil || page.Code != http.StatusOK || !strings.Contains(page.Body.String(), "Consent given")) {
				t.Fatalf("first callback: %d %v", first.Code, page)
			}
			if returnURL != "" && first.Header().Get("Location") != returnURL+"?merchant=acme&outcome=ok" {
				t.Fatalf("first callback: %d to %q", first.Code, first.Header().Get("Location"))
			}
			fp, exchanges := s.storedFingerprint(t), s.op.Count("authorization_code")

			second, page := s.finish(t, cb1, cookies)
			switch {
			case returnURL == "" && (page == nil || page.Code != http.StatusBadRequest || !strings.Contains(page.Body.String(), "This consent link was already used")):
				t.Errorf("second callback: %d, page %v; want the used page (400)", second.Code, page)
			case returnURL != "" && second.Header().Get("Location") != returnURL+"?merchant=acme&outcome=unknown_state":
				t.Errorf("second callback: %d to %q", second.Code, second.Header().Get("Location"))
			}
			if n := s.op.Count("authorization_code"); n != exchanges {
				t.Errorf("the second tab's code was exchanged (%d exchanges, %d before)", n, exchanges)
			}
			if got := s.storedFingerprint(t); got != fp {
				t.Errorf("refresh token %s after the second callback, want the first's %s", got, fp)
			}
			if w := s.get(link, cookies...); w.Code != http.StatusBadRequest || !strings.Contains(w.Body.String(), "already") {
				t.Errorf("the link after the consent: %d %.300s; want the used page", w.Code, w.Body)
			}
			s.checkLogsHide(t, secretsOf(t, link, cb1, cb2)...)
		})
	}
}

// TestCallbackAfterTheBankFailedTheExchange: a callback whose code
// exchange the bank fails (503, Retry-After: 20) gets the retry_callback
// page (503, "reload this page", its Retry-After the bank's), not the
// app's return URL, and nothing stored; a reload sooner gets it again,
// its Retry-After what is left; the browser's reload of the same URL
// once the wait is over and the bank answers exchanges the same code and
// sends the browser back to the app with outcome ok.
func TestCallbackAfterTheBankFailedTheExchange(t *testing.T) {
	s := newOPSite(t)
	link := s.link(t, opReturn)
	authURL, cookies := s.start(t, link, nil)
	callback := s.approve(t, authURL)

	s.op.TokenStatus.Store(http.StatusServiceUnavailable)
	s.op.TokenRetryAfter.Store(20)
	// The site's clock is the wall clock (moved ahead): a second may pass
	// between the answers, and Retry-After is rounded up.
	for i, want := range [][2]int{{19, 20}, {1, 8}} {
		w := s.get(callback, cookies...)
		ra, _ := strconv.Atoi(w.Header().Get("Retry-After"))
		if w.Code != http.StatusServiceUnavailable || ra < want[0] || ra > want[1] ||
			!strings.Contains(w.Body.String(), "Please reload this page in a moment.") || !strings.Contains(w.Body.String(), oauth.ReasonRetryCallback) {
			t.Fatalf("callback %d while the bank fails: %d, Retry-After %q, Location %q: %.600s; want 503, the retry_callback page, Retry-After %d to %d",
				i+1, w.Code, w.Header().Get("Retry-After"), w.Header().Get("Location"), w.Body, want[0], want[1])
		}
		s.ahead.Add(int64(12 * time.Second))
	}
	if _, err := s.tokens.Load(context.Background(), s.src.StoreKey("acme")); err == nil {
		t.Fatal("a refresh token was stored")
	}

	s.op.TokenStatus.Store(0)
	w := s.get(callback, cookies...)
	if w.Code != http.StatusSeeOther || w.Header().Get("Location") != opReturn+"?merchant=acme&outcome=ok" {
		t.Fatalf("the reloaded callback: %d to %q, want the app's return URL with outcome ok", w.Code, w.Header().Get("Location"))
	}
	s.storedFingerprint(t)
	if n := s.op.Count("authorization_code"); n != 2 {
		t.Errorf("%d code exchanges, want 2 (the same code again)", n)
	}
	s.checkLogsHide(t, secretsOf(t, link, callback)...)
}
