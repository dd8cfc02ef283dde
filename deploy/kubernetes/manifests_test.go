// Package kubernetes holds the tests of the Kubernetes manifests of this
// folder: a module of its own, so that the product's go.mod does not depend
// on the Kubernetes API.
package kubernetes

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"

	appsv1 "k8s.io/api/apps/v1"
	corev1 "k8s.io/api/core/v1"
	networkingv1 "k8s.io/api/networking/v1"
	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/apimachinery/pkg/util/intstr"
	kjson "sigs.k8s.io/json"
	"sigs.k8s.io/kustomize/api/krusty"
	"sigs.k8s.io/kustomize/api/types"
	"sigs.k8s.io/kustomize/kyaml/filesys"
	"sigs.k8s.io/yaml"
)

// overlays are the folders `kubectl apply -k` takes.
var overlays = []string{"base", "fleet"}

// object is one decoded manifest.
type object struct {
	kind, name string
	v          any // *appsv1.Deployment, *corev1.Service, ...
}

// decodeStrict decodes one YAML document into the Kubernetes API type of
// its apiVersion and kind; an unknown field, a duplicate field, a wrong
// type or an unknown kind is an error.
func decodeStrict(doc []byte) (object, error) {
	var tm struct {
		APIVersion string `json:"apiVersion"`
		Kind       string `json:"kind"`
		Metadata   struct {
			Name string `json:"name"`
		} `json:"metadata"`
	}
	if err := yaml.Unmarshal(doc, &tm); err != nil {
		return object{}, err
	}
	var v any
	switch tm.APIVersion + " " + tm.Kind {
	case "apps/v1 Deployment":
		v = &appsv1.Deployment{}
	case "v1 Service":
		v = &corev1.Service{}
	case "v1 ConfigMap":
		v = &corev1.ConfigMap{}
	case "v1 Secret":
		v = &corev1.Secret{}
	case "networking.k8s.io/v1 NetworkPolicy":
		v = &networkingv1.NetworkPolicy{}
	default:
		return object{}, fmt.Errorf("%s %s: a kind this test does not know; add it", tm.APIVersion, tm.Kind)
	}
	if err := unmarshalStrict(doc, v); err != nil {
		return object{}, fmt.Errorf("%s %q: %w", tm.Kind, tm.Metadata.Name, err)
	}
	return object{kind: tm.Kind, name: tm.Metadata.Name, v: v}, nil
}

// unmarshalStrict decodes YAML as the API server decodes a manifest
// (sigs.k8s.io/json, case-sensitive): a field it does not know, a field in
// the wrong case (encoding/json would accept readOnlyRootFileSystem), a
// duplicate field or a wrong type is an error.
func unmarshalStrict(doc []byte, v any) error {
	j, err := yaml.YAMLToJSONStrict(doc)
	if err != nil {
		return err
	}
	strict, err := kjson.UnmarshalStrict(j, v, kjson.DisallowDuplicateFields, kjson.DisallowUnknownFields)
	if err != nil {
		return err
	}
	return errors.Join(strict...)
}

// documents splits a multi-document YAML file.
func documents(b []byte) [][]byte {
	var docs [][]byte
	for _, d := range regexp.MustCompile(`(?m)^---\s*$`).Split(string(b), -1) {
		if strings.TrimSpace(stripComments(d)) != "" {
			docs = append(docs, []byte(d))
		}
	}
	return docs
}

func stripComments(s string) string {
	return regexp.MustCompile(`(?m)^\s*#.*$`).ReplaceAllString(s, "")
}

// build renders an overlay as `kubectl apply -k` would and decodes every
// object strictly.
func build(t *testing.T, dir string) []object {
	t.Helper()
	m, err := krusty.MakeKustomizer(krusty.MakeDefaultOptions()).Run(filesys.MakeFsOnDisk(), dir)
	if err != nil {
		t.Fatalf("kustomize build %s: %v", dir, err)
	}
	var objs []object
	for _, r := range m.Resources() {
		b, err := r.AsYAML()
		if err != nil {
			t.Fatal(err)
		}
		o, err := decodeStrict(b)
		if err != nil {
			t.Fatalf("%s: %v", dir, err)
		}
		objs = append(objs, o)
	}
	return objs
}

