package httpclient

import "testing"

// TestEndpoint: a URL for a message keeps its scheme, host and path and
// drops its user info, query and fragment; what is not a URL with a host
// is "".
func TestEndpoint(t *testing.T) {
	for _, tt := range []struct{ in, want string }{
		{"https://bank.example/oauth2/token", "https://bank.example/oauth2/token"},
		{"https://bank.example:8443/token?tenant=t-1&key=k", "https://bank.example:8443/token"},
		{"https://user:pass@bank.example/token#frag", "https://bank.example/token"},
		{"https://bank.example/a%2Fb/token", "https://bank.example/a%2Fb/token"},
		{"/token?x=1", ""},
		{"::not a url", ""},
	} {
		if got := Endpoint(tt.in); got != tt.want {
			t.Errorf("Endpoint(%q) = %q, want %q", tt.in, got, tt.want)
		}
	}
}
