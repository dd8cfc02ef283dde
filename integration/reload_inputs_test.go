package integration

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// TestReloadUsesChangedInputs: a file the registry names changes (a
// {file.…} secret, a private_key_jwt key, a CA file) while the registry's
// own file does not; a Caddy reload uses the new content (the token
// request, refused before, succeeds), and the next unchanged reload
// parses nothing and keeps using it. The same holds for the app's
// registry and a handler's own (its `config`); in both, a changed secret
// has the broker forget the failures of the old one, and says so.
func TestReloadUsesChangedInputs(t *testing.T) {
	tests := []struct {
		name string
		path string // the route asked for
		// setup starts the token API, writes the registry into dir with
		// the input in a state the token API refuses, and returns how to
		// put the input right.
		setup func(t *testing.T, dir string) (fix func())
	}{
		{"secret file", "/tpp/payments", func(t *testing.T, dir string) func() {
			startSandbox(t)
			keyFile := filepath.Join(dir, "api.key")
			writeTestFile(t, keyFile, "it-rotated-away-key\n")
			writeTestFile(t, filepath.Join(dir, "merchants.toml"), `[providers.nuapay]
type = "nuapay"
base_url = "{env.NUAPAY_API}"
api_key = "{file.api.key}"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`)
			return func() { writeTestFile(t, keyFile, apiKey+"\n") }
		}},
		{"private_key_jwt key", "/open-banking/v3.1/aisp/accounts", func(t *testing.T, dir string) func() {
			goodKey, pub := bankKey(t)
			_, url := startSandbox(t, func(c *sandbox.Config) {
				c.BankClients = append(c.BankClients, sandbox.BankClient{ID: bankClientID, PublicKeyPEM: pub, Scopes: []string{"accounts"}})
			})
			t.Setenv("BANK_ISSUER", url)
			keyFile := filepath.Join(dir, "bank.key")
			other, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
			if err != nil {
				t.Fatal(err)
			}
			der, _ := x509.MarshalPKCS8PrivateKey(other)
			writeTestFile(t, keyFile, string(pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})))
			writeTestFile(t, filepath.Join(dir, "merchants.toml"), `[providers.bank]
type = "oauth2"
issuer = "{env.BANK_ISSUER}"
client_id = "`+bankClientID+`"
private_key = "bank.key"

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`)
			return func() { writeTestFile(t, keyFile, readFile(t, goodKey)) }
		}},
		{"CA file", "/tpp/payments", func(t *testing.T, dir string) func() {
			sb, _ := startSandbox(t)
			pki, other := newTestPKI(t, "nuapay.test"), newTestPKI(t, "nuapay.test")
			api := httptest.NewUnstartedServer(sb)
			api.TLS = &tls.Config{Certificates: []tls.Certificate{pki.server}}
			api.StartTLS()
			t.Cleanup(api.Close)
			t.Setenv("NUAPAY_TLS_API", api.URL)
			caFile := filepath.Join(dir, "ca.pem")
			writeTestFile(t, caFile, readFile(t, other.caFile))
			writeTestFile(t, filepath.Join(dir, "merchants.toml"), `[providers.nuapay]
type = "nuapay"
base_url = "{env.NUAPAY_TLS_API}"
api_key = "{env.NUAPAY_API_KEY}"
  [providers.nuapay.tls]
  ca_file = "ca.pem"
  server_name = "nuapay.test"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`)
			return func() { writeTestFile(t, caFile, readFile(t, pki.caFile)) }
		}},
	}
	for _, tt := range tests {
		for _, where := range []string{"app", "handler"} {
			t.Run(tt.name+"/"+where, func(t *testing.T) {
				dir := t.TempDir()
				fix := tt.setup(t, dir)
				config := "\t\tconfig " + filepath.Join(dir, "merchants.toml") + "\n"
				app, handler := " {\n"+config+"\t}", ""
				if where == "handler" {
					app, handler = "", " {\n"+config+"\t}"
				}
				cf := `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker` + app + `
}
http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker` + handler + `
	reverse_proxy {$SANDBOX_URL}
}
`
				cf, registryParses := logParses(t, cf)
				base := startCaddy(t, cf)
				if status, body := get(t, base+tt.path, "X-Merchant-Id", "acme"); status == http.StatusOK {
					t.Fatalf("before the change: %d %s, want the token request refused", status, body)
				}
				fix()
				loadCaddy(t, cf)
				if a := getEcho(t, base+tt.path, "X-Merchant-Id", "acme").Authorization; !a.Valid {
					t.Fatalf("after the change and a reload: %+v, want a valid token", a)
				}
				if tt.name == "secret file" && !logged(t, cf, "provider secret changed: its remembered failures are forgotten") {
					t.Error("the reload with the changed secret did not say that the broker forgot the old secret's failures")
				}
				parses := registryParses()
				loadCaddy(t, cf)
				if got := registryParses() - parses; got != 0 {
					t.Errorf("the unchanged reload after the change parsed %d registry files, want 0", got)
				}
				if a := getEcho(t, base+tt.path, "X-Merchant-Id", "acme").Authorization; !a.Valid {
					t.Fatalf("after an unchanged reload: %+v, want a valid token", a)
				}
			})
		}
	}
}

