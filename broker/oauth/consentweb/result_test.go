package consentweb

import (
	"context"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentpage"
)

// TestResultPage: …/done shows a stored result; a result that is not
// stored, was never a result id, or has expired is gone (410); a consent
// store that cannot be read answers 503 with Retry-After and a page that
// asks to reload, never the store's error and never "gone" (the result
// may well be there once the store is back).
func TestResultPage(t *testing.T) {
	ctx := context.Background()
	now := time.Date(2026, 12, 7, 12, 0, 0, 0, time.UTC)
	up := newConsentSite(t, "https://bank.invalid/token", &oauth.MemoryPendingStore{}, &oauth.MemoryStore{}, "acme")
	up.web.o.Results.Now = func() time.Time { return now }
	old, err := up.web.o.Results.Save(ctx, consentpage.Result{MerchantID: "acme", Outcome: "ok"})
	if err != nil {
		t.Fatal(err)
	}
	now = now.Add(consentpage.ResultTTL) // old has expired
	id, err := up.web.o.Results.Save(ctx, consentpage.Result{MerchantID: "acme", Outcome: "ok"})
	if err != nil {
		t.Fatal(err)
	}

	// A consent store that cannot be read: Caddy's file storage whose
	// directory is a file; the error names the path, with a "secret" in it.
	notDir := filepath.Join(t.TempDir(), "store-password-SECRET")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	down := newConsentSite(t, "https://bank.invalid/token", kvstore.Pending{S: &certmagic.FileStorage{Path: notDir}}, &oauth.MemoryStore{}, "acme")

	for _, tt := range []struct {
		name       string
		site       consentSite
		result     string
		status     int
		want       string
		retryAfter string
	}{
		{"stored", up, id, http.StatusOK, "Consent given", ""},
		{"expired", up, old, http.StatusGone, "This page is no longer available", ""},
		{"never stored", up, strings.Repeat("A", 43), http.StatusGone, "This page is no longer available", ""},
		{"no result", up, "", http.StatusGone, "This page is no longer available", ""},
		{"too long", up, strings.Repeat("A", 100), http.StatusGone, "This page is no longer available", ""},
		{"store down", down, id, http.StatusServiceUnavailable, "Please reload this page in a moment", "30"},
		{"store down, too long", down, strings.Repeat("A", 100), http.StatusGone, "This page is no longer available", ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			w := tt.site.get("https://cb.partner.example/consent/done?result=" + tt.result)
			body := w.Body.String()
			if w.Code != tt.status || !strings.Contains(body, tt.want) || w.Header().Get("Retry-After") != tt.retryAfter {
				t.Fatalf("%d, Retry-After %q: %.600s; want %d, Retry-After %q, with %q", w.Code, w.Header().Get("Retry-After"), body, tt.status, tt.retryAfter, tt.want)
			}
			if strings.Contains(body, "SECRET") || strings.Contains(body, "not a directory") {
				t.Fatalf("the page shows the store's error: %.600s", body)
			}
		})
	}
}

// TestResultPageBrowserLeft: a result read that fails because the browser
// left is neither logged as a storage failure nor answered.
func TestResultPageBrowserLeft(t *testing.T) {
	// The read fails (Caddy's file storage whose directory is a file), as
	// a store's read fails when the request's context ends.
	notDir := filepath.Join(t.TempDir(), "store")
	if err := os.WriteFile(notDir, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.DebugLevel)
	site := newConsentSite(t, "https://bank.invalid/token", kvstore.Pending{S: &certmagic.FileStorage{Path: notDir}}, &oauth.MemoryStore{}, "acme")
	site.web.o.Logger = zap.New(core)
	id := strings.Repeat("A", 43)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := httptest.NewRequestWithContext(ctx, http.MethodGet, "https://cb.partner.example/consent/done?result="+id, nil)
	w := httptest.NewRecorder()
	site.web.ServeHTTP(w, r)
	if w.Body.Len() != 0 || logs.Len() != 0 {
		t.Fatalf("answered %d %.200q and logged %d entries; want neither", w.Code, w.Body.String(), logs.Len())
	}
}
