package httpclient

import (
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
)

// TestLimitBody: a body of MaxResponseBytes is read whole; one byte more
// fails with a *TooLargeError naming the host and the answer's status,
// not an early end.
func TestLimitBody(t *testing.T) {
	for _, tc := range []struct {
		name     string
		size     int
		status   int
		tooLarge bool
	}{
		{"empty", 0, 200, false},
		{"at the limit", MaxResponseBytes, 200, false},
		{"one byte over", MaxResponseBytes + 1, 200, true},
		{"far over", 3 * MaxResponseBytes, 200, true},
		{"503 over", MaxResponseBytes + 1, 503, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				w.WriteHeader(tc.status)
				fmt.Fprint(w, strings.Repeat("x", tc.size))
			}))
			defer srv.Close()
			client := &http.Client{Transport: LimitBody(nil)}
			resp, err := client.Get(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, err := io.ReadAll(resp.Body)
			var tl *TooLargeError
			switch {
			case !tc.tooLarge && (err != nil || len(body) != tc.size):
				t.Errorf("read %d bytes, %v; want %d", len(body), err, tc.size)
			case tc.tooLarge && (!errors.As(err, &tl) || tl.Host != Host(srv.URL) || tl.Status != tc.status || len(body) != MaxResponseBytes):
				t.Errorf("read %d bytes, %v; want %d and a *TooLargeError for %s, status %d", len(body), err, MaxResponseBytes, Host(srv.URL), tc.status)
			case tc.tooLarge && !strings.Contains(err.Error(), fmt.Sprintf("(status %d)", tc.status)):
				t.Errorf("%q does not say the status %d", err, tc.status)
			}
			if _, err := resp.Body.Read(make([]byte, 8)); tc.tooLarge && !errors.As(err, &tl) {
				t.Errorf("a read after the limit: %v, want a *TooLargeError", err)
			}
		})
	}
}

// TestReadBodyThroughLimitBody: ReadBody reports a body over the limit as
// tooLarge, without an error, whether it reads it directly or through a
// client of LimitBody (whose read fails with a *TooLargeError).
func TestReadBodyThroughLimitBody(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprint(w, strings.Repeat("x", MaxResponseBytes+1))
	}))
	defer srv.Close()
	for _, tc := range []struct {
		name string
		rt   http.RoundTripper
	}{
		{"plain client", http.DefaultTransport},
		{"LimitBody client", LimitBody(nil)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			resp, err := (&http.Client{Transport: tc.rt}).Get(srv.URL)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			body, tooLarge, err := ReadBody(resp.Body)
			if !tooLarge || err != nil || body != nil {
				t.Errorf("ReadBody: %d bytes, tooLarge %v, err %v; want no body, tooLarge, no error", len(body), tooLarge, err)
			}
		})
	}
}
