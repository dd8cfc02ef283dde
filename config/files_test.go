package config

import (
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
)

const filesProvider = `[providers.p]
type = "nuapay"
base_url = "https://nuapay.example"
api_key = "{env.NUAPAY_API_KEY}"
`

// writeFiles writes name, content pairs into a new directory.
func writeFiles(t *testing.T, files ...string) string {
	t.Helper()
	dir := t.TempDir()
	for i := 0; i+1 < len(files); i += 2 {
		if err := os.WriteFile(filepath.Join(dir, files[i]), []byte(files[i+1]), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return dir
}

func merchantTable(id, org string) string {
	return "[merchants." + id + "]\nprovider = \"p\"\norganisation = \"" + org + "\"\nscopes = [\"s\"]\n"
}

// TestSplitRegistry: a directory or a glob names several files; the
// provider of one file serves the merchants of the others.
func TestSplitRegistry(t *testing.T) {
	dir := writeFiles(t,
		"00-providers.toml", filesProvider,
		"10-a.toml", merchantTable("a1", "oa1")+merchantTable("a2", "oa2"),
		"20-b.toml", merchantTable("b1", "ob1")+"\n[merchants.\"*\"]\nprovider = \"p\"\norganisation = \"{merchant}\"\nscopes = [\"s\"]\n",
		"notes.txt", "not toml",
		".#30-c.toml", "not toml either",
	)
	opts := Options{LookupEnv: testEnv()}
	for _, tc := range []struct {
		pattern string
		files   []string
	}{
		{dir, []string{"00-providers.toml", "10-a.toml", "20-b.toml"}},
		{filepath.Join(dir, "*.toml"), []string{".#30-c.toml", "00-providers.toml", "10-a.toml", "20-b.toml"}},
		{filepath.Join(dir, "[0-1]*.toml"), []string{"00-providers.toml", "10-a.toml"}},
	} {
		t.Run(filepath.Base(tc.pattern), func(t *testing.T) {
			files, err := Files(tc.pattern)
			if err != nil {
				t.Fatal(err)
			}
			var names []string
			for _, f := range files {
				names = append(names, filepath.Base(f))
			}
			if !slices.Equal(names, tc.files) {
				t.Fatalf("Files(%s) = %v, want %v", tc.pattern, names, tc.files)
			}
		})
	}
	reg, err := LoadWith(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	if reg.Path != dir || len(reg.Files) != 3 || len(reg.Merchants) != 3 || reg.Wildcard == nil {
		t.Fatalf("registry: path %s, files %v, %d merchants, wildcard %v", reg.Path, reg.Files, len(reg.Merchants), reg.Wildcard)
	}
	b, err := reg.Binding("b1", nil)
	if err != nil || b.Organisation != "ob1" || b.SourceID != reg.Providers["p"].ID {
		t.Fatalf("Binding(b1) = %+v, %v", b, err)
	}
	if m, wild, ok := reg.Merchant("zz"); !ok || !wild || m.Organisation != "zz" {
		t.Fatalf("Merchant(zz) = %+v %v %v", m, wild, ok)
	}
	if reg, err := LoadWith(filepath.Join(dir, "[0-1]*.toml"), opts); err != nil || len(reg.Merchants) != 2 || reg.Wildcard != nil {
		t.Fatalf("glob: %v", err)
	}
}

// TestSplitRegistryErrors: problems name the file and the line, a
// duplicate both places.
func TestSplitRegistryErrors(t *testing.T) {
	for _, tc := range []struct {
		name  string
		files []string
		want  []string
	}{
		{"duplicate merchant", []string{"a.toml", filesProvider + "\n" + merchantTable("m", "o1"), "b.toml", "\n\n" + merchantTable("m", "o2")},
			[]string{`b.toml:3: merchant "m": also defined at ` + "DIR/a.toml:6: define each merchant once"}},
		{"duplicate provider", []string{"a.toml", filesProvider, "b.toml", merchantTable("m", "o") + "\n" + filesProvider},
			[]string{`b.toml:6: provider "p": also defined at DIR/a.toml:1: define each provider once`}},
		{"duplicate wildcard", []string{"a.toml", filesProvider + "[merchants.\"*\"]\nprovider = \"p\"\nscopes = [\"s\"]\norganisation = \"{merchant}\"\n",
			"b.toml", "[merchants.\"*\"]\nprovider = \"p\"\nscopes = [\"s\"]\norganisation = \"{merchant}\"\n"},
			[]string{`b.toml:1: merchant "*": also defined at DIR/a.toml:5: define each merchant once`}},
		{"unknown provider in another file", []string{"a.toml", filesProvider, "b.toml", "\n[merchants.m]\nprovider = \"q\"\norganisation = \"o\"\nscopes = [\"s\"]\n"},
			[]string{`b.toml:3: merchant "m": field provider: unknown provider "q" (defined: p)`}},
		{"missing scopes against another file's provider", []string{"a.toml", filesProvider, "b.toml", "[merchants.m]\nprovider = \"p\"\norganisation = \"o\"\n"},
			[]string{`b.toml:1: merchant "m": field scopes: missing: provider "p" (type nuapay) needs at least one scope`}},
		{"syntax error in one file", []string{"a.toml", filesProvider, "b.toml", merchantTable("m", "o") + "x = = 1\n"},
			[]string{`b.toml:5: `}},
		{"no merchants", []string{"a.toml", filesProvider, "b.toml", "# nothing yet\n"},
			[]string{`DIR: no merchants in any of its 2 files`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := writeFiles(t, tc.files...)
			_, err := LoadWith(dir, Options{LookupEnv: testEnv()})
			if err == nil {
				t.Fatal("no error")
			}
			for _, w := range tc.want {
				if w = strings.ReplaceAll(w, "DIR", dir); !strings.Contains(err.Error(), w) {
					t.Errorf("error:\n%v\nwant it to hold %q", err, w)
				}
			}
		})
	}
	for _, pattern := range []string{"missing-dir", "*.nothing"} {
		if _, err := Files(filepath.Join(t.TempDir(), pattern)); err == nil {
			t.Errorf("Files(%s): no error", pattern)
		}
	}
	if _, err := Files(t.TempDir()); err == nil || !strings.Contains(err.Error(), "no *.toml file") {
		t.Errorf("Files(empty dir) = %v", err)
	}
}

// TestParseFileReused: one parsed file serves two merges, the second
// against a changed provider file.
func TestParseFileReused(t *testing.T) {
	merchants := Source{Path: "m.toml", Data: []byte(merchantTable("m", "o"))}
	f := ParseFile(merchants, testEnv())
	for _, timeout := range []string{"5s", "7s"} {
		prov := Source{Path: "p.toml", Data: []byte(filesProvider + "timeout = \"" + timeout + "\"\n")}
		reg, err := Merge("dir", []Source{prov, merchants}, []*File{ParseFile(prov, testEnv()), f}, Options{LookupEnv: testEnv()})
		if err != nil {
			t.Fatal(err)
		}
		if got := callTimeout(t, reg.Providers["p"]).String(); got != timeout || reg.Merchants["m"] == nil {
			t.Fatalf("timeout %s, want %s", got, timeout)
		}
	}
}

// A registry directory mounted the way Kubernetes mounts a ConfigMap holds
// symbolic links to the files (merchants.toml -> ..data/merchants.toml):
// they are the registry's files; a link to a directory or a dangling one
// is not.
func TestFilesFollowsLinksInDirectory(t *testing.T) {
	dir := t.TempDir()
	data := filepath.Join(dir, "..2026_12_07_10_00_00.000000001")
	for _, d := range []string{data, filepath.Join(data, "sub.toml")} {
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for _, name := range []string{"a.toml", "b.toml"} {
		if err := os.WriteFile(filepath.Join(data, name), []byte(filesProvider), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	links := map[string]string{
		"..data":        filepath.Base(data),
		"a.toml":        "../" + filepath.Base(dir) + "/..data/a.toml",
		"b.toml":        "..data/b.toml",
		"sub.toml":      "..data/sub.toml",
		"dangling.toml": "..data/gone.toml",
	}
	for name, target := range links {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	got, err := Files(dir)
	want := []string{filepath.Join(dir, "a.toml"), filepath.Join(dir, "b.toml")}
	if err != nil || !slices.Equal(got, want) {
		t.Fatalf("Files = %q, %v; want %q", got, err, want)
	}
}

// A link to a file the registry already lists is that file, read once:
// merchants.toml -> merchants-v2.toml in one directory (the link sorting
// after its file, or before it) loads; a link that loops is left out. The
// same holds for a glob matching both.
func TestFilesLinkToListedFile(t *testing.T) {
	dir := writeFiles(t, "merchants-v2.toml", filesProvider+merchantTable("a1", "oa1"))
	for name, target := range map[string]string{
		"merchants.toml": "merchants-v2.toml",
		"current.toml":   "merchants.toml",
		"loop.toml":      "loop.toml",
	} {
		if err := os.Symlink(target, filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
	want := []string{filepath.Join(dir, "merchants-v2.toml")}
	for _, pattern := range []string{dir, filepath.Join(dir, "*.toml")} {
		got, err := Files(pattern)
		if err != nil || !slices.Equal(got, want) {
			t.Fatalf("Files(%s) = %q, %v; want %q", pattern, got, err, want)
		}
		if _, err := LoadWith(pattern, Options{LookupEnv: testEnv()}); err != nil {
			t.Fatalf("LoadWith(%s): %v", pattern, err)
		}
	}
}

// An empty registry path (a placeholder that resolved to nothing) is named
// as such, not as a file that cannot be read.
func TestFilesEmptyPath(t *testing.T) {
	_, err := Files("")
	if err == nil || !strings.Contains(err.Error(), "the registry path is empty") {
		t.Fatalf("Files(\"\") = %v; want an error saying the path is empty", err)
	}
}
