package config

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
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

func readGood(t testing.TB) []byte {
	data, err := os.ReadFile("testdata/good.toml")
	if err != nil {
		t.Fatal(err)
	}
	return data
}

func mustParse(t *testing.T, path string, data []byte, env func(string) (string, bool)) *Registry {
	t.Helper()
	reg, err := Parse(path, data, env)
	if err != nil {
		t.Fatalf("Parse: %v", err)
	}
	return reg
}

func TestGoodFile(t *testing.T) {
	reg := mustParse(t, "testdata/good.toml", readGood(t), testEnv())
	if len(reg.Providers) != 2 || len(reg.Merchants) != 3 {
		t.Fatalf("got %d providers, %d merchants", len(reg.Providers), len(reg.Merchants))
	}
	p := reg.Providers["nuapay-sandbox"]
	if p.Type != "nuapay" || p.BaseURL != "https://sandbox.nuapay.example" || p.Timeout != 10*time.Second ||
		p.TokenLifetime != time.Hour || p.OrganisationsPath != "/organisations" || p.Line != 4 {
		t.Errorf("provider = %+v", p)
	}
	if !strings.HasPrefix(p.ID, "nuapay-sandbox#") || len(p.ID) != len("nuapay-sandbox#")+12 {
		t.Errorf("ID = %q", p.ID)
	}
	if _, ok := p.Source.(*broker.Nuapay); !ok {
		t.Errorf("Source is %T", p.Source)
	}
	if s := fmt.Sprintf("%+v %#v", *p, *p); strings.Contains(s, secretValue) {
		t.Errorf("provider prints its secret: %s", s)
	}
	if live := reg.Providers["nuapay-live"]; live.TokenLifetime != 30*time.Minute || live.Timeout != 10*time.Second {
		t.Errorf("nuapay-live = %+v", live)
	}

	want := map[string]Merchant{
		"acme":             {ID: "acme", Provider: "nuapay-sandbox", Organisation: "org-acme", Scopes: []string{"openbanking_aisp", "openbanking_pisp"}, Lifetime: 15 * time.Minute, Line: 22},
		"shop@example.com": {ID: "shop@example.com", Provider: "nuapay-sandbox", Organisation: "org-shop", Scopes: []string{"openbanking_aisp", "openbanking_pisp_read"}, Line: 28},
		"globex":           {ID: "globex", Provider: "nuapay-live", Organisation: "org-globex", Scopes: []string{"admin"}, Line: 33},
	}
	for id, w := range want {
		m := reg.Merchants[id]
		if m == nil || m.ID != w.ID || m.Provider != w.Provider || m.Organisation != w.Organisation ||
			!slices.Equal(m.Scopes, w.Scopes) || m.Lifetime != w.Lifetime || m.Audience != w.Audience || m.Line != w.Line {
			t.Errorf("merchant %s = %+v, want %+v", id, m, w)
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
	reg, err := Load(path)
	if err != nil {
		t.Fatal(err)
	}
	if reg.Path != path || reg.Merchants["m"] == nil {
		t.Errorf("registry = %+v", reg)
	}
	_, err = Load(filepath.Join(dir, "missing.toml"))
	var ce *Error
	if !errors.As(err, &ce) || !strings.Contains(err.Error(), "missing.toml") {
		t.Errorf("Load(missing) = %v", err)
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
		{"api key value", good, testEnv("NUAPAY_API_KEY", secretValue+"2"), true},
		{"timeout", []byte(strings.Replace(string(good), `timeout = "10s"`, `timeout = "11s"`, 1)), testEnv(), true},
		{"token_lifetime", []byte(strings.Replace(string(good), `token_lifetime = "1h"`, `token_lifetime = "2h"`, 1)), testEnv(), true},
		{"organisations_path", []byte(strings.Replace(string(good), `"/organisations"`, `"/cust/organisations"`, 1)), testEnv(), true},
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
		def.Request.Merchant != want.Merchant || def.Request.Organisation != want.Organisation ||
		!slices.Equal(def.Request.Scopes, want.Scopes) || def.Request.Lifetime != want.Lifetime {
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
	if !slices.Equal(a.Request.Scopes, []string{"openbanking_pisp", "openbanking_refund"}) {
		t.Errorf("route scopes = %q", a.Request.Scopes)
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
		{"unquoted secret", edit(`"{env.NUAPAY_API_KEY}"`, secretValue), 4, "", "", "the value of providers.p.api_key is not valid TOML (details withheld"},
		{"unknown merchant key", badBase + `scope = ["x"]` + "\n", 10, merch, "scope", `unknown key "merchants.acme.scope"`},
		{"unknown provider key", edit(`type =`, "apikey = 1\ntype ="), 2, prov, "apikey", `unknown key "providers.p.apikey"`},
		{"unknown tls key", badBase + "[providers.p.tls]\ncert = \"x\"\n", 11, prov, "tls.cert", `unknown key "providers.p.tls.cert"`},
		{"unknown top-level table", badBase + "[merchant.beta]\nprovider = \"p\"\n", 10, "", "merchant", `unknown key "merchant"`},
		{"key in the wrong case", edit(`provider = "p"`, `Provider = "p"`), 7, merch, "Provider", `unknown key "merchants.acme.Provider"`},
		{"missing type", edit(`type = "nuapay"`, ``), 1, prov, "type", "missing: set it to one of nuapay"},
		{"unknown type", edit(`"nuapay"`, `"nuapy"`), 2, prov, "type", `unknown provider type "nuapy" (known: nuapay)`},
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
			reg, err := Parse(path, []byte(tc.toml), testEnv("EMPTY_KEY", ""))
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
	_, err := Parse("m.toml", []byte(data), testEnv())
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
	if p.TLS != (broker.TLSOptions{CertFile: certFile, KeyFile: keyFile, CAFile: certFile}) {
		t.Errorf("TLS = %+v", p.TLS)
	}
	b, err := reg.Binding("m", nil)
	if err != nil {
		t.Fatal(err)
	}
	tok, err := b.Source.Token(context.Background(), b.Request)
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
	_, err = Parse(path, data, env)
	if err == nil || !strings.Contains(err.Error(), `provider "tsp": field tls: loading client certificate`) {
		t.Errorf("mismatched key: %v", err)
	}
}

func TestValidMerchantID(t *testing.T) {
	for s, want := range map[string]bool{
		"acme": true, "A1": true, "shop@example.com": true, "a:b,c_d-e.f": true, "0": true,
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
	if b, _ := d.MarshalText(); string(b) != "1h30m0s" {
		t.Errorf("MarshalText = %s", b)
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
