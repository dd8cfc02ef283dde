package bindings

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// loadRegistry loads a registry of one Nuapay provider and merchants a
// and b.
func loadRegistry(t *testing.T) *config.Registry {
	t.Helper()
	path := filepath.Join(t.TempDir(), "merchants.toml")
	reg := "[providers.np]\ntype = \"nuapay\"\nbase_url = \"http://127.0.0.1:1\"\napi_key = \"{env.K}\"\n" +
		"\n[merchants.a]\nprovider = \"np\"\norganisation = \"org-a\"\nscopes = [\"s\"]\n" +
		"\n[merchants.b]\nprovider = \"np\"\norganisation = \"org-b\"\nscopes = [\"s\"]\n"
	if err := os.WriteFile(path, []byte(reg), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := config.LoadWith(path, config.Options{LookupEnv: func(string) (string, bool) { return "key", true }})
	if err != nil {
		t.Fatal(err)
	}
	return r
}

// Bindings finds a merchant's bindings in the tables of its registry,
// those of its own scopes first, and none of a merchant not served yet or
// of another registry.
func TestTablesBindings(t *testing.T) {
	reg, other := loadRegistry(t), loadRegistry(t)
	var ts Tables
	scoped := ts.Table(reg, []string{"x"}, nil)
	own := ts.Table(reg, nil, nil)
	elsewhere := ts.Table(other, nil, nil)
	for _, step := range []struct {
		tbl *Table
		id  string
	}{{scoped, "a"}, {own, "a"}, {elsewhere, "b"}} {
		if _, err := step.tbl.Get(step.id, &hooks{}); err != nil {
			t.Fatal(err)
		}
	}
	scopes := func(bs []*Binding) [][]string {
		var out [][]string
		for _, b := range bs {
			out = append(out, b.Scopes)
		}
		return out
	}
	tests := []struct {
		reg  *config.Registry
		id   string
		want [][]string
	}{
		{reg, "a", [][]string{{"s"}, {"x"}}},
		{reg, "b", nil},
		{other, "b", [][]string{{"s"}}},
		{other, "a", nil},
	}
	for _, tt := range tests {
		if got := scopes(ts.Bindings(tt.reg, tt.id)); !slices.EqualFunc(got, tt.want, slices.Equal) {
			t.Errorf("Bindings(%s) = %v, want %v", tt.id, got, tt.want)
		}
	}
}

// TestTablesSameScopes: routes whose scopes are the same set, in any
// order or repeated, share one table (and so one wildcard active set).
func TestTablesSameScopes(t *testing.T) {
	reg := loadRegistry(t)
	var ts Tables
	first := ts.Table(reg, []string{"b", "a"}, nil)
	for _, scopes := range [][]string{{"a", "b"}, {"b", "a", "b"}, {" a", "b"}} {
		if got := ts.Table(reg, scopes, nil); got != first {
			t.Errorf("scopes %q got a table of their own, want the one of [b a]", scopes)
		}
	}
	if ts.Table(reg, []string{"a"}, nil) == first {
		t.Error("scopes [a] share the table of [a b]")
	}
}
