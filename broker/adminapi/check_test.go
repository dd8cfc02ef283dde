package adminapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// checkRegistry is a registry of a Nuapay provider at baseURL, whose API
// key is key, with a merchant of a known organisation and one of an
// unknown one.
func checkRegistry(t *testing.T, baseURL, key string) *config.Registry {
	t.Helper()
	return checkRegistryIn(t, configtest.Reloader(t, "merchants.toml"), baseURL, key)
}

// checkRegistryIn is checkRegistry, written and loaded by load
// (configtest.Reloader): another load by it is the same registry again.
func checkRegistryIn(t *testing.T, load func([]byte, config.Options) (*config.Registry, error), baseURL, key string) *config.Registry {
	t.Helper()
	reg := fmt.Sprintf(`[providers.nuapay]
type = "nuapay"
base_url = %q
api_key = "{env.CHECK_API_KEY}"
timeout = "2s"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants.ghost]
provider = "nuapay"
organisation = "org-ghost"
scopes = ["openbanking_pisp"]
`, baseURL)
	r, err := load([]byte(reg), config.Options{LookupEnv: func(string) (string, bool) { return key, true }})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// Check answers what the provider said to one token request, in words
// that name the registry entry at fault; a second check of a refused
// credential is not sent (the source is in backoff) and says until when.
// The answer never carries the token or the API key.
func TestCheck(t *testing.T) {
	sb := httptest.NewServer(sandbox.New(sandbox.Config{APIKeys: []string{"good-key"},
		Organisations: []sandbox.Organisation{{ID: "org-acme", Name: "Acme"}}}))
	t.Cleanup(sb.Close)
	tests := []struct {
		name, key, merchant string
		checks              int // checks in a row; the last one is compared
		wantOK, wantCalled  bool
		wantOutcome         string
		wantStatus          int
		wantMessage         []string
	}{
		{name: "ok", key: "good-key", merchant: "acme", checks: 1, wantOK: true, wantCalled: true, wantOutcome: "ok",
			wantMessage: []string{"nuapay issued a token (fingerprint "}},
		{name: "wrong API key", key: "bad-key", merchant: "acme", checks: 1, wantCalled: true, wantOutcome: "token_refused", wantStatus: 401,
			wantMessage: []string{"the provider refused the credentials; check api_key of [providers.nuapay] in ", "merchants.toml:1"}},
		{name: "wrong API key, checked again", key: "bad-key", merchant: "acme", checks: 2, wantOutcome: "token_refused", wantStatus: 401,
			wantMessage: []string{"the broker does not call nuapay for this merchant before ", "it is not called for any merchant", "last answer (HTTP 401 40100)", "check api_key of [providers.nuapay]"}},
		{name: "unknown organisation", key: "good-key", merchant: "ghost", checks: 1, wantCalled: true, wantOutcome: "token_refused", wantStatus: 404,
			wantMessage: []string{`the provider does not know organisation "org-ghost"; check organisation of [merchants.ghost] in `, "merchants.toml:12"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			reg := checkRegistry(t, sb.URL, tt.key)
			br := broker.New(broker.Options{Sleep: func(context.Context, time.Duration) error { return nil }})
			t.Cleanup(br.Close)
			var res CheckResult
			var err error
			for range tt.checks {
				if res, err = Check(context.Background(), reg, br, nil, nil, nil, tt.merchant, time.Now()); err != nil {
					t.Fatal(err)
				}
			}
			out, _ := json.Marshal(res)
			if strings.Contains(string(out), tt.key) {
				t.Fatalf("the answer carries the API key: %s", out)
			}
			if res.OK != tt.wantOK || res.Called != tt.wantCalled || res.Outcome != tt.wantOutcome || res.ProviderStatus != tt.wantStatus {
				t.Fatalf("answer %s, want ok=%t called=%t outcome=%s status=%d", out, tt.wantOK, tt.wantCalled, tt.wantOutcome, tt.wantStatus)
			}
			for _, want := range tt.wantMessage {
				if !strings.Contains(res.Message, want) {
					t.Errorf("message %q does not say %q", res.Message, want)
				}
			}
			if tt.wantOK {
				es := br.Entries()
				if len(es) != 1 || es[0].Fingerprint() != res.Fingerprint || strings.Contains(string(out), es[0].Token().Value.Reveal()) ||
					res.ExpiresInSeconds <= 0 {
					t.Fatalf("the checked token is not the one cached, or is shown: %s", out)
				}
			}
			if !tt.wantCalled && (res.NotCalledUntil == nil || !res.NotCalledUntil.After(time.Now()) || res.NotCalledUntil.Location() != time.UTC) {
				t.Fatalf("a check not sent must say until when: %s", out)
			}
		})
	}
	t.Run("unknown merchant", func(t *testing.T) {
		reg := checkRegistry(t, sb.URL, "good-key")
		br := broker.New(broker.Options{})
		t.Cleanup(br.Close)
		_, err := Check(context.Background(), reg, br, nil, nil, nil, "nobody", time.Now())
		if e, ok := err.(*Error); !ok || e.Status != 404 {
			t.Fatalf("Check(nobody) = %v, want a 404 *Error", err)
		}
	})
}

// TestTokensOfAMerchantSharingAToken: a merchant served the token cached
// for another merchant of its organisation (one cache key) is shown that
// token by GET /token_broker/tokens?merchant=, the token its purge drops
// and its revocation revokes, whether the registry that has them is the
// app's or a route's own (the app's registry, at another path, has a
// provider of the same name and settings).
func TestTokensOfAMerchantSharingAToken(t *testing.T) {
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"good-key"}, Organisations: []sandbox.Organisation{{ID: "org-acme", Name: "Acme"}}})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(fmt.Sprintf(`[providers.nuapay]
type = "nuapay"
base_url = %q
api_key = "{env.CHECK_API_KEY}"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants.acme-eu]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`, srv.URL)), 0o600); err != nil {
		t.Fatal(err)
	}
	reg, err := config.LoadWith(path, config.Options{LookupEnv: func(string) (string, bool) { return "good-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		name     string
		instance func() *Instance
	}{
		{"the app's registry", func() *Instance { return &Instance{Registry: reg} }},
		{"a route's own registry", func() *Instance {
			in := &Instance{Registry: checkRegistry(t, srv.URL, "good-key"), Watched: &probe.Watched{}}
			in.Watched.Add(reg, nil)
			return in
		}},
		{"a route's own registry, the app without one", func() *Instance {
			in := &Instance{Watched: &probe.Watched{}}
			in.Watched.Add(reg, nil)
			return in
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			br := broker.New(broker.Options{})
			t.Cleanup(br.Close)
			in := tt.instance()
			in.Broker, in.Logger = br, zap.NewNop()
			fetch := func() string {
				t.Helper()
				if res, err := Check(context.Background(), reg, br, nil, nil, nil, "acme", time.Now()); err != nil || !res.OK {
					t.Fatalf("check acme: %+v, %v", res, err)
				}
				return br.Entries()[0].Token().Value.Reveal()
			}
			ask := func(method, path string) string {
				t.Helper()
				rec := httptest.NewRecorder()
				if err := Serve(rec, httptest.NewRequest(method, path, nil), in); err != nil {
					t.Fatalf("%s %s: %v", method, path, err)
				}
				return rec.Body.String()
			}
			fetch()
			var list struct{ Tokens []TokenInfo }
			if body := ask(http.MethodGet, "/token_broker/tokens?merchant=acme-eu"); json.Unmarshal([]byte(body), &list) != nil || len(list.Tokens) != 1 {
				t.Errorf("tokens of acme-eu: %s, want the one token it is served", body)
			}
			if body := ask(http.MethodPost, "/token_broker/merchants/acme-eu/purge"); !strings.Contains(body, `"purged":1`) {
				t.Errorf("purge of acme-eu: %s, want its token purged", body)
			}
			br.PurgeMatching(func(*broker.Binding) bool { return true })
			tok := fetch()
			body := ask(http.MethodPost, "/token_broker/merchants/acme-eu/revoke")
			if _, _, valid := sb.Issued(tok); valid || !strings.Contains(body, `"revoked":true`) {
				t.Errorf("revocation of acme-eu: %s, want its token revoked", body)
			}
		})
	}
}

// TestRevokeOutlivesItsRequest: the revocations of a merchant's tokens,
// dropped from the cache first, are made whether or not the admin
// request that asked for them is still there: a token forgotten but not
// revoked would stay valid at the provider.
func TestRevokeOutlivesItsRequest(t *testing.T) {
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"good-key"}, Organisations: []sandbox.Organisation{{ID: "org-acme", Name: "Acme"}}})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	reg := checkRegistry(t, srv.URL, "good-key")
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	if res, err := Check(context.Background(), reg, br, nil, nil, nil, "acme", time.Now()); err != nil || !res.OK {
		t.Fatalf("check acme: %+v, %v", res, err)
	}
	tok := br.Entries()[0].Token().Value.Reveal()
	ctx, cancel := context.WithCancel(context.Background())
	cancel() // the admin client went away
	req := httptest.NewRequestWithContext(ctx, http.MethodPost, "/token_broker/merchants/acme/revoke", nil)
	if err := Serve(httptest.NewRecorder(), req, &Instance{Registry: reg, Broker: br, Logger: zap.NewNop()}); err != nil {
		t.Fatal(err)
	}
	if len(br.Entries()) != 0 {
		t.Fatal("the token is still cached")
	}
	if _, _, valid := sb.Issued(tok); valid {
		t.Fatal("the token dropped from the cache was not revoked at the provider")
	}
}

