package config

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/hex"
	"encoding/pem"
	"errors"
	"fmt"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// secretValue is a distinctive API key: no error text may ever hold it.
const secretValue = "sk-DISTINCTIVE-s3cr3t-9f8e7d"

// testEnv is a fixed environment, with overrides as name, value pairs.
func testEnv(overrides ...string) func(string) (string, bool) {
	env := map[string]string{
		"NUAPAY_BASE_URL": "https://sandbox.nuapay.example",
		"NUAPAY_API_KEY":  secretValue,
		"SHOP_ORG":        "org-shop",
	}
	for i := 0; i+1 < len(overrides); i += 2 {
		env[overrides[i]] = overrides[i+1]
	}
	return func(k string) (string, bool) { v, ok := env[k]; return v, ok }
}

// parse loads a registry of one file, path, whose content is data, as
// LoadWith does (ParseFile, then Merge).
func parse(path string, data []byte, lookupEnv func(string) (string, bool)) (*Registry, error) {
	return parseWith(path, data, Options{LookupEnv: lookupEnv})
}

// parseWith is parse with options.
func parseWith(path string, data []byte, opts Options) (*Registry, error) {
	src := Source{Path: path, Data: data}
	return Merge(path, []Source{src}, []*File{ParseFile(src, opts.LookupEnv)}, opts)
}

func readGood(t testing.TB) []byte {
	data, err := os.ReadFile("testdata/good.toml")
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func mustParse(t *testing.T, path string, data []byte, env func(string) (string, bool)) *Registry {
	t.Helper()
	reg, err := parse(path, data, env)
	if err != nil {
		t.Fatalf("parse: %v", err)
	}
	return reg
}

func TestGoodFile(t *testing.T) {
	reg := mustParse(t, "testdata/good.toml", readGood(t), testEnv())
	if len(reg.Providers) != 2 || len(reg.Merchants) != 3 {
		t.Fatalf("got %d providers, %d merchants", len(reg.Providers), len(reg.Merchants))
	}
	p := reg.Providers["nuapay-sandbox"]
	if p.Type != "nuapay" || p.Endpoint != "https://sandbox.nuapay.example" || callTimeout(t, p) != 10*time.Second || p.Line != 4 {
		t.Errorf("provider = %+v", p)
	}
	if !strings.HasPrefix(p.ID, "nuapay-sandbox#") || len(p.ID) != len("nuapay-sandbox#")+12 {
		t.Errorf("ID = %q", p.ID)
	}
	if _, ok := p.Source.(*nuapay.Source); !ok {
		t.Errorf("Source is %T", p.Source)
	}
	if s := fmt.Sprintf("%+v %#v", *p, *p); strings.Contains(s, secretValue) {
		t.Errorf("provider prints its secret: %s", s)
	}
	if live := reg.Providers["nuapay-live"]; live.Endpoint != "https://api.nuapay.com" || callTimeout(t, live) != 10*time.Second {
		t.Errorf("nuapay-live = %+v", live)
	}

	want := map[string]Merchant{
		"acme":             {ID: "acme", Organisation: "org-acme", Terms: &Terms{Provider: "nuapay-sandbox", Scopes: []string{"openbanking_aisp", "openbanking_pisp"}, Lifetime: 15 * time.Minute}, Line: 22},
		"shop@example.com": {ID: "shop@example.com", Organisation: "org-shop", Terms: &Terms{Provider: "nuapay-sandbox", Scopes: []string{"openbanking_aisp", "openbanking_pisp_read"}}, Line: 28},
		"globex":           {ID: "globex", Organisation: "org-globex", Terms: &Terms{Provider: "nuapay-live", Scopes: []string{"admin"}}, Line: 33},
	}
	for id, w := range want {
		m := reg.Merchants[id]
		if m == nil {
			t.Errorf("merchant %s missing", id)
			continue
		}
		if m.ID != w.ID || m.Provider != w.Provider || m.Organisation != w.Organisation ||
			!slices.Equal(m.Scopes, w.Scopes) || m.Lifetime != w.Lifetime || m.Audience != w.Audience || m.Line != w.Line {
			t.Errorf("merchant %s = %+v %+v, want %+v %+v", id, m, m.Terms, w, w.Terms)
		}
	}
}

func TestLoad(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "merchants.toml")
	t.Setenv("TB_CONFIG_TEST_KEY", secretValue)
	data := `[providers.p]
type = "nuapay"
base_url = "https://nuapay.example"
api_key = "{env.TB_CONFIG_TEST_KEY}"

[merchants.m]
provider = "p"
organisation = "o"
scopes = ["s"]
`
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	reg, err := LoadWith(path, Options{})
	if err != nil {
		t.Fatal(err)
	}
	if reg.Path != path || reg.Merchants["m"] == nil {
		t.Errorf("registry = %+v", reg)
	}
	_, err = LoadWith(filepath.Join(dir, "missing.toml"), Options{})
	var ce *Error
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "missing.toml") {
		t.Errorf("LoadWith(missing) = %v", err)
	}
}

