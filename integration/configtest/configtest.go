// Package configtest loads merchants files for tests.
package configtest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// Load writes data to a file named name in a fresh folder and loads it
// with config.LoadWith.
func Load(tb testing.TB, name string, data []byte, opts config.Options) (*config.Registry, error) {
	tb.Helper()
	path := filepath.Join(tb.TempDir(), name)
	if err := os.WriteFile(path, data, 0o600); err != nil {
		tb.Fatal(err)
	}
	return config.LoadWith(path, opts)
}