func writeTestFile(t *testing.T, path, content string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
		t.Fatal(err)
	}
}

// TestKeptListingLogsThroughReloadedConfig: the organisation listing of a
// wildcard entry is kept across reloads, and logs through the running
// config's logging: after a reload that sends the logs to another file,
// its lines go to the new file (not the replaced config's, which the
// reload closed); after a reload that raises the level to warn, its info
// lines are dropped.
func TestKeptListingLogsThroughReloadedConfig(t *testing.T) {
	startSandbox(t)
	cf := guardCaddyfile(t, `
[merchants."*"]
provider = "nuapay"
organisation = "{merchant}"
scopes = ["openbanking_pisp"]
only_listed_organisations = true
`, "", "")
	dir := t.TempDir()
	logTo := func(file, level string) string {
		out := strings.Replace(cf, "{\n\tadmin", "{\n\tlog {\n\t\toutput file "+file+"\n\t\tformat json\n\t\tlevel "+level+"\n\t}\n\tadmin", 1)
		if out == cf {
			t.Fatal("the Caddyfile has no global options block starting with admin to add the log to")
		}
		return out
	}
	// listed counts the lines of the listing's reads in a log file.
	listed := func(file string) int {
		data, err := os.ReadFile(file)
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for line := range bytes.SplitSeq(data, []byte("\n")) {
			var entry struct{ Logger, Msg string }
			if json.Unmarshal(line, &entry) == nil && entry.Msg == "organisations listed" {
				if entry.Logger != "token_broker" {
					t.Errorf("%s: organisations listed by logger %q, want token_broker", file, entry.Logger)
				}
				n++
			}
		}
		return n
	}
	refresh := func() {
		t.Helper()
		if status, body := adminCall(t, http.MethodPost, "/token_broker/providers/nuapay/organisations"); status != http.StatusOK {
			t.Fatalf("refreshing the organisations: %d %s", status, body)
		}
	}
	first, next := filepath.Join(dir, "first.log"), filepath.Join(dir, "next.log")

	startCaddy(t, logTo(first, "INFO"))
	refresh()
	inFirst := listed(first)
	if inFirst == 0 {
		t.Fatal("the first config's log has no organisations listed line")
	}

	loadCaddy(t, logTo(next, "INFO"))
	refresh()
	if n := listed(next); n != 1 {
		t.Fatalf("after the reload to %s: %d organisations listed lines there, want 1 (the kept listing logs through the running config)", next, n)
	}
	if n := listed(first); n != inFirst {
		t.Fatalf("after the reload: %d organisations listed lines in the replaced config's log, want %d", n, inFirst)
	}

	loadCaddy(t, logTo(next, "WARN"))
	refresh()
	if n := listed(next); n != 1 {
		t.Fatalf("after the reload to level warn: %d organisations listed lines, want still 1", n)
	}
}