// TestProviderIDHoldsNoSecret: two configurations that differ only in a
// secret value give the same provider ID, and the ID holds nothing derived
// from the secret (no hash of it, however short): it is no offline oracle
// for a low-entropy API key, and a secret rotation keeps the cached tokens.
func TestProviderIDHoldsNoSecret(t *testing.T) {
	good := readGood(t)
	var ids []string
	for _, key := range []string{"a", "ab", secretValue, secretValue + "2", "1234"} {
		reg := mustParse(t, "testdata/good.toml", good, testEnv("NUAPAY_API_KEY", key))
		id := reg.Providers["nuapay-sandbox"].ID
		ids = append(ids, id)
		sum := sha256.Sum256([]byte(key))
		for _, derived := range []string{key, broker.Fingerprint(key), hex.EncodeToString(sum[:])[:12]} {
			if strings.Contains(id, derived) && len(derived) > 2 {
				t.Errorf("ID %s holds %q, derived from the API key", id, derived)
			}
		}
	}
	for _, id := range ids[1:] {
		if id != ids[0] {
			t.Errorf("IDs differ with the API key alone: %q", ids)
			break
		}
	}
}

func TestProviderID(t *testing.T) {
	good := readGood(t)
	base := mustParse(t, "testdata/good.toml", good, testEnv())
	for _, tc := range []struct {
		name    string
		data    []byte
		env     func(string) (string, bool)
		changed bool
	}{
		{"same config", good, testEnv(), false},
		{"merchant change", []byte(strings.Replace(string(good), `"org-acme"`, `"org-other"`, 1)), testEnv(), false},
		{"base_url", good, testEnv("NUAPAY_BASE_URL", "https://nuapay.example/v2"), true},
		{"api key value", good, testEnv("NUAPAY_API_KEY", secretValue+"2"), false},
		{"timeout", []byte(strings.Replace(string(good), `timeout = "10s"`, `timeout = "11s"`, 1)), testEnv(), true},
		{"token_lifetime", []byte(strings.Replace(string(good), `token_lifetime = "1h"`, `token_lifetime = "2h"`, 1)), testEnv(), true},
		{"organisations_path", []byte(strings.Replace(string(good), `"/organisations"`, `"/cust/organisations"`, 1)), testEnv(), true},
		{"rate_limit", []byte(strings.Replace(string(good), `timeout = "10s"`, "timeout = \"10s\"\nrate_limit = \"5/s\"", 1)), testEnv(), false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			reg := mustParse(t, "testdata/good.toml", tc.data, tc.env)
			if got, old := reg.Providers["nuapay-sandbox"].ID, base.Providers["nuapay-sandbox"].ID; (got != old) != tc.changed {
				t.Errorf("ID %s -> %s, want changed=%v", old, got, tc.changed)
			}
			if got, old := reg.Providers["nuapay-live"].ID, base.Providers["nuapay-live"].ID; got != old {
				t.Errorf("the other provider's ID changed: %s -> %s", old, got)
			}
		})
	}
}

func TestBinding(t *testing.T) {
	reg := mustParse(t, "testdata/good.toml", readGood(t), testEnv())
	def, err := reg.Binding("acme", nil)
	if err != nil {
		t.Fatal(err)
	}
	want := broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"openbanking_aisp", "openbanking_pisp"}, Lifetime: 15 * time.Minute}
	if def.SourceID != reg.Providers["nuapay-sandbox"].ID || def.Source != reg.Providers["nuapay-sandbox"].Source ||
		def.Merchant != want.Merchant || def.Organisation != want.Organisation ||
		!slices.Equal(def.Scopes, want.Scopes) || def.Lifetime != want.Lifetime {
		t.Errorf("binding = %+v", def)
	}

	a, err := reg.Binding("acme", []string{"openbanking_refund", "openbanking_pisp"})
	if err != nil {
		t.Fatal(err)
	}
	b, err := reg.Binding("acme", []string{" openbanking_pisp", "openbanking_refund", "openbanking_pisp"})
	if err != nil {
		t.Fatal(err)
	}
	if !slices.Equal(a.Scopes, []string{"openbanking_pisp", "openbanking_refund"}) {
		t.Errorf("route scopes = %q", a.Scopes)
	}
	if a.Key() != b.Key() || a.Key() == def.Key() {
		t.Errorf("keys: %q, %q, default %q", a.Key(), b.Key(), def.Key())
	}
	if e, _ := reg.Binding("acme", []string{"", " "}); e == nil || e.Key() != def.Key() {
		t.Errorf("blank route scopes should keep the defaults")
	}
	if _, err := reg.Binding("nobody", nil); err == nil || !strings.Contains(err.Error(), `"nobody"`) {
		t.Errorf("unknown merchant: %v", err)
	}
	if _, err := reg.Binding("acme", []string{`bad"scope`}); err == nil {
		t.Error("malformed route scope accepted")
	}
}

// badBase is a valid file: provider at lines 1-4, merchant at lines 6-9.
const badBase = `[providers.p]
type = "nuapay"
base_url = "https://nuapay.example"
api_key = "{env.NUAPAY_API_KEY}"

[merchants.acme]
provider = "p"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`

