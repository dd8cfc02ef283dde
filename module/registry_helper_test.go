package module

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// loadTestRegistry writes data to a file named name in a fresh folder and
// loads it with config.LoadWith.
func loadTestRegistry(tb testing.TB, name string, data []byte, opts config.Options) (*config.Registry, error) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		tb.Fatal(err)
	}
	return config.LoadWith(path, opts)
}
