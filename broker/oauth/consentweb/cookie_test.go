package consentweb

import (
	"crypto/tls"
	"net/http/httptest"
	"testing"
)

// TestBrowserCookie: the consent cookie is __Host- prefixed and Secure
// except on plain HTTP to a loopback host.
func TestBrowserCookie(t *testing.T) {
	rows := []struct {
		host   string
		tls    bool
		name   string
		secure bool
	}{
		{"callback.partner.example", true, "__Host-token_broker_consent", true},
		{"callback.partner.example", false, "__Host-token_broker_consent", true}, // TLS ends at a proxy in front
		{"127.0.0.1:8081", false, "token_broker_consent", false},
		{"127.0.0.2", false, "token_broker_consent", false},
		{"localhost:8081", false, "token_broker_consent", false},
		{"LOCALHOST.", false, "token_broker_consent", false},
		{"[::1]:8081", false, "token_broker_consent", false},
		{"localhost:8443", true, "__Host-token_broker_consent", true},
		{"localhost.evil.example", false, "__Host-token_broker_consent", true},
		{"10.0.0.1", false, "__Host-token_broker_consent", true},
	}
	for _, tc := range rows {
		r := httptest.NewRequest("GET", "/consent/start", nil)
		r.Host = tc.host
		if tc.tls {
			r.TLS = &tls.ConnectionState{}
		}
		if name, secure := browserCookie(r); name != tc.name || secure != tc.secure {
			t.Errorf("%s (TLS %v): %s secure %v, want %s %v", tc.host, tc.tls, name, secure, tc.name, tc.secure)
		}
	}
}