func TestBadConfigs(t *testing.T) {
	edit := func(old, new string) string {
		if !strings.Contains(badBase, old) {
			panic(old)
		}
		return strings.Replace(badBase, old, new, 1)
	}
	const prov, merch = `provider "p"`, `merchant "acme"`
	for _, tc := range []struct {
		name, toml        string
		line              int
		entry, field, msg string
	}{
		{"syntax error", edit(`organisation = "org-acme"`, `organisation = "org-acme`), 8, "", "", `strings cannot contain newlines (after key "merchants.acme.organisation")`},
		{"table header not closed", edit(`[merchants.acme]`, `[merchants.acme`), 6, "", "", `expected '.' or ']' to end table name`},
		{"after a byte-order mark", "\xef\xbb\xbf" + badBase + "@bad = 1\n", 10, "", "", `expected '.' or '=', but got '@' instead`},
		{"bad escape in a multi-line string", edit(`scopes = ["openbanking_pisp"]`, "note = \"\"\"\nfirst\nbad \\q\n\"\"\"\nscopes = [\"openbanking_pisp\"]"), 11, "", "", `invalid escape`},
		{"unquoted secret", edit(`"{env.NUAPAY_API_KEY}"`, secretValue), 4, "", "", "the value of providers.p.api_key is not valid TOML (details withheld"},
		// A key defined twice: the message names the key, never a value,
		// so a secret's key is named too, with what to do.
		{"api_key defined twice", edit(`api_key = "{env.NUAPAY_API_KEY}"`, "api_key = \"{env.NUAPAY_API_KEY}\"\napi_key = \"{file.nuapay.key}\""), 5, prov, "api_key",
			"defined a second time here: keep one of its definitions"},
		{"merchant table defined twice", badBase + "\n[merchants.acme]\nprovider = \"p\"\n", 11, merch, "", "defined a second time here: keep one of its definitions"},
		{"after a UTF-16 byte-order mark", "\xff\xfe" + badBase + "@bad = 1\n", 10, "", "", `expected '.' or '=', but got '@' instead`},
		{"merchant key defined twice", badBase + `organisation = "org-other"` + "\n", 10, merch, "organisation", "defined a second time here: keep one of its definitions"},
		{"unknown merchant key", badBase + `scope = ["x"]` + "\n", 10, merch, "scope", `unknown key "merchants.acme.scope"`},
		{"unknown provider key", edit(`type =`, "apikey = 1\ntype ="), 2, prov, "apikey", `unknown key "providers.p.apikey"`},
		// A misspelt key: the nearest key of the provider's type, and the
		// keys of that type only (no oauth2 keys for a nuapay provider).
		{"misspelt nuapay key", edit(`type =`, "token_lifetme = \"1h\"\ntype ="), 2, prov, "token_lifetme",
			`unknown key "providers.p.token_lifetme": did you mean "token_lifetime"? (the keys of a provider of type nuapay: type, timeout, tls, rate_limit, rate_burst, base_url, api_key, token_lifetime, organisations_path)`},
		{"misspelt oauth2 key", "[providers.p]\ntype = \"oauth2\"\ntoken_url = \"https://as.example/token\"\nclient_id = \"c\"\nclientsecret = \"{env.NUAPAY_API_KEY}\"\n\n[merchants.acme]\nprovider = \"p\"\n", 5, prov, "clientsecret",
			`unknown key "providers.p.clientsecret": did you mean "client_secret"? (the keys of a provider of type oauth2: type, timeout, tls, rate_limit, rate_burst, grant, token_url,`},
		{"misspelt merchant key", badBase + `scope = ["x"]` + "\n", 10, merch, "scope", `unknown key "merchants.acme.scope": did you mean "scopes"? (known keys here: provider,`},
		{"unknown key, nothing near", edit(`type =`, "colour = 1\ntype ="), 2, prov, "colour", `unknown key "providers.p.colour" (the keys of a provider of type nuapay:`},
		{"unknown tls key", badBase + "[providers.p.tls]\ncert = \"x\"\n", 11, prov, "tls.cert", `unknown key "providers.p.tls.cert"`},
		{"unknown top-level table", badBase + "[merchant.beta]\nprovider = \"p\"\n", 10, "", "merchant", `unknown key "merchant"`},
		{"key in the wrong case", edit(`provider = "p"`, `Provider = "p"`), 7, merch, "Provider", `unknown key "merchants.acme.Provider"`},
		{"missing type", edit(`type = "nuapay"`, ``), 1, prov, "type", "missing: set it to one of nuapay"},
		{"unknown type", edit(`"nuapay"`, `"nuapy"`), 2, prov, "type", `unknown provider type "nuapy" (known: nuapay, oauth2)`},
		{"missing base_url", edit(`base_url = "https://nuapay.example"`, ``), 1, prov, "base_url", "missing"},
		{"base_url not http", edit(`https://nuapay.example`, `ftp://nuapay.example`), 3, prov, "base_url", `"ftp://nuapay.example" is not an http(s) URL`},
		{"base_url with credentials", edit(`https://nuapay.example`, `https://user:`+secretValue+`@nuapay.example`), 3, prov, "base_url", "must not hold credentials"},
		{"base_url env unset", edit(`https://nuapay.example`, `{env.NO_SUCH_URL}`), 3, prov, "base_url", "environment variable NO_SUCH_URL is not set"},
		{"clear-text api_key", edit(`{env.NUAPAY_API_KEY}`, secretValue), 4, prov, "api_key", "clear-text value (not shown): use a reference, {env.NAME} or {file.PATH}"},
		{"missing api_key", edit(`api_key = "{env.NUAPAY_API_KEY}"`, ``), 1, prov, "api_key", "missing: use a reference"},
		{"api_key env unset", edit(`NUAPAY_API_KEY`, `NO_SUCH_KEY`), 4, prov, "api_key", "environment variable NO_SUCH_KEY is not set"},
		{"api_key env empty", edit(`NUAPAY_API_KEY`, `EMPTY_KEY`), 4, prov, "api_key", "environment variable EMPTY_KEY is empty"},
		{"api_key file missing", edit(`{env.NUAPAY_API_KEY}`, `{file.secrets/nuapay.key}`), 4, prov, "api_key", filepath.Join("secrets", "nuapay.key") + ": no such file"},
		{"bad duration", edit(`type =`, "timeout = \"10 seconds\"\ntype ="), 2, prov, "timeout", `invalid duration "10 seconds"`},
		{"timeout too long", edit(`type =`, "timeout = \"6m\"\ntype ="), 2, prov, "timeout", "6m0s is out of range: at most 5m0s"},
		{"timeout zero", edit(`type =`, "timeout = \"0s\"\ntype ="), 2, prov, "timeout", "0s is out of range: must be positive"},
		{"rate_limit not a rate", edit(`type =`, "rate_limit = \"20 per second\"\ntype ="), 2, prov, "rate_limit", `rate "20 per second": want a count per unit, like 20/s, 1200/m or 72000/h`},
		{"rate_limit zero", edit(`type =`, "rate_limit = \"0/s\"\ntype ="), 2, prov, "rate_limit", `rate "0/s": the count must be a whole number from 1`},
		{"rate_limit not a string", edit(`type =`, "rate_limit = 20\ntype ="), 2, prov, "rate_limit", "incompatible types"},
		{"rate_burst without rate_limit", edit(`type =`, "rate_burst = 5\ntype ="), 2, prov, "rate_burst", `needs rate_limit: set the provider's token-request limit, e.g. rate_limit = "20/s"`},
		{"rate_burst zero", edit(`type =`, "rate_limit = \"20/s\"\nrate_burst = 0\ntype ="), 3, prov, "rate_burst", "0 is out of range 1..20"},
		{"rate_burst above a second's worth", edit(`type =`, "rate_limit = \"1200/m\"\nrate_burst = 21\ntype ="), 3, prov, "rate_burst",
			`21 is out of range 1..20: at most one second's worth of rate_limit "1200/m"; lower rate_burst, or leave it out for 20`},
		{"rate_burst of a slow rate", edit(`type =`, "rate_limit = \"5/10s\"\nrate_burst = 2\ntype ="), 3, prov, "rate_burst", "2 is out of range 1..1"},
		{"provider lifetime too short", edit(`type =`, "token_lifetime = \"5s\"\ntype ="), 2, prov, "token_lifetime", "5s is out of range 10s..8765h"},
		{"merchant lifetime too long", badBase + `token_lifetime = "9000h"` + "\n", 10, merch, "token_lifetime", "out of range"},
		{"unknown provider", edit(`provider = "p"`, `provider = "nuapy"`), 7, merch, "provider", `unknown provider "nuapy" (defined: p)`},
		{"missing provider", edit(`provider = "p"`, ``), 6, merch, "provider", "missing (defined: p)"},
		{"missing organisation", edit(`organisation = "org-acme"`, ``), 6, merch, "organisation", "missing"},
		{"organisation dot-dot", edit(`"org-acme"`, `".."`), 8, merch, "organisation", `".." is not a valid organisation id`},
		{"organisation control char", edit(`"org-acme"`, `"org\nx"`), 8, merch, "organisation", "control characters"},
		{"invalid merchant id", edit(`[merchants.acme]`, `[merchants."a b"]`), 6, `merchant "a b"`, "", "invalid merchant id"},
		{"no scopes", edit(`scopes = ["openbanking_pisp"]`, `scopes = [" "]`), 9, merch, "scopes", `provider "p" (type nuapay) needs at least one scope`},
		{"bad scope", edit(`"openbanking_pisp"`, `"openbanking pisp"`), 9, merch, "scopes", `"openbanking pisp" is not a valid scope`},
		{"scopes not an array", edit(`["openbanking_pisp"]`, `"openbanking_pisp"`), 9, merch, "scopes", "incompatible types"},
		{"client_cert without key", badBase + "[providers.p.tls]\nclient_cert = \"qwac.pem\"\n", 11, prov, "tls.client_cert", "qwac.pem: no such file"},
		{"client_key missing", badBase + "[providers.p.tls]\nclient_cert = \"/dev/null\"\n", 10, prov, "tls.client_key", "missing: client_cert needs its client_key"},
		{"unreadable ca_file", badBase + "[providers.p.tls]\nca_file = \"ca.pem\"\n", 11, prov, "tls.ca_file", "ca.pem: no such file"},
		{"inline merchant", badBase + "[merchants.beta]\n" + `provider = "q"` + "\n", 11, `merchant "beta"`, "provider", `unknown provider "q"`},
		{"inline table line", badBase + "[merchants]\n" + `beta = { provider = "p", scopes = ["s"] }` + "\n", 11, `merchant "beta"`, "organisation", "missing"},
		{"entry not a table", badBase + "[merchants]\nbeta = 5\n", 11, `merchant "beta"`, "", "must be a table, not integer"},
		{"zero merchants", badBase[:strings.Index(badBase, "[merchants")], 0, "", "", "no merchants"},
		{"merchants not a table", "merchants = 5\n" + badBase[:strings.Index(badBase, "[merchants")], 1, "", "merchants", "must be a table of [merchants.NAME] tables, not integer"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "merchants.toml")
			reg, err := parse(path, []byte(tc.toml), testEnv("EMPTY_KEY", ""))
			if err == nil || reg != nil {
				t.Fatalf("Parse = %v, %v; want an error", reg, err)
			}
			if strings.Contains(err.Error(), secretValue) {
				t.Errorf("the error reveals the secret: %v", err)
			}
			var found *Error
			for _, e := range unwrapAll(err) {
				ce, ok := e.(*Error)
				if !ok {
					t.Fatalf("%T is not a *config.Error: %v", e, e)
				}
				if ce.Entry == tc.entry && ce.Field == tc.field && strings.Contains(ce.Msg, tc.msg) {
					found = ce
				}
			}
			if found == nil {
				t.Fatalf("no error for entry %q field %q with %q in:\n%v", tc.entry, tc.field, tc.msg, err)
			}
			if found.Line != tc.line {
				t.Errorf("line %d, want %d: %v", found.Line, tc.line, found)
			}
			s := found.Error()
			prefix := path + ": "
			if tc.line > 0 {
				prefix = fmt.Sprintf("%s:%d: ", path, tc.line)
			}
			if !strings.HasPrefix(s, prefix) || !strings.Contains(s, tc.entry) || tc.field != "" && !strings.Contains(s, "field "+tc.field+": ") {
				t.Errorf("error text %q lacks file, line, entry or field", s)
			}
		})
	}
}

