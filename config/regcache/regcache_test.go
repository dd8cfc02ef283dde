package regcache

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// writeSplitRegistry writes a registry of files files of n merchants each
// (the provider in the first one) into dir; org is the organisation
// prefix of the file at index changed.
func writeSplitRegistry(t *testing.T, dir string, files, n, changed int, org string) {
	t.Helper()
	for f := range files {
		var b strings.Builder
		if f == 0 {
			b.WriteString("[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"https://nuapay.example\"\napi_key = \"{env.REGCACHE_KEY}\"\n\n")
		}
		prefix := "org"
		if f == changed {
			prefix = org
		}
		for i := range n {
			fmt.Fprintf(&b, "[merchants.m%02d-%05d]\nprovider = \"nuapay\"\norganisation = \"%s-%d\"\nscopes = [\"pisp\"]\n\n", f, i, prefix, i)
		}
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("merchants-%02d.toml", f)), []byte(b.String()), 0o600); err != nil {
			t.Fatal(err)
		}
	}
}

// TestLoadSplitRegistry: a registry of 10 files of 1 000 merchants
// is parsed file by file; loading it again parses nothing and gives the
// same registry; after one file changes, a load parses that file only,
// and the providers are resolved to the same ID (cached tokens kept).
func TestLoadSplitRegistry(t *testing.T) {
	dir := t.TempDir()
	writeSplitRegistry(t, dir, 10, 1000, -1, "")
	opts := config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }}
	for _, pattern := range []string{dir, filepath.Join(dir, "merchants-*.toml")} {
		t.Run(filepath.Base(pattern), func(t *testing.T) {
			c := New()
			load := func(wantParses int) *config.Registry {
				t.Helper()
				reg, _, got, err := c.Load(pattern, opts, "store")
				if err != nil {
					t.Fatal(err)
				}
				if got != wantParses {
					t.Fatalf("%d files parsed, want %d", got, wantParses)
				}
				if len(reg.Merchants) != 10_000 || len(reg.Files) != 10 {
					t.Fatalf("%d merchants in %d files", len(reg.Merchants), len(reg.Files))
				}
				return reg
			}
			first := load(10)
			if again := load(0); again != first {
				t.Fatal("an unchanged registry was not reused")
			}
			writeSplitRegistry(t, dir, 10, 1000, 3, "new")
			t.Cleanup(func() { writeSplitRegistry(t, dir, 10, 1000, -1, "") })
			changed := load(1)
			if got := changed.Merchants["m03-00007"].Organisation; got != "new-7" {
				t.Fatalf("changed merchant's organisation %q", got)
			}
			if changed.Merchants["m04-00007"] != first.Merchants["m04-00007"] {
				t.Error("a merchant of an unchanged file is not the one parsed before")
			}
			if changed.Providers["nuapay"].ID != first.Providers["nuapay"].ID {
				t.Error("the provider ID changed: cached tokens would be lost")
			}
		})
	}
}

// TestLoadReleasesFiles: a registry loaded with another key (another
// store) takes the files a cached registry holds, parsed; the parsed files
// go with the last registry that holds them, and a load after that parses
// them again.
func TestLoadReleasesFiles(t *testing.T) {
	dir := t.TempDir()
	writeSplitRegistry(t, dir, 2, 3, -1, "")
	opts := config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }}
	c := New()
	load := func(storeKey string, wantParses int) string {
		t.Helper()
		_, key, got, err := c.Load(dir, opts, storeKey)
		if err != nil {
			t.Fatal(err)
		}
		if got != wantParses {
			t.Fatalf("store %s: %d files parsed, want %d", storeKey, got, wantParses)
		}
		return key
	}
	first := load("a", 2)
	second := load("b", 0)
	c.Release(first, false, zap.NewNop())
	third := load("c", 0)
	c.Release(second, false, zap.NewNop())
	c.Release(third, false, zap.NewNop())
	load("a", 2)
}

// TestLoadInputs: a load after a variable a merchant reads changed
// parses that file again; after a secret file changed, it resolves the
// providers again without parsing; each time the next load reuses the
// registry (no parse, the same object).
func TestLoadInputs(t *testing.T) {
	dir := t.TempDir()
	secret := filepath.Join(dir, "api.key")
	write := func(path, content string) {
		t.Helper()
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	write(secret, "key-1\n")
	write(filepath.Join(dir, "merchants.toml"), "[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"https://nuapay.example\"\napi_key = \"{file.api.key}\"\n\n"+
		"[merchants.acme]\nprovider = \"nuapay\"\norganisation = \"{env.ACME_ORG}\"\nscopes = [\"pisp\"]\n")
	env := map[string]string{"ACME_ORG": "org-1"}
	opts := config.Options{LookupEnv: func(k string) (string, bool) { v, ok := env[k]; return v, ok }}
	c := New()
	load := func(wantParses int) *config.Registry {
		t.Helper()
		reg, _, got, err := c.Load(dir, opts, "store")
		if err != nil {
			t.Fatal(err)
		}
		if got != wantParses {
			t.Fatalf("%d files parsed, want %d", got, wantParses)
		}
		return reg
	}
	first := load(1)
	if again := load(0); again != first {
		t.Fatal("an unchanged registry was not reused")
	}

	env["ACME_ORG"] = "org-2"
	moved := load(1)
	if got := moved.Merchants["acme"].Organisation; got != "org-2" {
		t.Fatalf("organisation %q after the variable changed, want org-2", got)
	}
	if again := load(0); again != moved {
		t.Fatal("the registry loaded after the variable changed was not reused")
	}

	write(secret, "key-2\n")
	rotated := load(0)
	if rotated == moved || rotated.Providers["nuapay"].SecretVersion == moved.Providers["nuapay"].SecretVersion {
		t.Fatal("the secret file changed but the provider was not resolved again")
	}
	if rotated.Providers["nuapay"].ID != moved.Providers["nuapay"].ID {
		t.Error("the provider ID changed with the secret: cached tokens would be lost")
	}
	if again := load(0); again != rotated {
		t.Fatal("the registry loaded after the secret changed was not reused")
	}
}
