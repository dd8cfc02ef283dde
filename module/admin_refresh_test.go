package module

import (
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// TestAdminRefreshTokenForgetsConsentRequired: after invalid_grant the
// broker remembers the merchant's consent_required (FailureTTL); a refresh
// token put through the admin API drops that memory, so the very next call
// refreshes with it. The clock never moves: without the drop, the call would
// get the remembered consent_required.
func TestAdminRefreshTokenForgetsConsentRequired(t *testing.T) {
	var calls atomic.Int64
	bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if r.ParseForm() != nil || r.PostForm.Get("grant_type") != "refresh_token" || r.PostForm.Get("refresh_token") != "rt-new" {
			w.WriteHeader(http.StatusBadRequest)
			w.Write([]byte(`{"error":"invalid_grant","error_description":"refresh token revoked"}`))
			return
		}
		w.Write([]byte(`{"access_token":"at-after-consent","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(bank.Close)

	toml := `[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "` + bank.URL + `/token"
client_id = "tpp"
client_secret = "{env.BANK_SECRET}"

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`
	reg, err := configtest.Load(t, "merchants.toml", []byte(toml), config.Options{RefreshStore: &oauth.MemoryStore{},
		LookupEnv: func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }})
	if err != nil {
		t.Fatal(err)
	}
	now := time.Now()
	app := &App{registry: reg, logger: zap.NewNop(),
		broker: broker.New(broker.Options{Now: func() time.Time { return now }, MaxAttempts: 1})}
	t.Cleanup(app.broker.Close)
	p := reg.Providers["bank"]
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector(),
		broker: app.broker}
	b := brokertest.NewBinding(p.ID, p.Source, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
	h.bindings = handTable("bank", "", b)
	h.instrument(nil)

	put := func(rt string) {
		t.Helper()
		req := httptest.NewRequest(http.MethodPut, "/token_broker/merchants/acme/refresh_token", strings.NewReader(`{"refresh_token":"`+rt+`"}`))
		rec := httptest.NewRecorder()
		if err := adminapi.Serve(rec, req, app.admin()); err != nil || rec.Code != http.StatusOK {
			t.Fatalf("PUT refresh_token %s: %d %v", rt, rec.Code, err)
		}
		if strings.Contains(rec.Body.String(), rt) {
			t.Fatalf("the admin answer shows the refresh token: %s", rec.Body)
		}
	}

	put("rt-revoked")
	if rec := request(t, h, "acme"); rec.Code != http.StatusBadGateway || !strings.Contains(rec.Body.String(), "consent_required") {
		t.Fatalf("with a revoked refresh token: %d %s, want 502 consent_required", rec.Code, rec.Body)
	}
	// Remembered: a second call does not reach the bank.
	before := calls.Load()
	if rec := request(t, h, "acme"); rec.Code != http.StatusBadGateway || calls.Load() != before {
		t.Fatalf("second call: %d, bank calls %d -> %d; want the remembered consent_required", rec.Code, before, calls.Load())
	}

	put("rt-new")
	if rec := request(t, h, "acme"); rec.Code != 0 && rec.Code != http.StatusOK {
		t.Fatalf("after PUT of a new refresh token: %d %s; want the call through at once", rec.Code, rec.Body)
	}
	if calls.Load() != before+1 {
		t.Fatalf("bank calls %d, want %d (one refresh with the new token)", calls.Load(), before+1)
	}
}