func unwrapAll(err error) []error {
	if u, ok := err.(interface{ Unwrap() []error }); ok {
		return u.Unwrap()
	}
	return []error{err}
}

func TestAllProblemsReported(t *testing.T) {
	data := `[providers.p]
type = "nuapay"
base_url = "ftp://x"
api_key = "clear"
timeout = "1 minute"

[providers.q]
type = "nuapay"
base_url = "https://q.example"

[merchants.a]
provider = "nuapy"
organisation = "o"
scopes = ["s"]

[merchants.b]
provider = "q"
`
	_, err := parse("m.toml", []byte(data), testEnv())
	want := []string{
		`m.toml:5: provider "p": field timeout: invalid duration "1 minute"`,
		`m.toml:7: provider "q": field api_key: missing`,
		`m.toml:12: merchant "a": field provider: unknown provider "nuapy" (defined: p, q)`,
		`m.toml:16: merchant "b": field organisation: missing`,
		`m.toml:16: merchant "b": field scopes: missing`,
	}
	errs := unwrapAll(err)
	if len(errs) != len(want) {
		t.Fatalf("got %d errors, want %d:\n%v", len(errs), len(want), err)
	}
	for i, w := range want {
		if !strings.HasPrefix(errs[i].Error(), w) {
			t.Errorf("error %d = %q, want prefix %q", i, errs[i], w)
		}
	}
}

