package integration

import (
	"bytes"
	"encoding/json"
	"flag"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"
)

var update = flag.Bool("update", false, "rewrite the adapt golden files from the current Caddyfiles")

// separator divides a .caddyfiletest fixture into Caddyfile and JSON, as in
// Caddy's own caddytest/integration fixtures.
const separator = "\n----------\n"

// TestAdaptRepositoryCaddyfiles adapts every Caddyfile of the repository
// and compares the JSON with its golden fixture in testdata/adapt. Run
// `go test ./integration -run TestAdapt -update` after changing one on purpose.
func TestAdaptRepositoryCaddyfiles(t *testing.T) {
	for _, env := range []string{"TOKEN_BROKER_PORT", "TOKEN_BROKER_ADMIN_PORT", "TOKEN_BROKER_CONFIG", "SANDBOX_URL",
		"NUAPAY_API", "PARTNER_API", "PARTNER_API_HOST", "QWAC_CERT", "QWAC_KEY", "PARTNER_CA_FILE", "ONEID_API", "BANK_API", "CONSENT_SITE", "SANDBOX_CONSENT_SITE"} {
		t.Setenv(env, "") // the Caddyfiles' defaults, whatever this shell has
		os.Unsetenv(env)
	}
	root := repoRoot(t)
	files, _ := filepath.Glob(filepath.Join(root, "examples", "*", "Caddyfile"))
	files = append([]string{filepath.Join(root, "Caddyfile")}, files...)
	for _, f := range files {
		rel, _ := filepath.Rel(root, f)
		t.Run(rel, func(t *testing.T) {
			golden := filepath.Join(root, "integration", "testdata", "adapt", strings.ReplaceAll(filepath.Dir(rel), string(filepath.Separator), "_")+".caddyfiletest")
			checkAdapt(t, rel, readFile(t, f), golden)
		})
	}
}

// TestAdaptFixtures checks the directive's syntax variants kept as fixtures.
func TestAdaptFixtures(t *testing.T) {
	files, _ := filepath.Glob(filepath.Join(repoRoot(t), "integration", "testdata", "adapt", "directive_*.caddyfiletest"))
	if len(files) == 0 {
		t.Fatal("no directive fixtures")
	}
	for _, f := range files {
		t.Run(filepath.Base(f), func(t *testing.T) {
			caddyfile, _, _ := strings.Cut(readFile(t, f), separator)
			checkAdapt(t, filepath.Base(f), caddyfile, f)
		})
	}
}

func checkAdapt(t *testing.T, name, caddyfile, golden string) {
	t.Helper()
	out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": name})
	if err != nil {
		t.Fatalf("adapting %s: %v", name, err)
	}
	var pretty bytes.Buffer
	if err := json.Indent(&pretty, out, "", "\t"); err != nil {
		t.Fatal(err)
	}
	want := caddyfile + separator + pretty.String() + "\n"
	if *update {
		if err := os.WriteFile(golden, []byte(want), 0o644); err != nil {
			t.Fatal(err)
		}
		return
	}
	got := readFile(t, golden)
	if got != want {
		t.Fatalf("%s: adapted config differs from %s (run with -update if the change is intended)\n--- want\n%s\n--- got\n%s", name, golden, got, want)
	}
}

// httpConfig is the part of a Caddy JSON config that
// TestREADMEJSONProxiesAsTheCaddyfile compares.
type httpConfig struct {
	Apps struct {
		HTTP struct {
			Servers map[string]struct {
				Listen []string `json:"listen"`
				Routes []struct {
					Handle []map[string]json.RawMessage `json:"handle"`
				} `json:"routes"`
			} `json:"servers"`
		} `json:"http"`
	} `json:"apps"`
}

// reverseProxy returns the last reverse_proxy handler of server srv0 and
// the addresses srv0 listens on.
func (c httpConfig) reverseProxy() (map[string]json.RawMessage, []string) {
	srv := c.Apps.HTTP.Servers["srv0"]
	var rp map[string]json.RawMessage
	for _, r := range srv.Routes {
		for _, h := range r.Handle {
			if string(h["handler"]) == `"reverse_proxy"` {
				rp = h
			}
		}
	}
	return rp, srv.Listen
}

// TestREADMEJSONProxiesAsTheCaddyfile: the README's JSON config listens
// and proxies to the provider as the Caddyfile `http://:8080 { bind
// 127.0.0.1; reverse_proxy https://sandbox.nuapay.com }` does: the same
// address, the same upstream, over TLS.
func TestREADMEJSONProxiesAsTheCaddyfile(t *testing.T) {
	var readme, caddyfile httpConfig
	if err := json.Unmarshal([]byte(readmeBlock(t, filepath.Join(repoRoot(t), "README.md"), "json")), &readme); err != nil {
		t.Fatalf("the README's JSON config: %v", err)
	}
	adapted, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte("http://:8080 {\n\tbind 127.0.0.1\n\treverse_proxy https://sandbox.nuapay.com\n}\n"), nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(adapted, &caddyfile); err != nil {
		t.Fatal(err)
	}
	got, gotListen := readme.reverseProxy()
	want, wantListen := caddyfile.reverseProxy()
	if !slices.Equal(gotListen, wantListen) {
		t.Errorf("the README's server listens on %q; want %q", gotListen, wantListen)
	}
	for _, field := range []string{"upstreams", "transport"} {
		if g, w := compactJSON(t, got[field]), compactJSON(t, want[field]); g != w {
			t.Errorf("the README's reverse_proxy %s: %s; want %s", field, g, w)
		}
	}
}

// compactJSON is raw without insignificant white space.
func compactJSON(t *testing.T, raw json.RawMessage) string {
	t.Helper()
	var b bytes.Buffer
	if len(raw) > 0 {
		if err := json.Compact(&b, raw); err != nil {
			t.Fatal(err)
		}
	}
	return b.String()
}
