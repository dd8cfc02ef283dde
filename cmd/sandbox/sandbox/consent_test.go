package sandbox

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

const sbCallback = "https://cb.partner.example/consent/callback"

// consentBank is a sandbox with one bank client for the consent flow, and
// the broker's flow against it.
func consentBank(t *testing.T) (*Server, *httptest.Server, *oauth.RefreshToken, *oauth.AuthCode) {
	t.Helper()
	s := New(Config{BankClients: []BankClient{{ID: "rt-client", Secret: "rt-secret", Scopes: []string{"accounts"}, RedirectURIs: []string{sbCallback}}}})
	ts := httptest.NewServer(s)
	t.Cleanup(ts.Close)
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", Issuer: ts.URL, ClientID: "rt-client", ClientSecret: "rt-secret"}, &oauth.MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	flow, err := oauth.NewAuthCode(src, oauth.AuthCodeConfig{RedirectURIs: []string{sbCallback}, Scopes: []string{"openid", "offline_access", "accounts"}},
		&oauth.Pendings{Store: &oauth.MemoryPendingStore{}})
	if err != nil {
		t.Fatal(err)
	}
	return s, ts, src, flow
}

var browser = &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// decide opens the consent link's authorization URL, checks the approve
// page and submits decision; it returns the query sent to the callback.
func decide(t *testing.T, ts *httptest.Server, flow *oauth.AuthCode, decision string) url.Values {
	t.Helper()
	link, err := flow.NewLink(context.Background(), "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	lu, _ := url.Parse(link.URL)
	authURL, _, err := flow.Start(context.Background(), lu.Query().Get("link"), lu.Host)
	if err != nil {
		t.Fatal(err)
	}
	au, _ := url.Parse(authURL)
	if au.Path != bankAuthorizePath || au.Query().Get("code_challenge_method") != "S256" {
		t.Fatalf("authorization URL %s", au.Redacted())
	}
	resp, err := browser.Get(authURL)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK || !strings.HasPrefix(resp.Header.Get("Content-Type"), "text/html") {
		t.Fatalf("approve page: %d", resp.StatusCode)
	}
	form := au.Query()
	form.Set("decision", decision)
	resp, err = browser.PostForm(ts.URL+bankAuthorizePath, form)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	loc, _ := url.Parse(resp.Header.Get("Location"))
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(loc.String(), sbCallback+"?") {
		t.Fatalf("decision answered %d to %s", resp.StatusCode, loc)
	}
	return loc.Query()
}

// TestBankConsentFlow: the broker's consent flow against the sandbox bank:
// approve gives a refresh token that refreshes; deny is access_denied; the
// code is single-use; the bank sends iss and the broker checks it.
func TestBankConsentFlow(t *testing.T) {
	ctx := context.Background()
	t.Run("approve", func(t *testing.T) {
		s, ts, src, flow := consentBank(t)
		q := decide(t, ts, flow, "approve")
		if q.Get("iss") != ts.URL {
			t.Errorf("iss = %q", q.Get("iss"))
		}
		res, err := flow.Callback(ctx, "cb.partner.example", q)
		if err != nil || res.Merchant != "acme" {
			t.Fatalf("Callback = %+v, %v", res, err)
		}
		tok, err := src.Token(ctx, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
		if err != nil || tok.Value == "" {
			t.Fatalf("Token = %v", err)
		}
		if got := s.BankTokenRequests(); got != 2 {
			t.Errorf("%d token requests, want the code exchange and one refresh", got)
		}
	})
	t.Run("deny", func(t *testing.T) {
		_, ts, _, flow := consentBank(t)
		_, err := flow.Callback(ctx, "cb.partner.example", decide(t, ts, flow, "deny"))
		var ce *oauth.ConsentError
		if !errors.As(err, &ce) || ce.Reason != oauth.ReasonDenied {
			t.Fatalf("Callback = %v, want denied", err)
		}
	})
	t.Run("code without verifier, then replayed", func(t *testing.T) {
		_, ts, _, flow := consentBank(t)
		q := decide(t, ts, flow, "approve")
		form := url.Values{"grant_type": {"authorization_code"}, "code": {q.Get("code")}, "redirect_uri": {sbCallback}}
		req, _ := http.NewRequest(http.MethodPost, ts.URL+bankTokenPath, strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		req.SetBasicAuth("rt-client", "rt-secret")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest {
			t.Fatalf("exchange without verifier: %d", resp.StatusCode)
		}
		// The refused attempt used the code up.
		_, err = flow.Callback(ctx, "cb.partner.example", q)
		var ce *oauth.ConsentError
		if !errors.As(err, &ce) || ce.Reason != oauth.ReasonExchangeFailed {
			t.Fatalf("Callback after the code was used = %v", err)
		}
	})
	t.Run("unregistered redirect_uri is not redirected to", func(t *testing.T) {
		_, ts, _, _ := consentBank(t)
		resp, err := browser.Get(ts.URL + bankAuthorizePath + "?response_type=code&client_id=rt-client&redirect_uri=https://evil.example/cb&state=x&code_challenge=y&code_challenge_method=S256")
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusBadRequest || resp.Header.Get("Location") != "" {
			t.Fatalf("status %d, Location %q", resp.StatusCode, resp.Header.Get("Location"))
		}
	})
}