func find[T any](t *testing.T, objs []object, name string) T {
	t.Helper()
	for _, o := range objs {
		if v, ok := o.v.(T); ok && o.name == name {
			return v
		}
	}
	var zero T
	t.Fatalf("no %T named %q", zero, name)
	return zero
}

// findPrefix is find for generated names (a ConfigMap gets a hash suffix).
func findPrefix[T any](t *testing.T, objs []object, prefix string) (T, string) {
	t.Helper()
	for _, o := range objs {
		if v, ok := o.v.(T); ok && strings.HasPrefix(o.name, prefix) {
			return v, o.name
		}
	}
	var zero T
	t.Fatalf("no %T named %q...", zero, prefix)
	return zero, ""
}

// TestManifestFilesDecodeStrictly decodes every YAML file of the folder on
// its own (the Secret example too, which no overlay applies): each against
// its Kubernetes API type, kustomization.yaml against kustomize's.
func TestManifestFilesDecodeStrictly(t *testing.T) {
	files, err := filepath.Glob("*/*.yaml")
	if err != nil || len(files) == 0 {
		t.Fatalf("no manifests found: %v", err)
	}
	for _, f := range files {
		t.Run(f, func(t *testing.T) {
			b, err := os.ReadFile(f)
			if err != nil {
				t.Fatal(err)
			}
			if filepath.Base(f) == "kustomization.yaml" {
				var k types.Kustomization
				if err := unmarshalStrict(b, &k); err != nil {
					t.Fatalf("%s: %v", f, err)
				}
				return
			}
			docs := documents(b)
			if len(docs) == 0 {
				t.Fatalf("%s holds no object", f)
			}
			for _, d := range docs {
				if _, err := decodeStrict(d); err != nil {
					t.Errorf("%s: %v", f, err)
				}
			}
		})
	}
}

// TestStrictDecodingRefusesMistakes: the decoding above would catch a
// misspelt field, a field at the wrong level and a wrong type.
func TestStrictDecodingRefusesMistakes(t *testing.T) {
	src, err := os.ReadFile("base/deployment.yaml")
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, old, new, want string }{
		{"misspelt field", "readOnlyRootFilesystem: true", "readOnlyRootFileSystem: true", `unknown field "spec.template.spec.containers[1].securityContext.readOnlyRootFileSystem"`},
		{"field at the wrong level", "      securityContext:\n        runAsNonRoot: true\n        runAsUser: 65532",
			"      securityContext:\n        runAsNonRoot: true\n        readOnlyRootFilesystem: true\n        runAsUser: 65532", `unknown field "spec.template.spec.securityContext.readOnlyRootFilesystem"`},
		{"wrong type", "containerPort: 8558", "containerPort: health", "cannot unmarshal"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if !bytes.Contains(src, []byte(tc.old)) {
				t.Fatalf("base/deployment.yaml no longer contains %q: update the test", tc.old)
			}
			_, err := decodeStrict(bytes.Replace(src, []byte(tc.old), []byte(tc.new), 1))
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("decoding = %v, want an error with %q", err, tc.want)
			}
		})
	}
}

// sidecar returns the token broker's container of the app's Deployment.
func sidecar(t *testing.T, d *appsv1.Deployment) *corev1.Container {
	t.Helper()
	for i, c := range d.Spec.Template.Spec.Containers {
		if c.Name == "token-broker" {
			return &d.Spec.Template.Spec.Containers[i]
		}
	}
	t.Fatal("the Deployment has no token-broker container")
	return nil
}

// mountOf returns where the container mounts the volume that matches.
func mountOf(t *testing.T, pod *corev1.PodSpec, c *corev1.Container, match func(corev1.Volume) bool) string {
	t.Helper()
	for _, v := range pod.Volumes {
		if match(v) {
			for _, m := range c.VolumeMounts {
				if m.Name == v.Name {
					return m.MountPath
				}
			}
		}
	}
	return ""
}

// memLimits from BENCHMARKS.md: the largest idle RSS (100 000 merchants,
// after a reload: 88 MiB) and the largest RSS with 100 000 warm tokens
// measured (271 MiB).
var (
	idleRSS = resource.MustParse("88Mi")
	warmRSS = resource.MustParse("271Mi")
)

