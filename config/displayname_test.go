package config

import (
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// TestDisplayNames: display_name on merchants and on consent tables is
// read for the consent pages, strictly checked, and keeps merchants of
// equal terms apart only by their names.
func TestDisplayNames(t *testing.T) {
	opts := Options{LookupEnv: testEnv(), RefreshStore: &oauth.MemoryStore{}, ConsentStore: &oauth.MemoryPendingStore{}}
	src := strings.Replace(consentProvider, "  par = true\n", "  par = true\n  display_name = \"Example Bank\"\n", 1) + `display_name = "Acme Ltd"

[merchants.globex]
provider = "bank"
display_name = "Globex Corporation"

[merchants.initech]
provider = "bank"
`
	reg, err := parseWith("m.toml", []byte(src), opts)
	if err != nil {
		t.Fatal(err)
	}
	if got := reg.Providers["bank"].DisplayName; got != "Example Bank" {
		t.Errorf("provider display name %q", got)
	}
	for id, want := range map[string]string{"acme": "Acme Ltd", "globex": "Globex Corporation", "initech": ""} {
		if m, _, ok := reg.Merchant(id); !ok || m.DisplayName != want {
			t.Errorf("merchant %s display name %q, want %q", id, m.DisplayName, want)
		}
	}

	for _, tc := range []struct{ name, old, new, want string }{
		{"merchant control character", `display_name = "Acme Ltd"`, `display_name = "Acme\u0007Ltd"`, `merchant "acme": field display_name`},
		{"merchant surrounding space", `display_name = "Acme Ltd"`, `display_name = " Acme Ltd"`, `merchant "acme": field display_name`},
		{"merchant too long", `display_name = "Acme Ltd"`, `display_name = "` + strings.Repeat("a", 101) + `"`, `merchant "acme": field display_name`},
		{"merchant not a string", `display_name = "Acme Ltd"`, `display_name = 5`, "display_name"},
		{"provider control character", `display_name = "Example Bank"`, `display_name = "Example\nBank"`, "consent.display_name"},
		{"on the wildcard", `[merchants.initech]`, "[merchants.\"*\"]\nprovider = \"bank\"\ndisplay_name = \"Every shop\"\n\n[merchants.initech]", "not on the wildcard entry"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parseWith("m.toml", []byte(strings.Replace(src, tc.old, tc.new, 1)), opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) || !strings.Contains(err.Error(), "m.toml") {
				t.Fatalf("err = %v, want one naming m.toml and %q", err, tc.want)
			}
		})
	}
}
