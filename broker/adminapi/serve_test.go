package adminapi

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
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
			rec := httptest.NewRecorder()
			err := Serve(rec, httptest.NewRequest(tt.method, tt.path, nil), tt.in)
			status, msg := rec.Code, rec.Body.String()
			var ae *Error
			if errors.As(err, &ae) {
				status, msg = ae.Status, ae.Error()
			} else if err != nil {
				t.Fatal(err)
			}
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
