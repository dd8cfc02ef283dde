package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// TestInputs: a registry lists the variables and files its entries read,
// a file the variables its merchants read, and Changed sees a change of
// any of them (and only then).
func TestInputs(t *testing.T) {
	dir := t.TempDir()
	certFile, keyFile, caFile := filepath.Join(dir, "qwac.pem"), filepath.Join(dir, "qwac.key"), filepath.Join(dir, "ca.pem")
	writeCert(t, certFile, keyFile)
	writeCert(t, caFile, filepath.Join(dir, "ca.key"))
	jwtKey := filepath.Join(dir, "jwt.key")
	writeCert(t, filepath.Join(dir, "jwt.pem"), jwtKey)
	secretFile := filepath.Join(dir, "api.key")
	if err := os.WriteFile(secretFile, []byte(secretValue+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	data := []byte(`[providers.tsp]
type = "nuapay"
base_url = "{env.NUAPAY_BASE_URL}"
api_key = "{file.api.key}"
  [providers.tsp.tls]
  client_cert = "qwac.pem"
  client_key = "qwac.key"
  ca_file = "ca.pem"

[providers.bank]
type = "oauth2"
token_url = "https://bank.example/token"
client_id = "broker"
private_key = "jwt.key"

[merchants.m]
provider = "tsp"
organisation = "{env.SHOP_ORG}"
scopes = ["pisp"]
`)
	path := filepath.Join(dir, "merchants.toml")
	env := map[string]string{"NUAPAY_BASE_URL": "https://nuapay.example", "SHOP_ORG": "org-shop"}
	lookup := func(k string) (string, bool) { v, ok := env[k]; return v, ok }
	reg, err := parseWith(path, data, Options{LookupEnv: lookup})
	if err != nil {
		t.Fatal(err)
	}
	names := func(in []Input) []string {
		var s []string
		for _, i := range in {
			s = append(s, i.Kind+" "+i.Name)
		}
		return s
	}
	want := []string{"env NUAPAY_BASE_URL", "env SHOP_ORG", "file " + secretFile, "file " + caFile, "file " + jwtKey, "file " + keyFile, "file " + certFile}
	slices.Sort(want)
	if got := names(reg.Inputs()); !slices.Equal(got, want) {
		t.Fatalf("registry inputs\n%q\nwant\n%q", got, want)
	}
	f := ParseFile(Source{Path: path, Data: data}, lookup)
	if got := names(f.Inputs()); !slices.Equal(got, []string{"env SHOP_ORG"}) {
		t.Fatalf("file inputs %q, want the merchant's variable only", got)
	}
	for _, in := range reg.Inputs() {
		if strings.Contains(in.sum, secretValue) || in.sum == "" {
			t.Fatalf("input %s: sum %q", in.Name, in.sum)
		}
	}
	if Changed(reg.Inputs(), lookup) {
		t.Fatal("Changed with nothing changed")
	}

	tests := []struct {
		name   string
		change func(t *testing.T) (undo func())
	}{
		{"secret file", rewrite(secretFile, "sk-rotated\n")},
		{"mTLS key", func(t *testing.T) func() {
			old := readAll(t, certFile)
			oldKey := readAll(t, keyFile)
			writeCert(t, certFile, keyFile)
			return func() { write(t, certFile, old); write(t, keyFile, oldKey) }
		}},
		{"CA file", rewrite(caFile, "")},
		{"private_key_jwt key", rewrite(jwtKey, "")},
		{"file removed", func(t *testing.T) func() {
			old := readAll(t, secretFile)
			if err := os.Remove(secretFile); err != nil {
				t.Fatal(err)
			}
			return func() { write(t, secretFile, old) }
		}},
		{"provider variable", setEnv(env, "NUAPAY_BASE_URL", "https://other.example")},
		{"merchant variable", setEnv(env, "SHOP_ORG", "org-other")},
		{"variable unset", func(*testing.T) func() {
			old := env["SHOP_ORG"]
			delete(env, "SHOP_ORG")
			return func() { env["SHOP_ORG"] = old }
		}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			undo := tt.change(t)
			if !Changed(reg.Inputs(), lookup) {
				t.Error("Changed = false after the change")
			}
			undo()
			if Changed(reg.Inputs(), lookup) {
				t.Error("Changed = true after the change was undone")
			}
		})
	}
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func write(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o600); err != nil {
		t.Fatal(err)
	}
}

// rewrite returns a change that appends content (or a newline) to a file.
func rewrite(path, content string) func(t *testing.T) func() {
	return func(t *testing.T) func() {
		old := readAll(t, path)
		if content == "" {
			content = string(old) + "\n"
		}
		write(t, path, []byte(content))
		return func() { write(t, path, old) }
	}
}

func setEnv(env map[string]string, name, value string) func(*testing.T) func() {
	return func(*testing.T) func() {
		old := env[name]
		env[name] = value
		return func() { env[name] = old }
	}
}
