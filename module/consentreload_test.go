package module

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	_ "github.com/caddyserver/caddy/v2/modules/filestorage" // the storage of the test's own
	_ "github.com/caddyserver/caddy/v2/modules/logging"     // the consent log file
	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// reloadConsent is a Caddy running a consent site (token_broker_consent
// for provider bank, on http://localhost/consent/) against zitadel's OP,
// whose token requests wait for gate while one is set.
type reloadConsent struct {
	op      *optest.Server
	addr    string // where the running config's consent site listens
	dir     string // Caddy's storage, the registry, the consent log
	reg     string // the registry file
	gate    atomic.Pointer[chan struct{}]
	arrived chan struct{} // a token request waits at the gate
}

// reloadConsentTOML is the registry; its provider bank is changed by the
// rows of TestConsentCallbackAcrossReload.
const reloadConsentTOML = `[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = "{env.TB_RELOAD_ISSUER}"
client_id = "bank-client"
client_secret = "{env.TB_RELOAD_SECRET}"
  [providers.bank.consent]
  redirect_uris = ["http://localhost/consent/callback"]
  scopes = ["openid", "offline_access", "accounts"]

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`

// startReloadConsent starts the OP and Caddy with the registry.
func startReloadConsent(t *testing.T) *reloadConsent {
	t.Helper()
	const secret = "bank-secret-7c1e"
	s := &reloadConsent{dir: t.TempDir(), arrived: make(chan struct{}, 1)}
	s.op = optest.Start(t, optest.Options{}, &optest.Client{ID: "bank-client", Secret: secret, Method: oidc.AuthMethodBasic,
		Redirects: []string{"http://localhost/consent/callback"}})
	s.op.BeforeToken = func(*http.Request) {
		if g := s.gate.Load(); g != nil {
			s.arrived <- struct{}{}
			<-*g
		}
	}
	t.Setenv("TB_RELOAD_ISSUER", s.op.URL)
	t.Setenv("TB_RELOAD_SECRET", secret)
	s.reg = filepath.Join(s.dir, "merchants.toml")
	prev := current.Load()
	t.Cleanup(func() { current.Store(prev) })
	t.Cleanup(func() { _ = caddy.Stop() })
	s.load(t, reloadConsentTOML)
	return s
}

