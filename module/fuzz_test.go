package module

import (
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
)

// FuzzMerchantSelector: whatever the merchant header holds, the selector
// either refuses it with 400 or returns an id that is safe to use as a map
// key, a log field and a path segment: printable ASCII without separators.
func FuzzMerchantSelector(f *testing.F) {
	for _, s := range []string{"acme", "", "a/b", "../x", "ac\r\nme", "аcme", "a%2Fb", strings.Repeat("z", 129), "m:1@x.y_z-"} {
		f.Add(s, false)
	}
	f.Add("acme", true)
	h := &Handler{Merchant: DefaultMerchant, merchant: defaultSelector()}
	f.Fuzz(func(t *testing.T, value string, twice bool) {
		req := httptest.NewRequest("GET", "/", nil)
		req.Header["X-Merchant-Id"] = []string{value}
		if twice {
			req.Header["X-Merchant-Id"] = append(req.Header["X-Merchant-Id"], value)
		}
		m, code := h.merchant.Merchant(req.Header, caddy.NewReplacer())
		if code != 0 {
			if code.Status() != 400 || m != "" {
				t.Fatalf("refusal %d %q %q", code.Status(), code, m)
			}
			return
		}
		if twice || m != value || len(m) == 0 || len(m) > 128 {
			t.Fatalf("accepted %q from %q (twice=%v)", m, value, twice)
		}
		for _, c := range []byte(m) {
			if c <= ' ' || c >= 0x7f || strings.IndexByte(`/\%?#"'<>`, c) >= 0 {
				t.Fatalf("accepted %q with byte %q", m, c)
			}
		}
	})
}