// TestSidecarDeployment checks, in each overlay as applied, what the
// sidecar needs: the app and the sidecar in one pod, the Caddyfile and the
// registry from the generated ConfigMap, every secret file the registry
// and the Caddyfile name mounted from the Secret, a non-root read-only
// container with Caddy's folders on a writable volume, resources that
// cover the measured memory, and probes on the health site's port.
func TestSidecarDeployment(t *testing.T) {
	secretExample, err := os.ReadFile("base/secret.example.yaml")
	if err != nil {
		t.Fatal(err)
	}
	ex, err := decodeStrict(secretExample)
	if err != nil {
		t.Fatal(err)
	}
	secretKeys := ex.v.(*corev1.Secret).StringData
	for _, dir := range overlays {
		t.Run(dir, func(t *testing.T) {
			objs := build(t, dir)
			d := find[*appsv1.Deployment](t, objs, "partner-app")
			pod := &d.Spec.Template.Spec
			c := sidecar(t, d)
			if len(pod.Containers) != 2 || pod.HostNetwork {
				t.Errorf("want the app and the sidecar in one pod on the pod's own network, got %d containers, hostNetwork %v", len(pod.Containers), pod.HostNetwork)
			}

			// Config from the generated ConfigMap.
			cm, cmName := findPrefix[*corev1.ConfigMap](t, objs, "token-broker-config")
			confDir := mountOf(t, pod, c, func(v corev1.Volume) bool { return v.ConfigMap != nil && v.ConfigMap.Name == cmName })
			if confDir == "" {
				t.Fatalf("the sidecar does not mount the ConfigMap %s", cmName)
			}
			i := slices.Index(c.Args, "--config")
			if i < 0 || i+1 >= len(c.Args) || filepath.Dir(c.Args[i+1]) != confDir || cm.Data[filepath.Base(c.Args[i+1])] == "" {
				t.Errorf("caddy's --config %v is not a file of the mounted ConfigMap (%s)", c.Args, confDir)
			}
			caddyfile := cm.Data["Caddyfile"]
			reg := regexp.MustCompile(`(?m)^\s*config\s+(\S+)`).FindStringSubmatch(caddyfile)
			if reg == nil || filepath.Dir(reg[1]) != confDir || cm.Data[filepath.Base(reg[1])] == "" {
				t.Errorf("the token_broker registry (%v) is not a file of the mounted ConfigMap", reg)
			}

			// Secrets as files.
			secDir := mountOf(t, pod, c, func(v corev1.Volume) bool {
				return v.Secret != nil && v.Secret.SecretName == "token-broker-secrets"
			})
			refs := regexp.MustCompile(`\{file\.([^}]+)\}`).FindAllStringSubmatch(caddyfile+cm.Data["merchants.toml"], -1)
			if secDir == "" || len(refs) == 0 {
				t.Fatalf("want secrets as {file.…} references to the mounted Secret (mounted at %q, %d references)", secDir, len(refs))
			}
			for _, r := range refs {
				if filepath.Dir(r[1]) != secDir {
					t.Errorf("{file.%s} is not in the Secret's mount %s", r[1], secDir)
				}
				if _, ok := secretKeys[filepath.Base(r[1])]; !ok {
					t.Errorf("{file.%s}: key %s is not in secret.example.yaml", r[1], filepath.Base(r[1]))
				}
			}
			if strings.Contains(cm.Data["merchants.toml"], "{env.") {
				t.Error("the registry takes a secret from the environment; use the Secret's files")
			}

			// Non-root, read-only, no privileges.
			sc, psc := c.SecurityContext, pod.SecurityContext
			switch {
			case sc == nil || sc.ReadOnlyRootFilesystem == nil || !*sc.ReadOnlyRootFilesystem:
				t.Error("the sidecar's root file system is not read-only")
			case sc.AllowPrivilegeEscalation == nil || *sc.AllowPrivilegeEscalation:
				t.Error("the sidecar allows privilege escalation")
			case sc.Capabilities == nil || !slices.Contains(sc.Capabilities.Drop, "ALL") || len(sc.Capabilities.Add) > 0:
				t.Error("the sidecar does not drop ALL capabilities")
			case (sc.RunAsNonRoot == nil || !*sc.RunAsNonRoot) && (psc == nil || psc.RunAsNonRoot == nil || !*psc.RunAsNonRoot):
				t.Error("the sidecar may run as root")
			}
			for _, env := range []string{"XDG_DATA_HOME", "XDG_CONFIG_HOME"} {
				i := slices.IndexFunc(c.Env, func(e corev1.EnvVar) bool { return e.Name == env })
				state := mountOf(t, pod, c, func(v corev1.Volume) bool { return v.EmptyDir != nil })
				if i < 0 || state == "" || !strings.HasPrefix(c.Env[i].Value, state+"/") {
					t.Errorf("%s is not on the writable volume (%q)", env, state)
				}
			}

			// Resources from the measured RSS.
			req, lim := c.Resources.Requests.Memory(), c.Resources.Limits.Memory()
			if req.Cmp(idleRSS) < 0 || lim.Cmp(warmRSS) <= 0 {
				t.Errorf("memory request %s, limit %s: want a request of at least the idle RSS %s and a limit above the warm RSS %s (BENCHMARKS.md)",
					req, lim, &idleRSS, &warmRSS)
			}
			if c.Resources.Requests.Cpu().IsZero() || c.Resources.Limits.Cpu().IsZero() {
				t.Error("want a CPU request and limit")
			}

			// Probes on the health site of the Caddyfile.
			port := regexp.MustCompile(`(?m)^http://:(\d+) \{\n\ttoken_broker_health\n\}`).FindStringSubmatch(caddyfile)
			if port == nil {
				t.Fatal("the Caddyfile has no health site (http://:PORT { token_broker_health })")
			}
			for _, p := range []struct {
				probe *corev1.Probe
				path  string
			}{{c.ReadinessProbe, "/ready"}, {c.LivenessProbe, "/live"}} {
				if p.probe == nil || p.probe.HTTPGet == nil || p.probe.HTTPGet.Path != p.path {
					t.Errorf("want an httpGet probe on %s", p.path)
					continue
				}
				if got := containerPort(c, p.probe.HTTPGet.Port); fmt.Sprint(got) != port[1] {
					t.Errorf("the %s probe goes to port %d, the health site listens on %s", p.path, got, port[1])
				}
			}
		})
	}
}