// writeCert writes a fresh self-signed ECDSA certificate for 127.0.0.1,
// usable by both ends of a TLS connection, and its key.
func writeCert(t *testing.T, certFile, keyFile string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: "token broker test"},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature | x509.KeyUsageCertSign,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth, x509.ExtKeyUsageClientAuth},
		IPAddresses:           []net.IP{net.IPv4(127, 0, 0, 1)},
		BasicConstraintsValid: true,
		IsCA:                  true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	pkcs8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	for file, block := range map[string]*pem.Block{certFile: {Type: "CERTIFICATE", Bytes: der}, keyFile: {Type: "PRIVATE KEY", Bytes: pkcs8}} {
		if err := os.WriteFile(file, pem.EncodeToMemory(block), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

func TestRelativeFilesAndTLS(t *testing.T) {
	dir := t.TempDir()
	certs := filepath.Join(dir, "certs")
	if err := os.Mkdir(certs, 0o700); err != nil {
		t.Fatal(err)
	}
	certFile, keyFile := filepath.Join(certs, "qwac.pem"), filepath.Join(certs, "qwac.key")
	writeCert(t, certFile, keyFile)
	if err := os.WriteFile(filepath.Join(dir, "api.key"), []byte(secretValue+"\n"), 0o600); err != nil {
		t.Fatal(err)
	}

	// A Gatekeeper stand-in that insists on the client certificate.
	var gotAuth string
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gotAuth = r.Header.Get("Authorization")
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"data":{"id":"t1","accessToken":"tok","tokenType":"BEARER","expiryTime":%d,"status":"ACTIVE"}}`, time.Now().Add(time.Hour).UnixMilli())
	}))
	pair, err := tls.LoadX509KeyPair(certFile, keyFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	pool.AddCert(pair.Leaf)
	srv.TLS = &tls.Config{Certificates: []tls.Certificate{pair}, ClientAuth: tls.RequireAndVerifyClientCert, ClientCAs: pool}
	srv.StartTLS()
	defer srv.Close()

	data := []byte(`[providers.tsp]
type = "nuapay"
base_url = "{env.BASE}"
api_key = "{file.api.key}"
  [providers.tsp.tls]
  client_cert = "certs/qwac.pem"
  client_key = "./certs/qwac.key"
  ca_file = "{env.CERTS}/qwac.pem"

[merchants.m]
provider = "tsp"
organisation = "org/../m"
scopes = ["openbanking_pisp"]
`)
	path := filepath.Join(dir, "merchants.toml")
	env := testEnv("BASE", srv.URL, "CERTS", "certs")
	reg := mustParse(t, path, data, env)
	p := reg.Providers["tsp"]
	b, err := reg.Binding("m", nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := b.Source.Token(context.Background(), b.Request())
	if err != nil {
		t.Fatalf("token over mTLS: %v", err)
	}
	if tok.Value.Reveal() != "tok" || gotAuth != "Basic "+base64.StdEncoding.EncodeToString([]byte(secretValue+":")) {
		t.Errorf("token %q, Authorization %q", tok.Value.Reveal(), gotAuth)
	}

	if again := mustParse(t, path, data, env); again.Providers["tsp"].ID != p.ID {
		t.Errorf("ID not stable: %s, %s", p.ID, again.Providers["tsp"].ID)
	}
	writeCert(t, certFile, keyFile)
	if renewed := mustParse(t, path, data, env); renewed.Providers["tsp"].ID == p.ID {
		t.Errorf("ID %s unchanged after the certificate changed", p.ID)
	}

	// A key that does not match the certificate.
	writeCert(t, filepath.Join(certs, "other.pem"), keyFile)
	_, err = parse(path, data, env)
	if err == nil || !strings.Contains(err.Error(), `provider "tsp": field tls: loading client certificate`) {
		t.Errorf("mismatched key: %v", err)
	}
}

func TestValidMerchantID(t *testing.T) {
	for s, want := range map[string]bool{
		"acme": true, "A1": true, "shop@example.com": true, "a:b_c-d.e": true, "0": true,
		"a:b,c_d-e.f": false, "acme, globex": false, "acme,globex": false,
		strings.Repeat("a", 128): true, strings.Repeat("a", 129): false,
		"": false, "-acme": false, ".acme": false, "a b": false, "a/b": false, "a%2F": false,
		"a\r\nb": false, "a\x00": false, "аcme": false, "acme\u200b": false, "a#b": false,
	} {
		if got := ValidMerchantID(s); got != want {
			t.Errorf("ValidMerchantID(%q) = %v", s, got)
		}
	}
}

func TestDuration(t *testing.T) {
	var d Duration
	if err := d.UnmarshalText([]byte("1h30m")); err != nil || time.Duration(d) != 90*time.Minute {
		t.Errorf("UnmarshalText = %v, %v", d, err)
	}
	for _, bad := range []string{"", "10", "1 hour", "1d"} {
		if err := d.UnmarshalText([]byte(bad)); err == nil {
			t.Errorf("UnmarshalText(%q) accepted", bad)
		}
	}
}

func TestErrorText(t *testing.T) {
	e := &Error{File: "merchants.toml", Line: 12, Entry: `merchant "acme"`, Field: "provider", Msg: `unknown provider "nuapy" (defined: nuapay-sandbox)`}
	if got, want := e.Error(), `merchants.toml:12: merchant "acme": field provider: unknown provider "nuapy" (defined: nuapay-sandbox)`; got != want {
		t.Errorf("got  %s\nwant %s", got, want)
	}
	e = &Error{File: "merchants.toml", Msg: "no merchants"}
	if got := e.Error(); got != "merchants.toml: no merchants" {
		t.Errorf("got %s", got)
	}
}

// oauthBase is a valid oauth2 file: provider at lines 1-5, merchant at
// lines 7-8.
const oauthBase = `[providers.oneid]
type = "oauth2"
token_url = "https://api.oneid.example/v1/token"
client_id = "partner-1"
client_secret = "{env.NUAPAY_API_KEY}"

[merchants.shop]
provider = "oneid"
`

// writeKey writes a PKCS#8 EC P-256 key to dir/name and returns its path.
func writeKey(t *testing.T, dir, name string) string {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func TestOAuth2Providers(t *testing.T) {
	dir := t.TempDir()
	writeKey(t, dir, "client.key")
	certFile := filepath.Join(dir, "client.pem")
	writeCert(t, certFile, filepath.Join(dir, "client-cert.key"))
	data := []byte(oauthBase + `
[providers.bank]
type = "oauth2"
issuer = "https://bank.example"
client_id = "{env.SHOP_ORG}"
private_key = "client.key"
key_id = "k1"
assertion_audience = "https://bank.example"
resource = "https://api.bank.example"
default_lifetime = "10m"
  [providers.bank.params]
  acr_values = "urn:bank:acr"

[providers.fapi]
type = "oauth2"
token_url = "https://mtls.bank.example/token"
client_id = "fapi-client"
  [providers.fapi.tls]
  client_cert = "client.pem"
  client_key = "client-cert.key"

[providers.consented]
type = "oauth2"
grant = "refresh_token"
token_url = "https://bank.example/token"
revocation_url = "https://bank.example/revoke"
client_id = "rt-client"
client_secret = "{env.NUAPAY_API_KEY}"
auth_method = "client_secret_post"

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
audience = "https://api.bank.example"
token_lifetime = "1h"

[merchants.globex]
provider = "consented"
`)
	path := filepath.Join(dir, "merchants.toml")
	store := &oauth.MemoryStore{}
	reg, err := parseWith(path, data, Options{LookupEnv: testEnv(), RefreshStore: store})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name   string
		source any
	}{
		{"oneid", &oauth.ClientCredentials{}},
		{"bank", &oauth.ClientCredentials{}},
		{"fapi", &oauth.ClientCredentials{}},
		{"consented", &oauth.RefreshToken{}},
	} {
		p := reg.Providers[tc.name]
		if p == nil || p.Type != "oauth2" || fmt.Sprintf("%T", p.Source) != fmt.Sprintf("%T", tc.source) {
			t.Errorf("provider %s = %+v", tc.name, p)
			continue
		}
		if s := fmt.Sprintf("%+v %#v", *p, *p); strings.Contains(s, secretValue) {
			t.Errorf("provider %s prints its secret", tc.name)
		}
	}
	if p := reg.Providers["bank"]; p.Endpoint != "https://bank.example" {
		t.Errorf("bank = %+v", p)
	}
	if rt, ok := reg.Providers["consented"].Source.(*oauth.RefreshToken); !ok || rt.Store() != oauth.Store(store) || rt.StoreKey("globex") != oauth.StoreKey(oauth.Config{Name: "consented", StoreNamespace: path, TokenURL: "https://bank.example/token", ClientID: "rt-client"}, "globex") {
		t.Errorf("the refresh source does not use the given store and key")
	}
	b, err := reg.Binding("acme", nil)
	if err != nil {
		t.Fatal(err)
	}
	if b.Organisation != "" || b.Audience != "https://api.bank.example" || b.Lifetime != time.Hour {
		t.Errorf("binding = %+v", b.Request())
	}
	if _, err := reg.Binding("shop", nil); err != nil {
		t.Errorf("a merchant without organisation or scopes: %v", err)
	}

	// Without a store, a refresh_token provider is an error, not a
	// memory store that would lose the tokens.
	_, err = parse(path, data, testEnv())
	if err == nil || !strings.Contains(err.Error(), `provider "consented": field grant: "refresh_token" needs a durable refresh-token store`) {
		t.Errorf("Parse without store = %v", err)
	}

	// The provider ID follows every field, the key file's bytes included.
	base := reg.Providers["bank"].ID
	for _, edit := range []struct{ old, new string }{
		{`key_id = "k1"`, `key_id = "k2"`},
		{`default_lifetime = "10m"`, `default_lifetime = "11m"`},
		{`acr_values = "urn:bank:acr"`, `acr_values = "urn:bank:acr2"`},
		{`resource = "https://api.bank.example"`, `resource = "https://api2.bank.example"`},
		{`assertion_audience = "https://bank.example"`, `assertion_audience = "https://bank.example/token"`},
		{`issuer = "https://bank.example"`, `issuer = "https://bank.example/v2"`},
	} {
		d := []byte(strings.Replace(string(data), edit.old, edit.new, 1))
		r, err := parseWith(path, d, Options{LookupEnv: testEnv(), RefreshStore: store})
		if err != nil {
			t.Fatal(err)
		}
		if r.Providers["bank"].ID == base {
			t.Errorf("ID unchanged after %s -> %s", edit.old, edit.new)
		}
	}
	writeKey(t, dir, "client.key")
	if r, err := parseWith(path, data, Options{LookupEnv: testEnv(), RefreshStore: store}); err != nil || r.Providers["bank"].ID == base {
		t.Errorf("ID unchanged after the key file changed (%v)", err)
	}
	oneID := reg.Providers["oneid"].ID
	if r, _ := parseWith(path, data, Options{LookupEnv: testEnv("NUAPAY_API_KEY", "other"), RefreshStore: store}); r.Providers["oneid"].ID != oneID {
		t.Errorf("ID changed with the client secret: it must hold nothing derived from a secret")
	}
}

func TestOAuth2BadConfigs(t *testing.T) {
	edit := func(old, new string) string {
		if !strings.Contains(oauthBase, old) {
			panic(old)
		}
		return strings.Replace(oauthBase, old, new, 1)
	}
	const prov = `provider "oneid"`
	for _, tc := range []struct {
		name, toml        string
		line              int
		entry, field, msg string
	}{
		{"base_url on oauth2", edit(`client_id =`, "base_url = \"https://x.example\"\nclient_id ="), 4, prov, "base_url", "not used by providers of type oauth2"},
		{"token_lifetime on oauth2", edit(`client_id =`, "token_lifetime = \"1h\"\nclient_id ="), 4, prov, "token_lifetime", "not used by providers of type oauth2"},
		{"client_id on nuapay", badBase + "client_id = \"x\"\n", 10, `merchant "acme"`, "client_id", `unknown key`},
		{"both token_url and issuer", edit(`client_id =`, "issuer = \"https://x.example\"\nclient_id ="), 4, prov, "issuer", "set token_url or issuer, not both"},
		{"neither token_url nor issuer", edit(`token_url = "https://api.oneid.example/v1/token"`, ``), 1, prov, "token_url", "missing: set the token endpoint URL, or issuer"},
		{"token_url not http", edit(`https://api.oneid.example/v1/token`, `ftp://x`), 3, prov, "token_url", `"ftp://x" is not an http(s) URL`},
		{"token_url with credentials", edit(`https://api.oneid.example`, `https://u:`+secretValue+`@api.oneid.example`), 3, prov, "token_url", "must not hold credentials"},
		{"issuer with query", edit(`token_url = "https://api.oneid.example/v1/token"`, `issuer = "https://x.example?a=b"`), 3, prov, "issuer", "must not carry a query"},
		{"missing client_id", edit(`client_id = "partner-1"`, ``), 1, prov, "client_id", "missing"},
		{"clear-text client_secret", edit(`{env.NUAPAY_API_KEY}`, secretValue), 5, prov, "client_secret", "clear-text value (not shown)"},
		{"unquoted client_secret", edit(`"{env.NUAPAY_API_KEY}"`, secretValue), 5, "", "", "the value of providers.oneid.client_secret is not valid TOML (details withheld"},
		{"no credential at all", edit(`client_secret = "{env.NUAPAY_API_KEY}"`, ``), 1, prov, "auth_method", "missing: set client_secret, private_key or tls.client_cert"},
		{"unknown auth_method", edit(`client_id =`, "auth_method = \"client_secret_jwt\"\nclient_id ="), 4, prov, "auth_method", `unknown method "client_secret_jwt"`},
		{"secret with private_key_jwt", edit(`client_id =`, "auth_method = \"private_key_jwt\"\nprivate_key = \"k.pem\"\nclient_id ="), 7, prov, "client_secret", "not used by auth_method private_key_jwt"},
		{"private_key_jwt without key", edit(`client_secret = "{env.NUAPAY_API_KEY}"`, `auth_method = "private_key_jwt"`), 1, prov, "private_key", "missing: auth_method private_key_jwt needs"},
		{"private key missing file", edit(`client_secret = "{env.NUAPAY_API_KEY}"`, `private_key = "nokey.pem"`), 5, prov, "private_key", "nokey.pem: no such file"},
		{"private key not a key", edit(`client_secret = "{env.NUAPAY_API_KEY}"`, `private_key = "/dev/null"`), 5, prov, "private_key", "not a regular file"},
		{"bad signing_alg", edit(`client_secret = "{env.NUAPAY_API_KEY}"`, "private_key = \"k.pem\"\nsigning_alg = \"none\""), 6, prov, "signing_alg", `unknown algorithm "none"`},
		{"key_id without private_key_jwt", edit(`client_id =`, "key_id = \"k1\"\nclient_id ="), 4, prov, "key_id", "only used by auth_method private_key_jwt"},
		{"tls_client_auth without cert", edit(`client_secret = "{env.NUAPAY_API_KEY}"`, `auth_method = "tls_client_auth"`), 1, prov, "tls.client_cert", "missing: auth_method tls_client_auth"},
		{"unknown grant", edit(`client_id =`, "grant = \"password\"\nclient_id ="), 4, prov, "grant", `unknown grant "password"`},
		{"refresh_token without store", edit(`client_id =`, "grant = \"refresh_token\"\nclient_id ="), 4, prov, "grant", "needs a durable refresh-token store"},
		{"reserved param", oauthBase[:strings.Index(oauthBase, "[merchants")] + "[providers.oneid.params]\nclient_id = \"x\"\n\n[merchants.shop]\nprovider = \"oneid\"\n", 8, prov, "params.client_id", "the broker sets client_id itself"},
		{"param not a string", oauthBase[:strings.Index(oauthBase, "[merchants")] + "[providers.oneid.params]\nx = 1\n\n[merchants.shop]\nprovider = \"oneid\"\n", 8, prov, "params.x", "incompatible types"},
		{"nested param", oauthBase[:strings.Index(oauthBase, "[merchants")] + "[providers.oneid.params.x]\ny = \"1\"\n\n[merchants.shop]\nprovider = \"oneid\"\n", 8, prov, "params.x.y", `unknown key "providers.oneid.params.x.y"`},
		{"default_lifetime zero", edit(`client_id =`, "default_lifetime = \"0s\"\nclient_id ="), 4, prov, "default_lifetime", "must be positive"},
		{"resource not absolute", edit(`client_id =`, "resource = \"api\"\nclient_id ="), 4, prov, "resource", "not an absolute URI"},
		{"merchant lifetime too long", oauthBase + "token_lifetime = \"9000h\"\n", 9, `merchant "shop"`, "token_lifetime", "out of range 1s..8760h"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			path := filepath.Join(dir, "merchants.toml")
			writeFile := func(name, content string) {
				if err := os.WriteFile(filepath.Join(dir, name), []byte(content), 0o600); err != nil {
					t.Fatal(err)
				}
			}
			writeKey(t, dir, "k.pem")
			writeFile("junk.pem", "not a key")
			_, err := parse(path, []byte(tc.toml), testEnv())
			if err == nil {
				t.Fatal("Parse accepted the file")
			}
			if strings.Contains(err.Error(), secretValue) {
				t.Errorf("the error reveals the secret: %v", err)
			}
			var found *Error
			for _, e := range unwrapAll(err) {
				if ce, ok := e.(*Error); ok && ce.Entry == tc.entry && ce.Field == tc.field && strings.Contains(ce.Msg, tc.msg) {
					found = ce
				}
			}
			if found == nil {
				t.Fatalf("no error for entry %q field %q with %q in:\n%v", tc.entry, tc.field, tc.msg, err)
			}
			if found.Line != tc.line {
				t.Errorf("line %d, want %d: %v", found.Line, tc.line, found)
			}
		})
	}
}

// TestCheckRouteScopes: a route's scopes pass when each is an RFC 6749
// scope-token, and fail naming the registry otherwise.
func TestCheckRouteScopes(t *testing.T) {
	reg := mustParse(t, "testdata/good.toml", readGood(t), testEnv())
	tests := []struct {
		name    string
		scopes  []string
		wantErr string
	}{
		{"none: the merchants' own", nil, ""},
		{"valid", []string{"accounts", "payments"}, ""},
		{"space in a scope", []string{"a b"}, "route scopes"},
		{"quote in a scope", []string{`a"b`}, "route scopes"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := reg.CheckRouteScopes(tt.scopes)
			if tt.wantErr == "" {
				if err != nil {
					t.Fatalf("CheckRouteScopes(%q) = %v, want nil", tt.scopes, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tt.wantErr) || !strings.Contains(err.Error(), "testdata/good.toml") {
				t.Fatalf("CheckRouteScopes(%q) = %v, want an error with %q and the registry's path", tt.scopes, err, tt.wantErr)
			}
		})
	}
}
