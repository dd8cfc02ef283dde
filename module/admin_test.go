package module

import (
	"context"
	"encoding/json"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// The token list shows each entry's origin and the failure policy's state
// of its key: next refresh attempt, last refresh error code, backoff end;
// never the token.
func TestAdminTokenListShowsPolicyState(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	var fail atomic.Bool
	const secret = "tok-admin-secret"
	src := sourceFunc(func(ctx context.Context, req broker.Request) (broker.Token, error) {
		if fail.Load() {
			return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 429, RetryAfter: 60 * time.Second}
		}
		now := clk.Now()
		return broker.Token{Value: secret, IssuedAt: now, Expiry: now.Add(100 * time.Second)}, nil
	})
	br := broker.New(broker.Options{Now: clk.Now, Sleep: func(context.Context, time.Duration) error { return nil }})
	t.Cleanup(br.Close)
	prev := current.Swap(&App{broker: br})
	t.Cleanup(func() { current.Store(prev) })
	b := brokertest.NewBinding("nuapay#t", src, broker.Request{Merchant: "acme", Organisation: "org-acme"})
	ctx := context.Background()
	if _, _, err := br.Get(ctx, b); err != nil {
		t.Fatal(err)
	}
	list := func() adminapi.TokenInfo {
		t.Helper()
		rec := httptest.NewRecorder()
		if err := serveAdmin(rec, httptest.NewRequest("GET", "/token_broker/tokens", nil)); err != nil {
			t.Fatal(err)
		}
		if strings.Contains(rec.Body.String(), secret) {
			t.Fatalf("admin output carries the token: %s", rec.Body)
		}
		var out struct{ Tokens []adminapi.TokenInfo }
		if err := json.Unmarshal(rec.Body.Bytes(), &out); err != nil || len(out.Tokens) != 1 {
			t.Fatalf("%s: %v", rec.Body, err)
		}
		return out.Tokens[0]
	}
	ti := list()
	// The refresh is planned in the window: the last quarter of the
	// token's 100 s, before its last 2.5 s.
	earliest, latest := clk.Now().Add(75*time.Second), clk.Now().Add(97500*time.Millisecond)
	if ti.Origin != broker.OriginMinted || ti.NextRefresh == nil || ti.NextRefresh.Before(earliest) || ti.NextRefresh.After(latest) ||
		ti.LastRefreshError != "" || ti.BackoffUntil != nil {
		t.Fatalf("healthy entry: %+v; want its next refresh from %s to %s", ti, earliest.UTC(), latest.UTC())
	}
	// Past the planned refresh the provider answers 429 Retry-After 60.
	fail.Store(true)
	clk.Add(98 * time.Second)
	if _, _, err := br.Get(ctx, b); err != nil {
		t.Fatal(err)
	}
	waitFor(t, func() bool { return list().LastRefreshError != "" })
	ti = list()
	until := clk.Now().Add(60 * time.Second).UTC()
	if ti.LastRefreshError != "token_rate_limited" || ti.BackoffUntil == nil || !ti.BackoffUntil.Equal(until) ||
		!ti.NextRefresh.Equal(until) || ti.Failures != 1 {
		t.Fatalf("entry after a failed refresh: %+v; want token_rate_limited, backing off until %s", ti, until)
	}
}

// TestOneAdminModule: every admin route, the consent ones included, is
// served by the one admin module admin.api.token_broker.
func TestOneAdminModule(t *testing.T) {
	var ids []string
	for _, m := range caddy.GetModules("admin.api") {
		if strings.Contains(string(m.ID), "token_broker") {
			ids = append(ids, string(m.ID))
		}
	}
	if !slices.Equal(ids, []string{"admin.api.token_broker"}) {
		t.Errorf("admin modules %v, want only admin.api.token_broker", ids)
	}
	var patterns []string
	for _, r := range (adminAPI{}).Routes() {
		patterns = append(patterns, r.Pattern)
	}
	for _, want := range []string{"/token_broker/tokens", "/token_broker/merchants/", "/token_broker/providers/",
		"/token_broker/health", "/token_broker/consent/links", "/token_broker/consent/merchants"} {
		if !slices.Contains(patterns, want) {
			t.Errorf("admin routes %v: no %s", patterns, want)
		}
	}
}
