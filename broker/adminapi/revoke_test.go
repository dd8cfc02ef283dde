package adminapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"sync/atomic"
	"testing"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

// TestRevokeStopsAtAProvider429: the admin revocation of a merchant's
// tokens at three providers, each the Nuapay sandbox, but that a answers
// the revocations 429 (with or without Retry-After) and b 503. a gets
// one revocation: that token and a's others are reported not revoked,
// the others as not attempted, with the Retry-After in seconds, and stay
// cached and valid, so that the operator's revocation once a answers
// again revokes them. b's answers are reported per token, each sent; c's
// tokens are revoked; b's and c's are dropped. The token requests'
// failure policy is not told of a's 429.
func TestRevokeStopsAtAProvider429(t *testing.T) {
	const perProvider = 3
	for _, tc := range []struct {
		name       string
		retryAfter string // a's 429's Retry-After, "" for none
		seconds    int    // retry_after_seconds of a's tokens
	}{
		{name: "429 with Retry-After", retryAfter: "30", seconds: 30},
		{name: "429 without Retry-After"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var throttled atomic.Bool
			throttled.Store(true)
			var mu sync.Mutex
			sent := map[string]int{}
			sb := sandbox.New(sandbox.Config{APIKeys: []string{"partner-key"}, Organisations: []sandbox.Organisation{{ID: "org-acme", Name: "Acme"}}})
			gk := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				provider, _, _ := strings.Cut(strings.TrimPrefix(r.URL.Path, "/"), "/")
				if strings.HasSuffix(r.URL.Path, "/revoke") {
					mu.Lock()
					sent[provider]++
					mu.Unlock()
					switch {
					case provider == "a" && throttled.Load():
						if tc.retryAfter != "" {
							w.Header().Set("Retry-After", tc.retryAfter)
						}
						w.WriteHeader(http.StatusTooManyRequests)
						return
					case provider == "b":
						w.WriteHeader(http.StatusServiceUnavailable)
						return
					}
				}
				http.StripPrefix("/"+provider, sb).ServeHTTP(w, r)
			}))
			t.Cleanup(gk.Close)
			br := broker.New(broker.Options{MaxAttempts: 1})
			t.Cleanup(br.Close)
			issued := map[string][]string{} // the tokens per provider
			for _, p := range []string{"a", "b", "c"} {
				src, err := nuapay.New(nuapay.Config{BaseURL: gk.URL + "/" + p, APIKey: "partner-key"})
				if err != nil {
					t.Fatal(err)
				}
				for i := range perProvider {
					b := brokertest.NewBinding(p, src, broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{fmt.Sprint("s", i)}})
					e, _, err := br.Get(context.Background(), b)
					if err != nil {
						t.Fatal(err)
					}
					issued[p] = append(issued[p], e.Token().Value.Reveal())
				}
			}
			revoke := func() (map[string][]map[string]any, string) {
				t.Helper()
				rec := httptest.NewRecorder()
				if err := Serve(rec, httptest.NewRequest(http.MethodPost, "/token_broker/merchants/acme/revoke", nil), &Instance{Broker: br, Logger: zap.NewNop()}); err != nil {
					t.Fatal(err)
				}
				var body struct{ Results []map[string]any }
				if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil {
					t.Fatal(err)
				}
				byProvider := map[string][]map[string]any{}
				for _, r := range body.Results {
					byProvider[r["source"].(string)] = append(byProvider[r["source"].(string)], r)
				}
				return byProvider, rec.Body.String()
			}
			results, body := revoke()
			if strings.Contains(body, "tok-") {
				t.Fatalf("the answer carries a token: %s", body)
			}
			mu.Lock()
			if sent["a"] != 1 || sent["b"] != perProvider || sent["c"] != perProvider {
				t.Errorf("revocations sent %v, want a 1, b and c %d", sent, perProvider)
			}
			mu.Unlock()
			notAttempted := 0
			for _, r := range results["a"] {
				seconds, _ := r["retry_after_seconds"].(float64)
				if r["revoked"] != false || int(seconds) != tc.seconds || r["error"] == nil {
					t.Errorf("a's result %v, want not revoked, with its reason and retry_after_seconds %d", r, tc.seconds)
				}
				if r["not_attempted"] == true {
					notAttempted++
				}
			}
			if len(results["a"]) != perProvider || notAttempted != perProvider-1 {
				t.Errorf("a's results %v, want %d, all but the first not attempted", results["a"], perProvider)
			}
			for _, r := range results["b"] {
				if r["revoked"] != false || !strings.Contains(r["error"].(string), "503") || r["not_attempted"] != nil {
					t.Errorf("b's result %v, want its 503, attempted", r)
				}
			}
			for _, r := range results["c"] {
				if r["revoked"] != true {
					t.Errorf("c's result %v, want revoked", r)
				}
			}
			for p, toks := range issued {
				for _, tok := range toks {
					if _, _, valid := sb.Issued(tok); valid != (p != "c") {
						t.Errorf("a token of %s valid at the provider: %v, want only c's revoked", p, valid)
					}
				}
			}
			cached := map[string]int{}
			for _, e := range br.Entries() {
				cached[e.Binding().SourceID]++
			}
			if cached["a"] != perProvider || len(cached) != 1 {
				t.Errorf("cached after the revocation: %v, want a's %d tokens only", cached, perProvider)
			}
			if h := br.SourceHealth("a"); !h.BackoffUntil.IsZero() {
				t.Errorf("a's token requests held after its revocation's 429: %+v", h)
			}

			throttled.Store(false)
			results, _ = revoke()
			if len(results) != 1 || len(results["a"]) != perProvider {
				t.Fatalf("the operator's revocation again: %v, want a's %d tokens", results, perProvider)
			}
			for _, r := range results["a"] {
				if r["revoked"] != true {
					t.Errorf("a's result once it answers again %v, want revoked", r)
				}
			}
			for _, tok := range issued["a"] {
				if _, _, valid := sb.Issued(tok); valid {
					t.Error("a token of a still valid at the provider once revoked again")
				}
			}
			if len(br.Entries()) != 0 {
				t.Errorf("%d tokens cached after they were revoked", len(br.Entries()))
			}
		})
	}
}
