package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// logParses adds to cf's global options a JSON log to a file, and returns
// cf and a function that counts the registry files parsed so far, as the
// log's "merchant registry parsed" lines report them.
func logParses(t *testing.T, cf string) (string, func() int) {
	t.Helper()
	logFile := filepath.Join(t.TempDir(), "caddy.log")
	cf = strings.Replace(cf, "{\n\tadmin", "{\n\tlog {\n\t\toutput file "+logFile+"\n\t\tformat json\n\t}\n\tadmin", 1)
	return cf, func() int {
		data, err := os.ReadFile(logFile)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			var entry struct {
				Msg   string `json:"msg"`
				Files int    `json:"files_parsed"`
			}
			if json.Unmarshal(line, &entry) == nil && entry.Msg == "merchant registry parsed" {
				n += entry.Files
			}
		}
		return n
	}
}

// TestReloadLargeRegistryNoTokenRequests: with a 10 000-merchant registry
// and warm tokens, a config reload parses the registry file again 0
// times and causes 0 token requests; the wildcard entry serves ids the
// file does not list.
func TestReloadLargeRegistryNoTokenRequests(t *testing.T) {
	const n, warm = 10_000, 50
	var orgs []sandbox.Organisation
	for i := 0; i < warm; i++ {
		orgs = append(orgs, sandbox.Organisation{ID: fmt.Sprintf("org-%05d", i), Name: "m"})
	}
	orgs = append(orgs, sandbox.Organisation{ID: "WILD-1", Name: "w"})
	sb, _ := startSandbox(t, func(c *sandbox.Config) { c.Organisations = append(c.Organisations, orgs...) })
	var b strings.Builder
	b.WriteString("[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"{env.NUAPAY_API}\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n\n")
	b.WriteString("[merchants.\"*\"]\nprovider = \"nuapay\"\norganisation = \"{merchant}\"\nscopes = [\"openbanking_pisp\"]\n\n")
	for i := 0; i < n; i++ {
		fmt.Fprintf(&b, "[merchants.m%05d]\nprovider = \"nuapay\"\norganisation = \"org-%05d\"\nscopes = [\"openbanking_pisp\"]\n\n", i, i)
	}
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(b.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	cf := `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config ` + path + `
	}
}
http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	handle /tpp/accounts* {
		token_broker {
			scopes openbanking_aisp
		}
		reverse_proxy {$SANDBOX_URL}
	}
	handle {
		token_broker
		reverse_proxy {$SANDBOX_URL}
	}
}
`
	cf, registryParses := logParses(t, cf)
	base := startCaddy(t, cf)
	fingerprints := map[string]string{}
	for _, m := range []string{"m00000", "m00049", "m00007", "WILD-1"} {
		fingerprints[m] = getEcho(t, base+"/tpp/payments", "X-Merchant-Id", m).Authorization.Fingerprint
	}
	for i := 0; i < warm; i++ {
		getEcho(t, base+"/tpp/payments", "X-Merchant-Id", fmt.Sprintf("m%05d", i))
	}
	tokens, parses := sb.TokenRequests(), registryParses()
	if tokens != warm+1 {
		t.Fatalf("warm-up: %d token requests, want %d", tokens, warm+1)
	}

	loadCaddy(t, strings.Replace(cf, "bind 127.0.0.1", "bind 127.0.0.1\n\theader X-Reloaded yes", 1))
	if got := registryParses() - parses; got != 0 {
		t.Fatalf("the reload parsed the unchanged registry %d times", got)
	}
	for i := 0; i < warm; i++ {
		getEcho(t, base+"/tpp/payments", "X-Merchant-Id", fmt.Sprintf("m%05d", i))
	}
	for m, fp := range fingerprints {
		if got := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", m).Authorization.Fingerprint; got != fp {
			t.Errorf("%s: token %s after the reload, was %s", m, got, fp)
		}
	}
	if got := sb.TokenRequests() - tokens; got != 0 {
		t.Fatalf("the reload caused %d token requests, want 0", got)
	}
}

// TestReloadSplitRegistryParsesChangedFile: with a registry of 10 files of
// 1 000 merchants (the provider in its own file) and warm tokens, a
// reload after one merchants file changed parses that file only (1 parse)
// and causes 0 token requests; the changed file's edit is served.
func TestReloadSplitRegistryParsesChangedFile(t *testing.T) {
	const files, n, warm = 10, 1000, 20
	var orgs []sandbox.Organisation
	for f := range files {
		for i := range warm {
			orgs = append(orgs, sandbox.Organisation{ID: fmt.Sprintf("org-%02d-%05d", f, i), Name: "m"})
		}
	}
	orgs = append(orgs, sandbox.Organisation{ID: "org-moved", Name: "moved"})
	sb, _ := startSandbox(t, func(c *sandbox.Config) { c.Organisations = append(c.Organisations, orgs...) })
	dir := t.TempDir()
	write := func(name, content string) {
		t.Helper()
		if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	merchants := func(f int, moved string) string {
		var b strings.Builder
		for i := range n {
			org := fmt.Sprintf("org-%02d-%05d", f, i)
			if i == n-1 && moved != "" {
				org = moved
			}
			fmt.Fprintf(&b, "[merchants.m%02d-%05d]\nprovider = \"nuapay\"\norganisation = %q\nscopes = [\"openbanking_pisp\"]\n\n", f, i, org)
		}
		return b.String()
	}
	write("00-providers.toml", "[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"{env.NUAPAY_API}\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n")
	for f := range files {
		write(fmt.Sprintf("10-merchants-%02d.toml", f), merchants(f, ""))
	}
	cf := `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config ` + dir + `
	}
}
http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker
	reverse_proxy {$SANDBOX_URL}
}
`
	cf, registryParses := logParses(t, cf)
	base := startCaddy(t, cf)
	fingerprints := map[string]string{}
	for f := range files {
		for i := range warm {
			m := fmt.Sprintf("m%02d-%05d", f, i)
			fingerprints[m] = getEcho(t, base+"/tpp/payments", "X-Merchant-Id", m).Authorization.Fingerprint
		}
	}
	tokens, parses := sb.TokenRequests(), registryParses()
	if tokens != files*warm {
		t.Fatalf("warm-up: %d token requests, want %d", tokens, files*warm)
	}

	write("10-merchants-04.toml", merchants(4, "org-moved"))
	loadCaddy(t, strings.Replace(cf, "bind 127.0.0.1", "bind 127.0.0.1\n\theader X-Reloaded yes", 1))
	if got := registryParses() - parses; got != 1 {
		t.Fatalf("the reload parsed %d registry files, want 1 (the changed one)", got)
	}
	for m, fp := range fingerprints {
		if got := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", m).Authorization.Fingerprint; got != fp {
			t.Errorf("%s: token %s after the reload, was %s", m, got, fp)
		}
	}
	if got := sb.TokenRequests() - tokens; got != 0 {
		t.Fatalf("the reload caused %d token requests, want 0", got)
	}
	// The edit is served: the moved merchant's token is for its new
	// organisation (one token request, for it alone).
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", fmt.Sprintf("m04-%05d", n-1))
	if got := sb.TokenRequests() - tokens; got != 1 {
		t.Fatalf("the edited merchant caused %d token requests, want 1", got)
	}
}

// TestReloadHandlerRegistryParsesNothing: a handler's own registry (its
// `config`) is kept across reloads like the app's: an unchanged reload
// parses no registry file and causes 0 token requests, and a reload after
// the file changed parses it again and serves the edit.
func TestReloadHandlerRegistryParsesNothing(t *testing.T) {
	sb, _ := startSandbox(t)
	path := filepath.Join(t.TempDir(), "own.toml")
	registry := "[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"{env.NUAPAY_API}\"\napi_key = \"{env.NUAPAY_API_KEY}\"\n\n" +
		"[merchants.acme]\nprovider = \"nuapay\"\norganisation = \"org-acme\"\nscopes = [\"openbanking_pisp\"]\n"
	if err := os.WriteFile(path, []byte(registry), 0o600); err != nil {
		t.Fatal(err)
	}
	cf := `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
}
http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker {
		config ` + path + `
	}
	reverse_proxy {$SANDBOX_URL}
}
`
	cf, registryParses := logParses(t, cf)
	base := startCaddy(t, cf)
	fp := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization.Fingerprint
	tokens, parses := sb.TokenRequests(), registryParses()
	if parses != 1 {
		t.Fatalf("the first load parsed %d registry files, want 1", parses)
	}

	reloaded := strings.Replace(cf, "bind 127.0.0.1", "bind 127.0.0.1\n\theader X-Reloaded yes", 1)
	loadCaddy(t, reloaded)
	if got := registryParses() - parses; got != 0 {
		t.Fatalf("the unchanged reload parsed %d registry files, want 0", got)
	}
	if got := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization.Fingerprint; got != fp {
		t.Errorf("acme: token %s after the reload, was %s", got, fp)
	}
	if got := sb.TokenRequests() - tokens; got != 0 {
		t.Fatalf("the unchanged reload caused %d token requests, want 0", got)
	}

	registry += "\n[merchants.globex]\nprovider = \"nuapay\"\norganisation = \"org-globex\"\nscopes = [\"openbanking_pisp\"]\n"
	if err := os.WriteFile(path, []byte(registry), 0o600); err != nil {
		t.Fatal(err)
	}
	loadCaddy(t, cf)
	if got := registryParses() - parses; got != 1 {
		t.Fatalf("the reload after the edit parsed %d registry files, want 1", got)
	}
	if got := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "globex").Authorization.Fingerprint; got == "" {
		t.Error("globex, added by the edit, got no token")
	}
}
