package fleet

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// TestRefreshTokenResealedAcrossKeyRotation: a merchant's refresh token
// that the provider never rotates, saved before an encryption-key
// rotation, is sealed with the new key (and stored under the new key's
// name) at the merchant's first refresh on a rotated node, so that once the
// old key is dropped (README, Rotating the encryption key, step 3) the
// merchant is still refreshed, not asked for consent again.
func TestRefreshTokenResealedAcrossKeyRotation(t *testing.T) {
	r := startRedis(t)
	tokenAPI := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if err := req.ParseForm(); err != nil || req.PostForm.Get("refresh_token") != "rt-never-rotated" {
			http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		_, _ = w.Write([]byte(`{"access_token":"at-abcdef","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(tokenAPI.Close)
	cfg := oauth.Config{Name: "bank", TokenURL: tokenAPI.URL + "/token", ClientID: "tpp", ClientSecret: "bank-secret"}
	source := func(n *node) *oauth.RefreshToken {
		src, err := oauth.NewRefreshToken(cfg, n.Store())
		if err != nil {
			t.Fatal(err)
		}
		return src
	}
	ctx := testCtx(t)
	req := broker.Request{Merchant: "acme"}

	before := newNode(t, r, testKeys(t, 1), nil) // the old key only
	if err := source(before).SetRefreshToken(ctx, "acme", "rt-never-rotated"); err != nil {
		t.Fatal(err)
	}
	rotated := newNode(t, r, testKeys(t, 2, 1), nil) // step 2: the new key current, the old one listed
	if _, err := source(rotated).Token(ctx, req); err != nil {
		t.Fatalf("refresh on a rotated node: %v", err)
	}
	after := newNode(t, r, testKeys(t, 2), nil) // step 3: the old key dropped
	if _, err := source(after).Token(ctx, req); err != nil {
		var consent *oauth.ConsentRequiredError
		t.Fatalf("refresh once the old key is dropped: %v (consent required: %v); want the refresh token sealed with the new key at its refresh on the rotated node",
			err, errors.As(err, &consent))
	}
	// Nothing is left under the old key's name.
	oldName := before.Store().redisKey(before.nameKeys[0], oauth.StoreKey(cfg, "acme"))
	if n := r.Client().Exists(context.Background(), oldName).Val(); n != 0 {
		t.Errorf("a copy of the refresh token is left under the old key's name")
	}
}
