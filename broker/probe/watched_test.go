package probe

import (
	"testing"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// TestWatchedOnceInOrder: a registry is watched once, in the order added.
func TestWatchedOnceInOrder(t *testing.T) {
	a, b := &config.Registry{Path: "a.toml"}, &config.Registry{Path: "b.toml"}
	var w Watched
	if got := w.Registries(); len(got) != 0 {
		t.Fatalf("empty: %d registries", len(got))
	}
	for _, reg := range []*config.Registry{a, b, a} {
		w.Add(reg, nil)
	}
	got := w.Registries()
	if len(got) != 2 || got[0].Registry != a || got[1].Registry != b || got[0].Listing != nil {
		t.Fatalf("Registries = %+v, want a then b, without listing", got)
	}
}