// logged reports whether the JSON log file that logParses added to the
// Caddyfile cf has a line with the message msg.
func logged(t *testing.T, cf, msg string) bool {
	t.Helper()
	_, rest, _ := strings.Cut(cf, "output file ")
	path, _, _ := strings.Cut(rest, "\n")
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return bytes.Contains(data, []byte(`"msg":"`+msg+`"`))
}

// TestListingUsesRotatedKey: the organisation listing of a wildcard entry
// reads the list with the provider's API key of the running config: after
// a reload that rotates the key (the listing was refused with the old
// one), the list is read with the new key and the listed organisations
// are served.
func TestListingUsesRotatedKey(t *testing.T) {
	startSandbox(t)
	t.Setenv("NUAPAY_API_KEY", "it-revoked-partner-key")
	cf := guardCaddyfile(t, `
[merchants."*"]
provider = "nuapay"
organisation = "{merchant}"
scopes = ["openbanking_pisp"]
only_listed_organisations = true
`, "", "")
	base := startCaddy(t, cf)
	if status, body := adminCall(t, http.MethodPost, "/token_broker/providers/nuapay/organisations"); status == http.StatusOK {
		t.Fatalf("listing with the revoked key: %d %s, want it refused", status, body)
	}
	t.Setenv("NUAPAY_API_KEY", apiKey)
	loadCaddy(t, cf)
	if status, body := adminCall(t, http.MethodPost, "/token_broker/providers/nuapay/organisations"); status != http.StatusOK {
		t.Fatalf("listing after the reload with the rotated key: %d %s, want 200", status, body)
	}
	if a := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "org-globex").Authorization; !a.Valid {
		t.Fatalf("org-globex after the reload with the rotated key: %+v, want a valid token", a)
	}
}

// TestFailedRegistryReloadKeepsRunningConfig: a reload whose registry is
// not valid TOML fails with the file and line of the problem, and the
// running config goes on serving its cached token with no token request,
// though the broken file also moved the merchant to another organisation;
// once the file is put right, the next reload serves the move with a new
// token of the new organisation.
func TestFailedRegistryReloadKeepsRunningConfig(t *testing.T) {
	sb, _ := startSandbox(t)
	cf := guardCaddyfile(t, "", "", "")
	path := os.Getenv("TOKEN_BROKER_CONFIG")
	good := readFile(t, path)
	base := startCaddy(t, cf)
	before := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization
	tokens := sb.TokenRequests()

	moved := strings.Replace(good, `organisation = "org-acme"`, `organisation = "org-globex"`, 1)
	writeTestFile(t, path, moved+"\n[merchants.beta\nprovider = \"nuapay\"\n")
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	wantLine := fmt.Sprintf("%s:%d:", path, strings.Count(moved, "\n")+2)
	if err := caddy.Load(adapted, true); err == nil || !strings.Contains(err.Error(), wantLine) {
		t.Fatalf("reload with a broken registry: %v; want an error at %s", err, wantLine)
	}
	if a := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization; a.Fingerprint != before.Fingerprint || sb.TokenRequests() != tokens {
		t.Fatalf("after the failed reload: token %s (was %s), %d token requests (were %d); want the running config's cached token",
			a.Fingerprint, before.Fingerprint, sb.TokenRequests(), tokens)
	}

	writeTestFile(t, path, moved)
	loadCaddy(t, cf)
	if a := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme").Authorization; a.Organisation != "org-globex" || a.Fingerprint == before.Fingerprint {
		t.Fatalf("after the repaired reload: organisation %q, token %s (was %s); want a new token of org-globex", a.Organisation, a.Fingerprint, before.Fingerprint)
	}
}
