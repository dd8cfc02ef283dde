package config

import (
	"encoding/base64"
	"path/filepath"
	"strings"
	"testing"
)

// TestKeyMaterialNeverInErrors checks that a private key written where a
// key file's path belongs (private_key, tls.client_key, dpop.key), inline
// or through an {env.NAME} reference, or left unquoted, in PEM or in base64
// (as a Kubernetes secret holds it), is refused without showing any of it,
// in one problem; a reference is named by its variable.
func TestKeyMaterialNeverInErrors(t *testing.T) {
	const body = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKEYMATERIAL"
	const pemKey = "-----BEGIN PRIVATE KEY-----\n" + body + "\n-----END PRIVATE KEY-----\n"
	const bank = "[providers.p]\ntype = \"oauth2\"\ntoken_url = \"https://as.example/token\"\nclient_id = \"c\"\n"
	const nuapay = "[providers.p]\ntype = \"nuapay\"\nbase_url = \"https://nuapay.example\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n"
	const merchant = "[merchants.acme]\nprovider = \"p\"\norganisation = \"org-acme\"\nscopes = [\"s\"]\n"
	jwt := bank + "auth_method = \"private_key_jwt\"\n"
	dpopTable := bank + "client_secret = \"{env.NUAPAY_API_KEY}\"\n[providers.p.dpop]\n"
	tlsTable := nuapay + "[providers.p.tls]\nclient_cert = \"cert.pem\"\n"
	b64 := base64.StdEncoding.EncodeToString([]byte(pemKey))
	for _, tc := range []struct{ name, toml, field string }{
		{"private_key inline", jwt + "private_key = \"\"\"" + pemKey + "\"\"\"\n" + merchant, "private_key"},
		{"private_key from env", jwt + "private_key = \"{env.PEM_KEY}\"\n" + merchant, "private_key"},
		{"private_key unquoted", jwt + "private_key = " + body + "\n" + merchant, ""},
		{"tls.client_key inline", tlsTable + "client_key = \"\"\"" + pemKey + "\"\"\"\n" + merchant, "tls.client_key"},
		{"tls.client_key from env", tlsTable + "client_key = \"{env.PEM_KEY}\"\n" + merchant, "tls.client_key"},
		{"tls.client_key unquoted", tlsTable + "client_key = " + body + "\n" + merchant, ""},
		{"dpop.key from env in a path", dpopTable + "key = \"{env.PEM_KEY}{env.SHOP_ORG}\"\n" + merchant, "dpop.key"},
		{"dpop.key unquoted", dpopTable + "key = " + body + "\n" + merchant, ""},
		{"private_key in base64", jwt + "private_key = \"" + b64 + "\"\n" + merchant, "private_key"},
		{"private_key in base64 from env", jwt + "private_key = \"{env.PEM_B64}\"\n" + merchant, "private_key"},
		{"tls.client_key in base64", tlsTable + "client_key = \"" + b64 + "\"\n" + merchant, "tls.client_key"},
		{"tls.client_key in base64 from env", tlsTable + "client_key = \"{env.PEM_B64}\"\n" + merchant, "tls.client_key"},
		{"dpop.key in base64", dpopTable + "key = \"" + b64 + "\"\n" + merchant, "dpop.key"},
		{"dpop.key in base64 from env in a path", dpopTable + "key = \"{env.PEM_B64}{env.SHOP_ORG}\"\n" + merchant, "dpop.key"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg, err := parse(filepath.Join(t.TempDir(), "merchants.toml"), []byte(tc.toml), testEnv("PEM_KEY", pemKey, "PEM_B64", b64))
			if err == nil || reg != nil {
				t.Fatalf("Parse = %v, %v; want an error", reg, err)
			}
			for _, key := range []string{body[:12], b64[:12], b64[len(b64)/2 : len(b64)/2+12]} {
				if strings.Contains(err.Error(), key) {
					t.Fatalf("the error shows the private key:\n%v", err)
				}
			}
			if strings.Contains(tc.toml, "{env.PEM_B64}") && !strings.Contains(err.Error(), "{env.PEM_B64}") {
				t.Errorf("the error does not name the variable PEM_B64:\n%v", err)
			}
			if n := strings.Count(err.Error(), "field "+tc.field+": "); tc.field != "" && n != 1 {
				t.Errorf("%d problems with field %s, want 1:\n%v", n, tc.field, err)
			}
		})
	}
}

// TestShownPath checks which values of a PEM field messages name.
func TestShownPath(t *testing.T) {
	const hidden = "the file it names (not shown: it may be key material)"
	for _, tc := range []struct{ raw, want string }{
		{"keys/bank.key", "/r/keys/bank.key"},
		{"/etc/broker/private_key", "/etc/broker/private_key"},
		{"{env.BANK_KEY}", "{env.BANK_KEY}"},
		{"{env.KEY_DIR}/bank.key", "{env.KEY_DIR}/bank.key"},
		{"bankkey", hidden},                       // no separator, no dot
		{"/etc/ssl/key", hidden},                  // valid base64
		{"a/" + strings.Repeat("b", 127), hidden}, // too long
		{"{env.KEY_DIR}" + strings.Repeat("Q", 16), hidden},
	} {
		path := tc.raw
		if !strings.HasPrefix(path, "/") {
			path = "/r/" + path
		}
		if got := shownPath(tc.raw, path); got != tc.want {
			t.Errorf("shownPath(%q) = %q, want %q", tc.raw, got, tc.want)
		}
	}
}
