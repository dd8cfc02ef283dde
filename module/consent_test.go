package module

import (
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestConsentCaddyfile: the directive's syntax; mistakes are errors.
func TestConsentCaddyfile(t *testing.T) {
	rows := []struct {
		in      string
		want    Consent
		wantErr bool
	}{
		{"token_broker_consent bank", Consent{Provider: "bank"}, false},
		{"token_broker_consent bank {\n links\n}", Consent{Provider: "bank", Links: true}, false},
		{"token_broker_consent {\n links\n}", Consent{Links: true}, false},
		{"token_broker_consent", Consent{}, true},
		{"token_broker_consent {\n}", Consent{}, true},
		{"token_broker_consent bank other", Consent{}, true},
		{"token_broker_consent bank {\n links\n links\n}", Consent{}, true},
		{"token_broker_consent bank {\n links yes\n}", Consent{}, true},
		{"token_broker_consent bank {\n start\n}", Consent{}, true},
		{"token_broker_consent bank {\n partner \"Acme Payments\"\n logo /brand/logo.svg\n accent \"#0b6e4f\"\n lang de\n templates /etc/caddy/consent\n}",
			Consent{Provider: "bank", Partner: "Acme Payments", Logo: "/brand/logo.svg", Accent: "#0b6e4f", Lang: "de", Templates: "/etc/caddy/consent"}, false},
		{"token_broker_consent bank {\n partner Acme Payments\n}", Consent{}, true},
		{"token_broker_consent bank {\n partner\n}", Consent{}, true},
		{"token_broker_consent bank {\n accent #0b6e4f\n}", Consent{}, true}, // # starts a comment: no value
		{"token_broker_consent bank {\n lang de\n lang fr\n}", Consent{}, true},
	}
	for _, tc := range rows {
		var c Consent
		err := c.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tc.in))
		if (err != nil) != tc.wantErr || err == nil && c != tc.want {
			t.Errorf("%q: %+v, %v", tc.in, c, err)
		}
	}
}
