package module

import (
	"context"
	"encoding/json"
	"errors"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// TestEveryCodeHasAMessage: every code a caller can get says what to do,
// for every provider type, and OAuth users are not told about Nuapay's
// organisations.
func TestEveryCodeHasAMessage(t *testing.T) {
	codes := []string{"method_refused", "forbidden_trailer", "missing_merchant", "ambiguous_merchant",
		"invalid_merchant", "unknown_merchant", "caller_unauthenticated", "caller_keys_unavailable", "caller_forbidden"}
	for _, err := range []error{
		context.Canceled, context.DeadlineExceeded,
		&oauth.ConsentRequiredError{Provider: "bank", Merchant: "acme", Err: oauth.ErrNoRefreshToken},
		&broker.UnavailableError{SourceID: "x"},
		&broker.RequestError{Merchant: "acme", Field: "scopes", Reason: "empty"},
		&broker.APIError{Provider: "oauth2", StatusCode: 429},
		&broker.APIError{Provider: "oauth2", StatusCode: 200},
		&broker.APIError{Provider: "oauth2", StatusCode: 401, Code: "invalid_client"},
		&broker.APIError{Provider: "nuapay", StatusCode: 503},
		errors.New("connection refused"),
	} {
		_, code := classify(err)
		codes = append(codes, code)
	}
	for _, code := range codes {
		for _, typ := range []string{"", "nuapay", "oauth2"} {
			if message(code, typ) == "" {
				t.Errorf("code %s, provider type %q: no message", code, typ)
			}
		}
	}
	if m := message("token_refused", "oauth2"); strings.Contains(strings.ToLower(m), "organisation") {
		t.Errorf("oauth2 token_refused speaks Nuapay: %q", m)
	}
	if m := message("token_refused", "nuapay"); !strings.Contains(m, "organisation") {
		t.Errorf("nuapay token_refused does not say to check the organisation: %q", m)
	}
	if m := message("invalid_merchant", ""); !strings.Contains(m, "no comma") {
		t.Errorf("invalid_merchant does not say a comma is refused: %q", m)
	}
}

// TestRefusalMessagePerProviderType: the body an OAuth merchant's caller
// gets names OAuth things.
func TestRefusalMessagePerProviderType(t *testing.T) {
	for _, tt := range []struct{ typ, want string }{
		{"oauth2", "client id"},
		{"nuapay", "organisation"},
	} {
		var calls atomic.Int64
		h := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
			calls.Add(1)
			return broker.Token{}, &broker.APIError{Provider: tt.typ, StatusCode: 401, Code: "invalid_client"}
		}, "json")
		h.bindings = handTable("nuapay", tt.typ, &h.bindings.Peek("acme").Binding)
		req := httptest.NewRequest("GET", "/", nil)
		req.Header.Set("X-Merchant-Id", "acme")
		rec, _, _ := serve(t, h, req)
		var body errorBody
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Error != "token_refused" || !strings.Contains(body.Message, tt.want) {
			t.Errorf("%s: %d %s, want token_refused mentioning %q", tt.typ, rec.Code, rec.Body, tt.want)
		}
	}
}
