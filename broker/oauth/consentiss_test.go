package oauth

import (
	"context"
	"errors"
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
	link, err := flow.NewLink(ctx, "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	lu, _ := url.Parse(link.URL)
	authURL, _, err := flow.Start(ctx, lu.Query().Get("link"), lu.Host)
	if err != nil {
		t.Fatal(err)
	}
	au, _ := url.Parse(authURL)
	q := url.Values{"state": {au.Query().Get("state")}, "code": {"c1"}, "iss": {"https://bank.example"}}
	_, err = flow.Callback(ctx, lu.Host, q)
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
