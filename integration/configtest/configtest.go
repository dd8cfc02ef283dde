// Package configtest loads merchants files for tests.
package configtest

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// Load writes data to a file named name in a fresh folder and loads it
// with config.LoadWith. Each call is a new registry, at a new path, whose
// providers have new IDs (the path is part of them): to load one registry
// again, as a reload does, use Reloader.
func Load(tb testing.TB, name string, data []byte, opts config.Options) (*config.Registry, error) {
	tb.Helper()
	return Reloader(tb, name)(data, opts)
}

// Reloader returns a function that writes data to a file named name in a
// fresh folder, the same file at every call, and loads it with
// config.LoadWith: one registry, loaded again as a reload does after an
// edit (its providers keep their IDs while their settings do).
func Reloader(tb testing.TB, name string) func(data []byte, opts config.Options) (*config.Registry, error) {
	path := filepath.Join(tb.TempDir(), name)
	return func(data []byte, opts config.Options) (*config.Registry, error) {
		tb.Helper()
		if err := os.WriteFile(path, data, 0o600); err != nil {
			tb.Fatal(err)
		}
		return config.LoadWith(path, opts)
	}
}
