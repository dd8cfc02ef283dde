package adminapi

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// TestSetRefreshTokenRefusals: a body whose refresh token RFC 6749 does
// not allow (a control character, non-ASCII, too long) is refused 400
// naming the merchant and the field, never the token, and nothing is
// stored; a valid one, spaces included, is stored.
func TestSetRefreshTokenRefusals(t *testing.T) {
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.example/token", ClientID: "c", ClientSecret: "s"}, &oauth.MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank", Source: src}},
		Merchants: map[string]*config.Merchant{"acme": {ID: "acme", Terms: &config.Terms{Provider: "bank"}}}}
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	for _, tc := range []struct {
		name, body, token string
		status            int
	}{
		{"tab", `{"refresh_token":"rt\tSECRET"}`, "rt\tSECRET", http.StatusBadRequest},
		{"non-ASCII", `{"refresh_token":"rt-SECRET-é"}`, "rt-SECRET-é", http.StatusBadRequest},
		{"over 16 KiB", `{"refresh_token":"` + strings.Repeat("S", broker.MaxTokenBytes+1) + `"}`, strings.Repeat("S", 64), http.StatusBadRequest},
		{"spaces", `{"refresh_token":" rt SECRET "}`, " rt SECRET ", 0},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := httptest.NewRequest(http.MethodPut, "/token_broker/merchants/acme/refresh_token", strings.NewReader(tc.body))
			_, _, _, err := SetRefreshToken(r, reg, br, "acme")
			stored, _ := src.Store().Load(context.Background(), src.StoreKey("acme"))
			if tc.status == 0 {
				if err != nil || stored.Reveal() != tc.token {
					t.Fatalf("SetRefreshToken = %v, stored %s; want it stored", err, stored.Fingerprint())
				}
				return
			}
			var ae *Error
			if !errors.As(err, &ae) || ae.Status != tc.status {
				t.Fatalf("SetRefreshToken = %v, want a %d *Error", err, tc.status)
			}
			msg := err.Error()
			if !strings.Contains(msg, `merchant "acme"`) || !strings.Contains(msg, "refresh_token") || strings.Contains(msg, tc.token) || strings.Contains(msg, "SECRET") {
				t.Errorf("the refusal does not name the merchant and field, or quotes the token: %.300s", msg)
			}
			if stored.Reveal() == tc.token {
				t.Errorf("the refused token was stored")
			}
		})
	}
}
