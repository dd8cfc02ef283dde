package oauth_test

import (
	"bytes"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// TestRefreshSealsTheStoredTokenWithoutRotation: a refresh token kept in
// clear in Caddy's storage is sealed, under the refresh's lock, by the
// first refresh once the store has keys, even when the provider does not
// rotate it (so nothing is saved).
func TestRefreshSealsTheStoredTokenWithoutRotation(t *testing.T) {
	const rt = "rt-secret-marker"
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := r.ParseForm(); err != nil || r.PostForm.Get("refresh_token") != rt {
			http.Error(w, `{"error":"invalid_grant"}`, http.StatusBadRequest)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"at-1234","token_type":"Bearer","expires_in":60}`)
	}))
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	fs := &certmagic.FileStorage{Path: dir}
	keys, err := seal.New(bytes.Repeat([]byte{'k'}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	var locks keylock.Map
	store := kvstore.Refresh{S: fs, Locks: &locks, Keys: keys}
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: "cs"}, store)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	key := src.StoreKey("acme")
	// Stored in clear, as before the keys were set.
	if err := (kvstore.Refresh{S: fs, Locks: &locks}).Save(ctx, key, rt); err != nil {
		t.Fatal(err)
	}
	raw := func() []byte {
		t.Helper()
		b, err := os.ReadFile(filepath.Join(dir, filepath.FromSlash(kvstore.RefreshTokenPrefix+url.PathEscape(key))))
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	if string(raw()) != rt {
		t.Fatal("the refresh token is not stored in clear before the refresh")
	}
	if tok, err := src.Token(ctx, broker.Request{Merchant: "acme"}); err != nil || tok.Value.Reveal() != "at-1234" {
		t.Fatalf("Token = %v; want the access token", err)
	}
	if b := raw(); bytes.Contains(b, []byte(rt)) || !keys.IsCurrent(b) {
		t.Fatalf("after a refresh without rotation the file holds %q; want it sealed with the current key", b)
	}
	if got, err := store.Load(ctx, key); err != nil || got.Reveal() != rt {
		t.Fatalf("Load = %q, %v; want the refresh token", got.Reveal(), err)
	}
}
