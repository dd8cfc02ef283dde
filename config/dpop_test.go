package config

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/x509"
	"encoding/pem"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// writeDPoPKey writes a new PKCS#8 private key for alg (dpoptest.KeyPEM:
// ES256, EdDSA or PS256) to dir/name and returns its path and PEM.
func writeDPoPKey(t *testing.T, dir, name, alg string) (string, string) {
	t.Helper()
	data, err := dpoptest.KeyPEM(alg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path, string(data)
}

// dpopBase is oauthBase with a [providers.oneid.dpop] table whose key is
// @KEYREF@.
const dpopBase = `[providers.oneid]
type = "oauth2"
token_url = "https://api.oneid.example/v1/token"
client_id = "partner-1"
client_secret = "{env.NUAPAY_API_KEY}"
  [providers.oneid.dpop]
  key = "@KEYREF@"

[merchants.shop]
provider = "oneid"
`

// TestDPoPConfig: a provider's DPoP key is read from a path, a {file.}
// or an {env.} reference; its algorithm follows the key unless alg says
// (and fits); every binding's profile carries it; the provider ID follows
// the key (not its place), and a changed key file is an input change.
func TestDPoPConfig(t *testing.T) {
	dir := t.TempDir()
	ecPath, ecPEM := writeDPoPKey(t, dir, "dpop-ec.pem", "ES256")
	edPath, _ := writeDPoPKey(t, dir, "dpop-ed.pem", "EdDSA")
	rsaPath, _ := writeDPoPKey(t, dir, "dpop-rsa.pem", "PS256")
	path := filepath.Join(dir, "merchants.toml")
	env := testEnv("DPOP_PEM", ecPEM, "KEYDIR", dir)
	ids := map[string]string{}
	for _, tc := range []struct {
		name, key, alg string
		wantAlg        string
		wantInput      string // the file the registry reads for the key
	}{
		{"relative path", "dpop-ec.pem", "", dpop.ES256, ecPath},
		{"path with a variable", "{env.KEYDIR}/dpop-ec.pem", "", dpop.ES256, ecPath},
		{"file reference", "{file.dpop-ec.pem}", "", dpop.ES256, ecPath},
		{"environment variable", "{env.DPOP_PEM}", "", dpop.ES256, ""},
		{"Ed25519", edPath, "", dpop.EdDSA, edPath},
		{"Ed25519 with alg", edPath, "EdDSA", dpop.EdDSA, edPath},
		{"Ed25519 with its RFC 9864 name", edPath, "Ed25519", dpop.Ed25519, edPath},
		{"RSA", rsaPath, "", dpop.PS256, rsaPath},
	} {
		t.Run(tc.name, func(t *testing.T) {
			toml := strings.Replace(dpopBase, "@KEYREF@", tc.key, 1)
			if tc.alg != "" {
				toml = strings.Replace(toml, "  key =", "  alg = \""+tc.alg+"\"\n  key =", 1)
			}
			reg, err := parse(path, []byte(toml), env)
			if err != nil {
				t.Fatal(err)
			}
			p := reg.Providers["oneid"]
			if p.DPoP == nil || p.DPoP.Alg() != tc.wantAlg {
				t.Fatalf("DPoP = %v, want a %s key", p.DPoP, tc.wantAlg)
			}
			b, err := reg.Binding("shop", nil)
			if err != nil {
				t.Fatal(err)
			}
			if b.DPoP != p.DPoP {
				t.Error("the binding's profile does not carry the provider's key")
			}
			ids[tc.name] = p.ID
			if tc.wantInput != "" {
				found := false
				for _, in := range reg.Inputs() {
					found = found || in.Kind == InputFile && in.Name == tc.wantInput
				}
				if !found {
					t.Errorf("inputs %v do not name %s", reg.Inputs(), tc.wantInput)
				}
			}
		})
	}
	// The ID follows the key, not where it is kept.
	if ids["relative path"] != ids["file reference"] || ids["relative path"] != ids["environment variable"] || ids["relative path"] != ids["path with a variable"] {
		t.Errorf("one key, several IDs: %v", ids)
	}
	if ids["relative path"] == ids["Ed25519"] || ids["Ed25519"] == ids["RSA"] {
		t.Errorf("different keys, one ID: %v", ids)
	}
	bearer, err := parse(path, []byte(oauthBase), env)
	if err != nil {
		t.Fatal(err)
	}
	if bearer.Providers["oneid"].ID == ids["relative path"] || bearer.Providers["oneid"].DPoP != nil {
		t.Error("a DPoP provider has the ID of its bearer twin, or the twin a key")
	}

	// A rotated key file: the registry's inputs changed, and the new
	// registry has another ID.
	reg, err := parse(path, []byte(strings.Replace(dpopBase, "@KEYREF@", "dpop-ec.pem", 1)), env)
	if err != nil {
		t.Fatal(err)
	}
	if Changed(reg.Inputs(), env) {
		t.Fatal("Changed with nothing changed")
	}
	writeDPoPKey(t, dir, "dpop-ec.pem", "ES256")
	if !Changed(reg.Inputs(), env) {
		t.Error("Changed misses the rotated key file")
	}
	rotated, err := parse(path, []byte(strings.Replace(dpopBase, "@KEYREF@", "dpop-ec.pem", 1)), env)
	if err != nil {
		t.Fatal(err)
	}
	if rotated.Providers["oneid"].ID == reg.Providers["oneid"].ID {
		t.Error("the ID did not follow the rotated key")
	}
}

// TestDPoPBadConfigs: a missing, unreadable or unfit key, an algorithm
// that does not fit, an unknown key in the table and a DPoP table on a
// nuapay provider are reported with file, line, entry and field.
func TestDPoPBadConfigs(t *testing.T) {
	dir := t.TempDir()
	writeDPoPKey(t, dir, "ec.pem", "ES256")
	if err := os.WriteFile(filepath.Join(dir, "junk.pem"), []byte("not a key"), 0o600); err != nil {
		t.Fatal(err)
	}
	p384, err := ecdsa.GenerateKey(elliptic.P384(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, _ := x509.MarshalPKCS8PrivateKey(p384)
	if err := os.WriteFile(filepath.Join(dir, "p384.pem"), pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der}), 0o600); err != nil {
		t.Fatal(err)
	}
	with := func(key string, extra ...string) string {
		s := strings.Replace(dpopBase, "@KEYREF@", key, 1)
		for _, x := range extra {
			s = strings.Replace(s, "  key =", x+"\n  key =", 1)
		}
		return s
	}
	const prov = `provider "oneid"`
	for _, tc := range []struct {
		name, toml        string
		line              int
		entry, field, msg string
	}{
		{"no key", with(""), 7, prov, "dpop.key", "missing: set the PEM private key"},
		{"PEM in clear", strings.Replace(dpopBase, `"@KEYREF@"`, `"""-----BEGIN PRIVATE KEY-----
AAAA
-----END PRIVATE KEY-----"""`, 1), 7, prov, "dpop.key", "holds PEM text in clear (not shown)"},
		{"no such file", with("nokey.pem"), 7, prov, "dpop.key", "nokey.pem: no such file"},
		{"no such file reference", with("{file.nokey.pem}"), 7, prov, "dpop.key", "cannot read the secret file"},
		{"variable unset", with("{env.NO_SUCH_VAR}"), 7, prov, "dpop.key", "environment variable NO_SUCH_VAR is not set"},
		{"not a key", with("junk.pem"), 7, prov, "dpop.key", "junk.pem: no PEM private key found"},
		{"P-384 key", with("p384.pem"), 7, prov, "dpop.key", "p384.pem: the EC key is on P-384: DPoP with ES256 needs a P-256 key"},
		{"alg does not fit", with("ec.pem", `  alg = "PS256"`), 7, prov, "dpop.alg", `algorithm PS256 does not fit the key, which is for ES256: set alg = "ES256"`},
		{"unknown alg", with("ec.pem", `  alg = "HS256"`), 7, prov, "dpop.alg", `unknown DPoP algorithm "HS256"`},
		{"unknown key", with("ec.pem", `  kid = "k1"`), 7, "", "", `unknown key "providers.oneid.dpop.kid"`},
		{"nuapay", badBase[:strings.Index(badBase, "[merchants")] + "  [providers.p.dpop]\n  key = \"ec.pem\"\n\n" + badBase[strings.Index(badBase, "[merchants"):], 6, `provider "p"`, "dpop", "not used by providers of type nuapay"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := parse(filepath.Join(dir, "merchants.toml"), []byte(tc.toml), testEnv())
			if err == nil {
				t.Fatal("Parse accepted the file")
			}
			if strings.Contains(err.Error(), "AAAA") || strings.Contains(err.Error(), "BEGIN") {
				t.Errorf("the error quotes the key: %v", err)
			}
			var found *Error
			for _, e := range unwrapAll(err) {
				if ce, ok := e.(*Error); ok && (tc.entry == "" || ce.Entry == tc.entry && ce.Field == tc.field) && strings.Contains(ce.Msg, tc.msg) {
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

// TestDPoPNonceHook: Options.OnDPoPNonce hears, by provider name, each
// nonce challenge a DPoP provider's token endpoint sends.
func TestDPoPNonceHook(t *testing.T) {
	gate := &dpoptest.Gate{Nonce: "n-1", Next: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, `{"access_token":"at","token_type":"DPoP","expires_in":60}`)
	})}
	srv := httptest.NewServer(gate)
	defer srv.Close()
	dir := t.TempDir()
	writeDPoPKey(t, dir, "dpop.pem", "EdDSA")
	toml := strings.Replace(strings.Replace(dpopBase, "@KEYREF@", "dpop.pem", 1), "https://api.oneid.example/v1/token", srv.URL+"/token", 1)
	var told []string
	reg, err := parseWith(filepath.Join(dir, "merchants.toml"), []byte(toml), Options{LookupEnv: testEnv(), OnDPoPNonce: func(p string) { told = append(told, p) }})
	if err != nil {
		t.Fatal(err)
	}
	b, err := reg.Binding("shop", nil)
	if err != nil {
		t.Fatal(err)
	}
	for range 2 {
		// A broker of its own each time: the second fetch is not served
		// from the first one's cache. Its attempts answer the challenge.
		br := broker.New(broker.Options{MaxAttempts: 1})
		e, _, err := br.Get(context.Background(), b)
		br.Close()
		if err != nil {
			t.Fatal(err)
		}
		if tok := e.Token(); tok.Type != "DPoP" {
			t.Fatalf("token type %q; want DPoP", tok.Type)
		}
	}
	if !slices.Equal(told, []string{"oneid"}) {
		t.Errorf("told %q, want one challenge of oneid", told)
	}
}
