package integration

import (
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2"
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
		reg, err := config.LoadWith(kubernetesRegistry(t, root), config.Options{})
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

// kubernetesRegistry writes the registry of deploy/kubernetes/base (root)
// to a temporary folder with its {file.…} secrets in a folder of test
// files, as the Secret mounts them, and returns its path.
func kubernetesRegistry(t *testing.T, root string) string {
	t.Helper()
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
	return path
}

// TestKubernetesSidecarServesLoopbackNames runs the sidecar site of
// deploy/kubernetes/base's Caddyfile (its ports and registry path moved to
// free ones and a test registry) and calls it as the pod's app may, by
// 127.0.0.1 or by localhost: each call reaches the broker (here 400
// missing_merchant, no merchant header), never Caddy's empty 200 for a
// request that no site matched, which an app would take for the
// upstream's answer; another Host gets the broker's 421.
func TestKubernetesSidecarServesLoopbackNames(t *testing.T) {
	root := filepath.Join(repoRoot(t), "deploy", "kubernetes")
	port, health, admin := freePort(t), freePort(t), freePort(t)
	caddyfile := strings.NewReplacer(
		"127.0.0.1:8080", fmt.Sprintf("127.0.0.1:%d", port),
		":8080 {", fmt.Sprintf(":%d {", port),
		"http://:8558", fmt.Sprintf("http://127.0.0.1:%d", health),
		"127.0.0.1:2019", fmt.Sprintf("127.0.0.1:%d", admin),
		"/etc/caddy/merchants.toml", kubernetesRegistry(t, root),
	).Replace(readFile(t, filepath.Join(root, "base", "Caddyfile")))
	loadCaddy(t, caddyfile)
	t.Cleanup(func() {
		if err := caddy.Stop(); err != nil {
			t.Errorf("stopping caddy: %v", err)
		}
	})
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", port))

	for _, tc := range []struct {
		host   string
		status int
		code   string
	}{
		{fmt.Sprintf("127.0.0.1:%d", port), http.StatusBadRequest, "missing_merchant"},
		{fmt.Sprintf("localhost:%d", port), http.StatusBadRequest, "missing_merchant"},
		{"localhost", http.StatusBadRequest, "missing_merchant"},
		{"sidecar.example.com", http.StatusMisdirectedRequest, "host_not_allowed"},
	} {
		req, err := http.NewRequest(http.MethodGet, fmt.Sprintf("http://127.0.0.1:%d/tpp/payments", port), nil)
		if err != nil {
			t.Fatal(err)
		}
		req.Host = tc.host
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != tc.status || !strings.Contains(string(body), `"`+tc.code+`"`) {
			t.Errorf("Host %s: %d %q; want %d %s from the broker", tc.host, resp.StatusCode, body, tc.status, tc.code)
		}
	}
}
