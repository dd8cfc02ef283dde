package config

import (
	"path/filepath"
	"strings"
	"testing"
)

// TestKeyMaterialNeverInErrors checks that a private key written where a
// key file's path belongs (private_key, tls.client_key, dpop.key), inline
// or through an {env.NAME} reference, or left unquoted, is refused without
// showing any of it, in one problem.
func TestKeyMaterialNeverInErrors(t *testing.T) {
	const body = "MIGHAgEAMBMGByqGSM49AgEGCCqGSM49AwEHBG0wawIBAQQgKEYMATERIAL"
	const pemKey = "-----BEGIN PRIVATE KEY-----\n" + body + "\n-----END PRIVATE KEY-----\n"
	const bank = "[providers.p]\ntype = \"oauth2\"\ntoken_url = \"https://as.example/token\"\nclient_id = \"c\"\n"
	const nuapay = "[providers.p]\ntype = \"nuapay\"\nbase_url = \"https://nuapay.example\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n"
	const merchant = "[merchants.acme]\nprovider = \"p\"\norganisation = \"org-acme\"\nscopes = [\"s\"]\n"
	jwt := bank + "auth_method = \"private_key_jwt\"\n"
	dpopTable := bank + "client_secret = \"{env.NUAPAY_API_KEY}\"\n[providers.p.dpop]\n"
	tlsTable := nuapay + "[providers.p.tls]\nclient_cert = \"cert.pem\"\n"
	for _, tc := range []struct{ name, toml, field string }{
		{"private_key inline", jwt + "private_key = \"\"\"" + pemKey + "\"\"\"\n" + merchant, "private_key"},
		{"private_key from env", jwt + "private_key = \"{env.PEM_KEY}\"\n" + merchant, "private_key"},
		{"private_key unquoted", jwt + "private_key = " + body + "\n" + merchant, ""},
		{"tls.client_key inline", tlsTable + "client_key = \"\"\"" + pemKey + "\"\"\"\n" + merchant, "tls.client_key"},
		{"tls.client_key from env", tlsTable + "client_key = \"{env.PEM_KEY}\"\n" + merchant, "tls.client_key"},
		{"tls.client_key unquoted", tlsTable + "client_key = " + body + "\n" + merchant, ""},
		{"dpop.key from env in a path", dpopTable + "key = \"{env.PEM_KEY}{env.SHOP_ORG}\"\n" + merchant, "dpop.key"},
		{"dpop.key unquoted", dpopTable + "key = " + body + "\n" + merchant, ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg, err := parse(filepath.Join(t.TempDir(), "merchants.toml"), []byte(tc.toml), testEnv("PEM_KEY", pemKey))
			if err == nil || reg != nil {
				t.Fatalf("Parse = %v, %v; want an error", reg, err)
			}
			if strings.Contains(err.Error(), body[:12]) {
				t.Fatalf("the error shows the private key:\n%v", err)
			}
			if n := strings.Count(err.Error(), "field "+tc.field+": "); tc.field != "" && n != 1 {
				t.Errorf("%d problems with field %s, want 1:\n%v", n, tc.field, err)
			}
		})
	}
}
