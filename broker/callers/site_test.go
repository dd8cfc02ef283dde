package callers

import (
	"net/http"
	"net/http/httptest"
	"testing"
)

// TestSiteGuard: loopback Host names and the allowed hosts pass, any port,
// any case; other names are misdirected; a browser's request from another
// origin is refused whatever the Host.
func TestSiteGuard(t *testing.T) {
	g, err := NewSite([]string{"Sidecar.Payments.SVC.", "10.1.2.3", "[fd00::7]"})
	if err != nil {
		t.Fatal(err)
	}
	for _, tt := range []struct {
		host    string
		headers []string
		status  int
		code    string
	}{
		{"localhost:8080", nil, 0, ""},
		{"LocalHost.", nil, 0, ""},
		{"127.0.0.1", nil, 0, ""},
		{"127.8.9.10:1", nil, 0, ""},
		{"[::1]:8080", nil, 0, ""},
		{"[::1]", nil, 0, ""},
		{"", nil, 0, ""}, // HTTP/1.0: no browser
		{"sidecar.payments.svc:80", nil, 0, ""},
		{"10.1.2.3:8080", nil, 0, ""},
		{"[fd00::7]:8080", nil, 0, ""},
		{"attacker.example", nil, 421, "host_not_allowed"},
		{"localhost.attacker.example:8080", nil, 421, "host_not_allowed"},
		{"sidecar.payments.svc.attacker.example", nil, 421, "host_not_allowed"},
		{"10.1.2.4", nil, 421, "host_not_allowed"},
		{"localhost", []string{"Sec-Fetch-Site", "cross-site"}, 403, "cross_site_request"},
		{"localhost", []string{"Sec-Fetch-Site", "same-site"}, 403, "cross_site_request"},
		{"localhost", []string{"Sec-Fetch-Site", "same-origin"}, 0, ""},
		{"localhost", []string{"Sec-Fetch-Site", "none"}, 0, ""},
		{"localhost:8080", []string{"Origin", "http://localhost:8080"}, 0, ""},
		{"localhost:8080", []string{"Origin", "http://LOCALHOST:8080"}, 0, ""},
		{"localhost:8080", []string{"Origin", "http://localhost:3000"}, 403, "cross_site_request"},
		{"localhost:8080", []string{"Origin", "null"}, 403, "cross_site_request"},
		{"localhost:8080", []string{"Origin", "https://attacker.example"}, 403, "cross_site_request"},
		{"attacker.example", []string{"Sec-Fetch-Site", "same-origin"}, 421, "host_not_allowed"},
	} {
		r := httptest.NewRequest(http.MethodPost, "/", nil)
		r.Host = tt.host
		for i := 0; i+1 < len(tt.headers); i += 2 {
			r.Header.Set(tt.headers[i], tt.headers[i+1])
		}
		c, err := g.Check(r)
		status, code := c.Status(), c.String()
		if status != tt.status || code != tt.code || (status != 0) != (err != nil) {
			t.Errorf("Host %q %v: %d %q %v, want %d %q", tt.host, tt.headers, status, code, err, tt.status, tt.code)
		}
	}

	anyHost, err := NewSite([]string{"*"})
	if err != nil {
		t.Fatal(err)
	}
	r := httptest.NewRequest(http.MethodGet, "/", nil)
	r.Host = "anything.example"
	if code, _ := anyHost.Check(r); code != 0 {
		t.Errorf("allowed_hosts *: Host %q refused with %s", r.Host, code)
	}
	r.Header.Set("Sec-Fetch-Site", "cross-site")
	if code, _ := anyHost.Check(r); code.Status() != http.StatusForbidden {
		t.Errorf("allowed_hosts *: a cross-site request got %s, want 403", code)
	}

	for _, bad := range []string{"", "sidecar:8080", "http://sidecar", "side car", "a/b", "*.svc", "user@host"} {
		if _, err := NewSite([]string{bad}); err == nil {
			t.Errorf("allowed_hosts %q: accepted", bad)
		}
	}
}
