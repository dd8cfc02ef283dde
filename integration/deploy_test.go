package integration

import (
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// healthSite is the probes' site of the Kubernetes Caddyfiles.
var healthSite = regexp.MustCompile(`(?m)^http://:\d+ \{\n\ttoken_broker_health\n\}\n?`)

// TestKubernetesConfig checks what the ConfigMap of deploy/kubernetes
// carries (the manifests themselves are decoded by that folder's own Go
// module): each overlay's Caddyfile adapts, and the registry loads with
// its {file.…} secrets where the Secret is mounted (here a folder of test
// files in its place).
func TestKubernetesConfig(t *testing.T) {
	root := filepath.Join(repoRoot(t), "deploy", "kubernetes")
	for _, overlay := range []string{"base", "fleet"} {
		t.Run(overlay+"/Caddyfile", func(t *testing.T) {
			caddyfile := readFile(t, filepath.Join(root, overlay, "Caddyfile"))
			if !healthSite.MatchString(caddyfile) {
				t.Fatal("no health site (http://:PORT { token_broker_health }) for the probes")
			}
			adapt := func(caddyfile string) ([]byte, []caddyconfig.Warning, error) {
				return caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": overlay + "/Caddyfile"})
			}
			out, warnings, err := adapt(caddyfile)
			if err != nil && strings.Contains(err.Error(), "unrecognized directive: token_broker_health") {
				// A build without the health handler: adapt the rest.
				t.Logf("%v: adapting without the health site", err)
				out, warnings, err = adapt(healthSite.ReplaceAllString(caddyfile, ""))
			}
			if err != nil {
				t.Fatalf("adapting: %v", err)
			}
			if len(warnings) > 0 {
				t.Errorf("adapt warnings: %v", warnings)
			}
			for _, want := range []string{`"handler":"token_broker"`, `"config":"/etc/caddy/merchants.toml"`} {
				if !strings.Contains(string(out), want) {
					t.Errorf("the adapted config has no %s", want)
				}
			}
			if overlay == "fleet" && !strings.Contains(string(out), `"redis":{`) {
				t.Error("the fleet's adapted config has no redis tier")
			}
		})
	}

	t.Run("base/merchants.toml", func(t *testing.T) {
		const mount = "/run/secrets/token-broker/"
		toml := readFile(t, filepath.Join(root, "base", "merchants.toml"))
		secrets := t.TempDir()
		for _, m := range regexp.MustCompile(`\{file\.`+regexp.QuoteMeta(mount)+`([^}]+)\}`).FindAllStringSubmatch(toml, -1) {
			// As a Secret mounts them: the value, often with a newline.
			if err := os.WriteFile(filepath.Join(secrets, m[1]), []byte("test-"+m[1]+"\n"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		path := filepath.Join(t.TempDir(), "merchants.toml")
		if err := os.WriteFile(path, []byte(strings.ReplaceAll(toml, mount, secrets+"/")), 0o600); err != nil {
			t.Fatal(err)
		}
		reg, err := config.LoadWith(path, config.Options{})
		if err != nil {
			t.Fatalf("the registry of the ConfigMap does not load: %v", err)
		}
		for _, id := range []string{"acme", "globex", "partner"} {
			if _, _, ok := reg.Merchant(id); !ok {
				t.Errorf("merchant %s is not in the registry", id)
			}
		}
	})
}