func containerPort(c *corev1.Container, p intstr.IntOrString) int32 {
	if p.Type == intstr.Int {
		return p.IntVal
	}
	for _, cp := range c.Ports {
		if cp.Name == p.StrVal {
			return cp.ContainerPort
		}
	}
	return 0
}

// TestFleetOverlay: several replicas whose sidecars share a Redis reached
// through its Service, with the encryption key from the Secret, and only
// the app's pods allowed to reach Redis.
func TestFleetOverlay(t *testing.T) {
	objs := build(t, "fleet")
	d := find[*appsv1.Deployment](t, objs, "partner-app")
	if d.Spec.Replicas == nil || *d.Spec.Replicas < 2 {
		t.Errorf("fleet replicas %v, want several", d.Spec.Replicas)
	}
	redis := find[*appsv1.Deployment](t, objs, "redis")
	svc := find[*corev1.Service](t, objs, "redis")
	for k, v := range svc.Spec.Selector {
		if redis.Spec.Template.Labels[k] != v {
			t.Errorf("the redis Service does not select the redis pods (%s=%s)", k, v)
		}
	}
	cm, _ := findPrefix[*corev1.ConfigMap](t, objs, "token-broker-config")
	m := regexp.MustCompile(`(?m)^\s*address\s+(\S+):(\d+)\s*$`).FindStringSubmatch(cm.Data["Caddyfile"])
	if m == nil || m[1] != svc.Name || len(svc.Spec.Ports) != 1 || fmt.Sprint(svc.Spec.Ports[0].Port) != m[2] {
		t.Errorf("the Caddyfile's redis address %v is not the Service %s:%v", m, svc.Name, svc.Spec.Ports)
	}
	if !strings.Contains(cm.Data["Caddyfile"], "encryption_key {file.") {
		t.Error("the redis encryption key is not read from the Secret")
	}
	if cm.Data["merchants.toml"] == "" {
		t.Error("the fleet's ConfigMap lost the registry of the base")
	}
	np := find[*networkingv1.NetworkPolicy](t, objs, "redis")
	if len(np.Spec.Ingress) != 1 || len(np.Spec.Ingress[0].From) != 1 ||
		np.Spec.Ingress[0].From[0].PodSelector.MatchLabels["app.kubernetes.io/name"] != d.Spec.Template.Labels["app.kubernetes.io/name"] {
		t.Errorf("the NetworkPolicy does not limit Redis to the app's pods: %+v", np.Spec.Ingress)
	}
}
