package probe

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/listing"
)

// TestWrite: 200 when the asked state holds, else 503; HEAD gets no body.
func TestWrite(t *testing.T) {
	tests := []struct {
		name       string
		h          Health
		live       bool
		method     string
		wantStatus int
		wantBody   bool
	}{
		{"ready", Health{Ready: true, Live: true}, false, http.MethodGet, http.StatusOK, true},
		{"not ready", Health{Live: true}, false, http.MethodGet, http.StatusServiceUnavailable, true},
		{"live but not ready", Health{Live: true}, true, http.MethodGet, http.StatusOK, true},
		{"not running", NotRunning(), true, http.MethodGet, http.StatusServiceUnavailable, true},
		{"head", Health{Ready: true, Live: true}, false, http.MethodHead, http.StatusOK, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			rec := httptest.NewRecorder()
			Write(rec, httptest.NewRequest(tt.method, "/ready", nil), tt.h, tt.live)
			if rec.Code != tt.wantStatus || (rec.Body.Len() > 0) != tt.wantBody || rec.Header().Get("Cache-Control") != "no-store" {
				t.Errorf("status %d body %q, want %d body %v", rec.Code, rec.Body, tt.wantStatus, tt.wantBody)
			}
		})
	}
}

// TestListingCheck: a list read once passes; one never read fails with
// its last read's error.
func TestListingCheck(t *testing.T) {
	at := time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)
	tests := []struct {
		name   string
		l      Listing
		wantOK bool
		want   string
	}{
		{"read", Listing{Provider: "np", Status: listing.Status{Read: true, Organisations: 3, ReadAt: at}}, true, `provider "np" lists 3 organisations (read at 2026-01-02T03:04:05Z)`},
		{"never read", Listing{Provider: "np"}, false, "were never read, so its wildcard merchants are refused"},
		{"failed", Listing{Provider: "np", Status: listing.Status{FailedAt: at, Err: errors.New("down")}}, false, "the last read, at 2026-01-02T03:04:05Z, failed: down"},
	}
	for _, tt := range tests {
		c := listingCheck(&tt.l)
		if c.OK != tt.wantOK || !strings.Contains(c.Detail, tt.want) {
			t.Errorf("%s: %+v, want ok %v and %q", tt.name, c, tt.wantOK, tt.want)
		}
	}
}

// TestServe: a health site answers GET and HEAD /ready and /live, 404
// another path and 405 another method, each refusal with a JSON error.
func TestServe(t *testing.T) {
	ready := func() Health { return Health{Live: true} } // live, not ready
	tests := []struct {
		method, path string
		wantStatus   int
		wantError    string // the JSON error code, "" for a probe's answer
		wantAllow    string
	}{
		{http.MethodGet, "/ready", http.StatusServiceUnavailable, "", ""},
		{http.MethodGet, "/live", http.StatusOK, "", ""},
		{http.MethodHead, "/live", http.StatusOK, "", ""},
		{http.MethodGet, "/healthz", http.StatusNotFound, "not_found", ""},
		{http.MethodPost, "/ready", http.StatusMethodNotAllowed, "method_not_allowed", "GET, HEAD"},
	}
	for _, tt := range tests {
		rec := httptest.NewRecorder()
		Serve(rec, httptest.NewRequest(tt.method, tt.path, nil), ready)
		if rec.Code != tt.wantStatus || rec.Header().Get("Allow") != tt.wantAllow ||
			strings.Contains(rec.Body.String(), `"error":"`+tt.wantError+`"`) != (tt.wantError != "") {
			t.Errorf("%s %s: %d Allow %q %s, want %d Allow %q error %q", tt.method, tt.path, rec.Code, rec.Header().Get("Allow"), rec.Body,
				tt.wantStatus, tt.wantAllow, tt.wantError)
		}
	}
}