// load writes the registry and loads (or reloads) Caddy's config.
func (s *reloadConsent) load(t *testing.T, registry string) {
	t.Helper()
	if err := os.WriteFile(s.reg, []byte(registry), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg := fmt.Sprintf(`{"admin": {"disabled": true, "config": {"persist": false}},
		"storage": {"module": "file_system", "root": %q},
		"logging": {"logs": {"default": {"level": "ERROR", "exclude": ["http.handlers.token_broker_consent"]},
			"consent": {"writer": {"output": "file", "filename": %q}, "level": "DEBUG", "include": ["http.handlers.token_broker_consent"]}}},
		"apps": {"token_broker": {"config": %q},
			"http": {"servers": {"s": {"listen": ["127.0.0.1:0"], "automatic_https": {"disable": true},
				"routes": [{"handle": [{"handler": "token_broker_consent", "provider": "bank"}]}]}}}}}`,
		filepath.Join(s.dir, "storage"), filepath.Join(s.dir, "consent.log"), s.reg)
	if err := caddy.Load([]byte(cfg), true); err != nil {
		t.Fatal(err)
	}
	app, err := caddy.ActiveContext().App("http")
	if err != nil {
		t.Fatal(err)
	}
	s.addr = app.(*caddyhttp.App).Servers["s"].Listeners()[0].Addr().String()
}

// send sends a request for http://localhost<path> to the running
// config's consent site, without following a redirect.
func (s *reloadConsent) send(t *testing.T, method, path, body string, cookies ...*http.Cookie) *http.Response {
	t.Helper()
	resp, err := s.do(method, path, body, cookies...)
	if err != nil {
		t.Fatal(err)
	}
	return resp
}

// do is send, returning its error.
func (s *reloadConsent) do(method, path, body string, cookies ...*http.Cookie) (*http.Response, error) {
	req, err := http.NewRequest(method, "http://"+s.addr+path, strings.NewReader(body))
	if err != nil {
		return nil, err
	}
	req.Host = "localhost"
	req.Header.Set("Sec-Fetch-Site", "same-origin")
	if body != "" {
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	}
	for _, c := range cookies {
		req.AddCookie(c)
	}
	client := &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	resp.Body.Close()
	return resp, nil
}

// authorize starts a consent of acme in a browser and returns the
// callback the OP sends it back with (path and query) and its consent
// cookie.
func (s *reloadConsent) authorize(t *testing.T) (string, *http.Cookie) {
	t.Helper()
	link, err := current.Load().registry.Providers["bank"].Consent.NewLink(context.Background(), "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	resp := s.send(t, http.MethodPost, "/consent/start", url.Values{"link": {u.Query().Get("link")}}.Encode())
	if resp.StatusCode != http.StatusSeeOther || len(resp.Cookies()) != 1 {
		t.Fatalf("start: %d, cookies %v", resp.StatusCode, resp.Cookies())
	}
	back, err := s.op.Authorize(resp.Header.Get("Location"), true)
	if err != nil {
		t.Fatal(err)
	}
	return back.RequestURI(), resp.Cookies()[0]
}

// outcomes are the outcomes of the callbacks the consent site logged, in
// order.
func (s *reloadConsent) outcomes(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(s.dir, "consent.log"))
	if err != nil {
		t.Fatal(err)
	}
	var out []string
	for sc := bufio.NewScanner(bytes.NewReader(b)); sc.Scan(); {
		var line struct{ Step, Outcome string }
		if json.Unmarshal(sc.Bytes(), &line) == nil && line.Step == "callback" {
			out = append(out, line.Outcome)
		}
	}
	return out
}

// spendWait makes the authorization state kept for callback (a path and
// query) due for its retry now, as the passing of the wait would: it
// rewrites the sealed record (oauth.Pendings' layout) in Caddy's storage.
func (s *reloadConsent) spendWait(t *testing.T, callback string) {
	t.Helper()
	u, _ := url.Parse(callback)
	state := u.Query().Get("state")
	ctx := context.Background()
	recs := oauth.Sealed{Store: kvstore.Pending{S: caddy.ActiveContext().Storage()}, Domain: "token_broker consent ", Prefix: "state"}
	var rec oauth.Pending
	if err := recs.Get(ctx, "state\x00"+state, &rec); err != nil {
		t.Fatalf("the kept authorization state: %v", err)
	}
	if rec.Retry.IsZero() {
		t.Fatal("the authorization state is not kept for a retry")
	}
	rec.Retry = time.Now().Add(-time.Second)
	if err := recs.Put(ctx, "state\x00"+state, rec, rec.Expires); err != nil {
		t.Fatal(err)
	}
}

// TestConsentCallbackAcrossReload: a callback whose code exchange the
// bank fails with 503 keeps its authorization state (retry_callback); a
// Caddy reload with the same registry, also one made while that exchange
// waits at the bank, or with the provider changed, keeps it: the
// callback, reloaded in the browser, gets retry_callback again before the
// wait is over, then the answer of the config now running (the consent,
// or the exchange refused for the bank's other client), never
// unknown_state.
func TestConsentCallbackAcrossReload(t *testing.T) {
	same := func(s string) string { return s }
	timeout := func(s string) string { return strings.Replace(s, "client_id =", "timeout = \"20s\"\nclient_id =", 1) }
	otherClient := func(s string) string {
		return strings.Replace(s, `client_id = "bank-client"`, `client_id = "other-client"`, 1)
	}
	rows := []struct {
		name     string
		inFlight bool                // the reload runs while the failing exchange waits at the bank
		reload   func(string) string // the registry of the reload
		sameFlow bool                // the reload keeps the registry (and its consent flow)
		want     string              // the outcome once the wait is spent
	}{
		{"same registry", false, same, true, "ok"},
		{"same registry, during the exchange", true, same, true, "ok"},
		{"provider's settings changed", false, timeout, false, "ok"},
		{"provider's settings changed, during the exchange", true, timeout, false, "ok"},
		{"provider's client changed", false, otherClient, false, oauth.ReasonExchangeFailed},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			s := startReloadConsent(t)
			callback, cookie := s.authorize(t)
			reg := current.Load().registry
			s.op.TokenStatus.Store(http.StatusServiceUnavailable)
			var first *http.Response
			if tc.inFlight {
				gate := make(chan struct{})
				s.gate.Store(&gate)
				answered := make(chan *http.Response, 1)
				go func() {
					resp, err := s.do(http.MethodGet, callback, "", cookie)
					if err != nil {
						t.Error(err)
						resp = &http.Response{}
					}
					answered <- resp
				}()
				<-s.arrived
				s.load(t, tc.reload(reloadConsentTOML))
				s.gate.Store(nil)
				close(gate)
				first = <-answered
			} else {
				first = s.send(t, http.MethodGet, callback, "", cookie)
				s.load(t, tc.reload(reloadConsentTOML))
			}
			if first.StatusCode != http.StatusServiceUnavailable || first.Header.Get("Retry-After") == "" {
				t.Fatalf("callback with the bank failing: %d, Retry-After %q; want 503 retry_callback", first.StatusCode, first.Header.Get("Retry-After"))
			}
			if kept := current.Load().registry == reg; kept != tc.sameFlow {
				t.Fatalf("the reload kept the registry: %t, want %t", kept, tc.sameFlow)
			}
			s.op.TokenStatus.Store(0)
			early := s.send(t, http.MethodGet, callback, "", cookie)
			want := []string{oauth.ReasonRetryCallback, oauth.ReasonRetryCallback}
			if got := s.outcomes(t); strings.Join(got, " ") != strings.Join(want, " ") || early.StatusCode != http.StatusServiceUnavailable {
				t.Fatalf("callback outcomes %v (statuses %d, %d), want %v (503, 503)", got, first.StatusCode, early.StatusCode, want)
			}
			s.spendWait(t, callback)
			last := s.send(t, http.MethodGet, callback, "", cookie)
			if got, want := s.outcomes(t), append(want, tc.want); strings.Join(got, " ") != strings.Join(want, " ") {
				t.Fatalf("callback outcomes %v (last status %d), want %v", got, last.StatusCode, want)
			}
			if n := s.op.Count("authorization_code"); n != 2 {
				t.Errorf("%d code exchanges, want 2", n)
			}
			if tc.want == "ok" && (last.StatusCode != http.StatusSeeOther || len(s.op.Storage.RefreshTokens("bank-client")) != 1) {
				t.Errorf("last callback: %d, refresh tokens issued %d; want 303 and 1", last.StatusCode, len(s.op.Storage.RefreshTokens("bank-client")))
			}
		})
	}
}
