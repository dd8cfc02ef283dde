package integration

import (
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMakeXcaddy builds a Caddy with this plugin the way other users do,
// through `make xcaddy` (xcaddy, pinned as a go tool), and checks that it
// lists the broker's modules.
func TestMakeXcaddy(t *testing.T) {
	t.Parallel()
	bin := t.TempDir()
	cmd := exec.Command("make", "xcaddy", "BIN="+bin)
	cmd.Dir = repoRoot(t)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make xcaddy: %v\n%s", err, out)
	}
	out, err := exec.Command(filepath.Join(bin, "caddy-xcaddy"), "list-modules").CombinedOutput()
	if err != nil {
		t.Fatalf("list-modules: %v\n%s", err, out)
	}
	for _, id := range []string{"http.handlers.token_broker", "token_broker"} {
		found := false
		for _, line := range strings.Split(string(out), "\n") {
			if strings.TrimSpace(line) == id {
				found = true
			}
		}
		if !found {
			t.Errorf("list-modules does not list %s", id)
		}
	}
}
