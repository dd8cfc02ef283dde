package module

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
)

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
		var body admission.ErrorBody
		if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Error != "token_refused" || !strings.Contains(body.Message, tt.want) {
			t.Errorf("%s: %d %s, want token_refused mentioning %q", tt.typ, rec.Code, rec.Body, tt.want)
		}
	}
}
