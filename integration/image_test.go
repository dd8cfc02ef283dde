package integration

import (
	"bytes"
	"debug/elf"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

// podmanOrSkip returns podman's path, installing Debian's podman when it
// is missing (as root, like `make tools`). Only when it cannot be
// installed is the test skipped, with the reason; under CI it fails.
func podmanOrSkip(t *testing.T) string {
	t.Helper()
	if p, err := exec.LookPath("podman"); err == nil {
		return p
	}
	var out []byte
	var err error
	if os.Geteuid() != 0 {
		out, err = []byte("not root"), exec.ErrNotFound
	} else {
		out, err = exec.Command("sh", "-c", "apt-get update && apt-get install -y podman").CombinedOutput()
	}
	if p, lerr := exec.LookPath("podman"); err == nil && lerr == nil {
		return p
	}
	msg := "podman is not installed and `apt-get install -y podman` failed (make tools installs it as root): " +
		err.Error() + "\n" + lastLines(string(out), 5)
	if os.Getenv("CI") != "" {
		t.Fatal(msg)
	}
	t.Skip(msg)
	return ""
}

func lastLines(s string, n int) string {
	lines := strings.Split(strings.TrimSpace(s), "\n")
	return strings.Join(lines[max(0, len(lines)-n):], "\n")
}

// TestMakeImage builds the scratch image with `make image` and podman, in a
// podman store of its own (vfs, so nothing stays mounted), and checks it the
// only ways this machine allows (containers cannot run here): its config
// (entrypoint, command, non-root user, exposed ports, Caddy's folders), and
// the files taken out of it with `podman create` and `podman cp`: a static
// Caddy that lists the broker's modules, and the build host's CA
// certificates.
func TestMakeImage(t *testing.T) {
	t.Parallel()
	podman := podmanOrSkip(t)
	dir := t.TempDir()
	store := []string{"--root", filepath.Join(dir, "storage"), "--runroot", filepath.Join(dir, "run"), "--storage-driver", "vfs"}
	const image = "localhost/caddy-token-broker:test"
	pm := func(args ...string) []byte {
		t.Helper()
		out, err := exec.Command(podman, append(slices.Clone(store), args...)...).CombinedOutput()
		if err != nil {
			t.Fatalf("podman %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		return out
	}

	cmd := exec.Command("make", "image", "BIN="+filepath.Join(dir, "bin"), "IMAGE="+image,
		"PODMAN="+podman+" "+strings.Join(store, " "))
	cmd.Dir = repoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make image: %v\n%s", err, out)
	}

	var inspect []struct {
		Config struct {
			User         string
			ExposedPorts map[string]struct{}
			Env          []string
			Entrypoint   []string
			Cmd          []string
		}
	}
	if err := json.Unmarshal(pm("image", "inspect", image), &inspect); err != nil || len(inspect) != 1 {
		t.Fatalf("podman image inspect: %v (%d images)", err, len(inspect))
	}
	cfg := inspect[0].Config
	for _, c := range []struct {
		what      string
		got, want any
	}{
		{"entrypoint", cfg.Entrypoint, []string{"/usr/bin/caddy"}},
		{"command", cfg.Cmd, []string{"run", "--config", "/etc/caddy/Caddyfile", "--adapter", "caddyfile"}},
		{"user", cfg.User, "65532:65532"},
		{"exposed ports", slices.Sorted(func(yield func(string) bool) {
			for p := range cfg.ExposedPorts {
				if !yield(p) {
					return
				}
			}
		}), []string{"8080/tcp", "8558/tcp"}},
		{"XDG_DATA_HOME", slices.Contains(cfg.Env, "XDG_DATA_HOME=/data"), true},
		{"XDG_CONFIG_HOME", slices.Contains(cfg.Env, "XDG_CONFIG_HOME=/config"), true},
	} {
		if g, w := jsonOf(c.got), jsonOf(c.want); g != w {
			t.Errorf("image %s: %s, want %s", c.what, g, w)
		}
	}

	id := strings.TrimSpace(string(pm("create", image)))
	defer pm("rm", id)
	caddy, certs := filepath.Join(dir, "caddy"), filepath.Join(dir, "ca-certificates.crt")
	pm("cp", id+":/usr/bin/caddy", caddy)
	pm("cp", id+":/etc/ssl/certs/ca-certificates.crt", certs)

	f, err := elf.Open(caddy)
	if err != nil {
		t.Fatal(err)
	}
	for _, p := range f.Progs {
		if p.Type == elf.PT_INTERP {
			t.Error("the image's caddy is dynamically linked: scratch has no libc (build it with CGO_ENABLED=0)")
		}
	}
	f.Close()
	out, err := exec.Command(caddy, "list-modules").CombinedOutput()
	if err != nil {
		t.Fatalf("caddy list-modules from the image: %v\n%s", err, out)
	}
	for _, mod := range []string{"http.handlers.token_broker", "token_broker"} {
		if !slices.Contains(strings.Fields(string(out)), mod) {
			t.Errorf("the image's caddy does not list %s", mod)
		}
	}
	got, err := os.ReadFile(certs)
	if err != nil {
		t.Fatal(err)
	}
	want, err := os.ReadFile("/etc/ssl/certs/ca-certificates.crt")
	if err != nil {
		t.Fatal(err)
	}
	if len(got) == 0 || !bytes.Equal(got, want) {
		t.Errorf("the image's CA certificates (%d bytes) are not the build host's (%d bytes)", len(got), len(want))
	}
}

func jsonOf(v any) string {
	b, _ := json.Marshal(v)
	return string(b)
}
