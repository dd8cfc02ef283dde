package oauth

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
)

// TestIssWithoutConfiguredIssuer: a provider configured with token_url
// and authorization_url (no issuer) whose authorization response carries
// iss (RFC 9207) is refused, and the error says what to configure instead
// of comparing the iss with an empty issuer.
func TestIssWithoutConfiguredIssuer(t *testing.T) {
	ctx := context.Background()
	flow, _ := newLimitFlow(t, newClock(), LinkLimits{})
	authURL, host := startConsent(t, &consentFixture{flow: flow}, "acme")
	au, _ := url.Parse(authURL)
	state := au.Query().Get("state")
	_, err := flow.Callback(ctx, host, url.Values{"state": {state}, "code": {"c1"}, "iss": {"https://bank.example"}})
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonWrongIssuer {
		t.Fatalf("Callback = %v, want %s", err, ReasonWrongIssuer)
	}
	if msg := err.Error(); !strings.Contains(msg, "set issuer") || strings.Contains(msg, `issuer ""`) {
		t.Errorf("the error does not say to configure the issuer: %s", msg)
	}
}

// TestProviderErrorWithoutState: a provider that redirects back with an
// error but without the state (RFC 6749 §4.1.2.1 wants it; some omit it)
// cannot be tied to a consent, and the refusal names the provider's error
// code instead of only an unknown state.
func TestProviderErrorWithoutState(t *testing.T) {
	ctx := context.Background()
	flow, _ := newLimitFlow(t, newClock(), LinkLimits{})
	u, _ := url.Parse(callbackURL)
	q := url.Values{"error": {"unauthorized_client"}, "error_description": {"client not allowed"}}
	_, err := flow.Callback(ctx, u.Host, q)
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonUnknownState {
		t.Fatalf("Callback = %v, want %s", err, ReasonUnknownState)
	}
	if msg := err.Error(); !strings.Contains(msg, "unauthorized_client") || !strings.Contains(msg, "client not allowed") {
		t.Errorf("the error does not name the provider's error: %s", msg)
	}
}

// TestUnrequestedIDTokenIgnored: a provider configured with token_url
// (openid cannot be asked without an issuer) whose code exchange answers
// with an id_token nobody asked for: the id_token is a value the client
// does not use and ignores (RFC 6749 §5.1), and the consent is stored.
func TestUnrequestedIDTokenIgnored(t *testing.T) {
	ctx := context.Background()
	s := &stub{status: 200, body: `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1","id_token":"eyJhbGciOiJSUzI1NiJ9.e30.c2ln"}`}
	srv := startStub(t, s)
	clock := newClock()
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: clock.Now}, NewMemoryStore())
	if err != nil {
		t.Fatal(err)
	}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, AuthorizationURL: srv.URL + "/authorize",
		Scopes: []string{"accounts", "offline_access"}}, &Pendings{Store: &MemoryPendingStore{Now: clock.Now}})
	if err != nil {
		t.Fatal(err)
	}
	authURL, host := startConsent(t, &consentFixture{flow: flow}, "acme")
	au, _ := url.Parse(authURL)
	state := au.Query().Get("state")
	res, err := flow.Callback(ctx, host, url.Values{"state": {state}, "code": {"c1"}})
	if err != nil {
		t.Fatalf("Callback = %v, want the consent stored", err)
	}
	if rt, err := src.Store().Load(ctx, src.StoreKey("acme")); err != nil || rt.Reveal() != "rt-1" || res.Merchant != "acme" {
		t.Errorf("stored %v, %v; result %+v", rt, err, res)
	}
}

// TestFormEncodedCodeExchangeWithoutIDToken: a discovered provider (an
// issuer, no openid asked) whose code exchange answers form-encoded
// (RFC 6749 allows it; x/oauth2's Token.Extra then reads a missing
// id_token as "") without an id_token: there is no ID token to verify,
// and the consent is stored.
func TestFormEncodedCodeExchangeWithoutIDToken(t *testing.T) {
	var srv *httptest.Server
	srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			w.Header().Set("Content-Type", "application/json")
			fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q,"jwks_uri":%q}`,
				srv.URL, srv.URL+"/authorize", srv.URL+"/token", srv.URL+"/jwks")
		case "/token":
			w.Header().Set("Content-Type", "application/x-www-form-urlencoded")
			fmt.Fprint(w, "access_token=at-1&token_type=bearer&expires_in=60&refresh_token=rt-1")
		default:
			http.NotFound(w, r)
		}
	}))
	defer srv.Close()
	ctx := context.Background()
	src, err := NewRefreshToken(Config{Name: "bank", Issuer: srv.URL, ClientID: "bank-client", ClientSecret: secretValue}, NewMemoryStore())
	if err != nil {
		t.Fatal(err)
	}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts", "offline_access"}},
		&Pendings{Store: &MemoryPendingStore{}})
	if err != nil {
		t.Fatal(err)
	}
	authURL, host := startConsent(t, &consentFixture{flow: flow}, "acme")
	au, _ := url.Parse(authURL)
	if _, err := flow.Callback(ctx, host, url.Values{"state": {au.Query().Get("state")}, "code": {"c1"}}); err != nil {
		t.Fatalf("Callback = %v, want the consent stored", err)
	}
	if rt, err := src.Store().Load(ctx, src.StoreKey("acme")); err != nil || rt.Reveal() != "rt-1" {
		t.Errorf("stored %v, %v", rt, err)
	}
}