// TestRevokeWithRotatedKey: a token fetched with a partner API key that a
// reload then rotated (Gatekeeper now refuses the old key) is revoked by
// the admin API with the key of the registry loaded now: the app's, or
// the handler's own that fetched it, never the app's registry of another
// partner with a provider of the same name and settings.
func TestRevokeWithRotatedKey(t *testing.T) {
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"old-key", "new-key"}, Organisations: []sandbox.Organisation{{ID: "org-acme", Name: "Acme"}}})
	var rotated atomic.Bool
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if key, _, _ := r.BasicAuth(); rotated.Load() && key == "old-key" {
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		sb.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	for _, tt := range []struct {
		name string
		// instance is the running app, with reg the registry that
		// fetched the token, loaded again with the new key.
		instance func(reg *config.Registry) *Instance
	}{
		{"the app's registry", func(reg *config.Registry) *Instance { return &Instance{Registry: reg} }},
		{"a handler's own registry", func(reg *config.Registry) *Instance {
			in := &Instance{Registry: checkRegistry(t, srv.URL, "another-partner-key"), Watched: &probe.Watched{}}
			in.Watched.Add(reg, nil)
			return in
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			rotated.Store(false)
			br := broker.New(broker.Options{})
			t.Cleanup(br.Close)
			load := configtest.Reloader(t, "merchants.toml")
			if res, err := Check(context.Background(), checkRegistryIn(t, load, srv.URL, "old-key"), br, nil, nil, nil, "acme", time.Now()); err != nil || !res.OK {
				t.Fatalf("check acme: %+v, %v", res, err)
			}
			tok := br.Entries()[0].Token().Value.Reveal()
			rotated.Store(true)
			in := tt.instance(checkRegistryIn(t, load, srv.URL, "new-key"))
			in.Broker, in.Logger = br, zap.NewNop()
			rec := httptest.NewRecorder()
			if err := Serve(rec, httptest.NewRequest(http.MethodPost, "/token_broker/merchants/acme/revoke", nil), in); err != nil {
				t.Fatal(err)
			}
			if _, _, valid := sb.Issued(tok); valid || !strings.Contains(rec.Body.String(), `"revoked":true`) {
				t.Fatalf("revoke after the rotation: %s; want the token revoked with the new key", rec.Body)
			}
		})
	}
}
