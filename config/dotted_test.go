package config

import (
	"path/filepath"
	"strings"
	"testing"
)

// A registry written with dotted keys (valid TOML: they define the tables
// implicitly), as some TOML writers emit it, loads as the same registry
// written with table headers, and its problems name their lines.
func TestDottedKeys(t *testing.T) {
	const dotted = `providers.p.type = "nuapay"
providers.p.base_url = "https://nuapay.example"
providers.p.api_key = "{env.NUAPAY_API_KEY}"
merchants.acme.provider = "p"
merchants.acme.organisation = "org-acme"
merchants.acme.scopes = ["openbanking_pisp"]
`
	reg, err := parse(filepath.Join(t.TempDir(), "merchants.toml"), []byte(dotted), testEnv())
	if err != nil {
		t.Fatal(err)
	}
	m := reg.Merchants["acme"]
	if m == nil || m.Provider != "p" || m.Organisation != "org-acme" || m.Line != 4 || reg.Providers["p"] == nil || reg.Providers["p"].Line != 1 {
		t.Fatalf("merchant %+v, providers %v; want acme of p at line 4, p at line 1", m, reg.Providers)
	}
	bad := strings.Replace(dotted, `merchants.acme.provider = "p"`, `merchants.acme.provider = "q"`, 1)
	_, err = parse(filepath.Join(t.TempDir(), "merchants.toml"), []byte(bad), testEnv())
	if err == nil || !strings.Contains(err.Error(), `merchants.toml:4: merchant "acme": field provider: unknown provider "q"`) {
		t.Fatalf("err = %v; want the unknown provider at line 4", err)
	}
}
