package module

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// registries keeps loaded registries across config reloads. A reload that
// does not change the registry's files, the environment variables they
// name, the {file.PATH} secrets they name, the TLS and key files of its
// providers, or the store its refresh tokens go to, reuses the registry
// already loaded: no file is parsed again, and the providers' sources are
// the same objects (their cached tokens were kept anyway: the cache is
// keyed by provider ID).
var registries = caddy.NewUsagePool()

// registryFiles keeps the parsed files of the registries in the pool, by
// path, content and the environment variables they name: when one file of
// a registry split across several changes, a reload parses that file
// only, and merges it with the others as parsed before. A registry in the
// pool holds its files; a file goes when no registry holds it.
var registryFiles = caddy.NewUsagePool()

// registryParses counts the registry files parsed (for tests).
var registryParses atomic.Int64

// pooledRegistry is a registry in the pool, with the fingerprint of the
// provider files (TLS, private keys) it was resolved with, and the parsed
// files it holds in registryFiles.
type pooledRegistry struct {
	reg      *config.Registry
	files    string
	parsed   []*config.File
	fileKeys []string
}

// Destruct releases the registry's parsed files.
func (pr *pooledRegistry) Destruct() error {
	releaseFiles(pr.fileKeys)
	return nil
}

func releaseFiles(keys []string) {
	for _, k := range keys {
		_, _ = registryFiles.Delete(k)
	}
}

// pooledFile is a parsed registry file in registryFiles.
type pooledFile struct{ f *config.File }

func (*pooledFile) Destruct() error { return nil }

var (
	envRefRe  = regexp.MustCompile(`\{env\.([A-Za-z_][A-Za-z0-9_]*)\}`)
	fileRefRe = regexp.MustCompile(`\{file\.([^{}]+)\}`)
)

// loadPooled returns the registry at path (a file, a directory or a glob:
// config.Files), from the pool when nothing it depends on changed, and
// the pool key to release (Cleanup). storeKey names where refresh tokens
// go (the store is fixed when the registry is resolved).
func loadPooled(path string, opts config.Options, storeKey string) (*config.Registry, string, error) {
	paths, err := config.Files(path)
	if err != nil {
		return nil, "", registryError(err)
	}
	srcs, err := config.ReadSources(paths)
	if err != nil {
		return nil, "", registryError(err)
	}
	lookup := opts.LookupEnv
	if lookup == nil {
		lookup = os.LookupEnv
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00", path, storeKey)
	fileKeys := make([]string, len(srcs))
	for i, src := range srcs {
		fileKeys[i] = fileKey(src, lookup)
		fmt.Fprintf(h, "%s\x00", fileKeys[i])
		dir := filepath.Dir(src.Path)
		for _, m := range fileRefRe.FindAllSubmatch(src.Data, -1) {
			p := string(m[1])
			if !filepath.IsAbs(p) {
				p = filepath.Join(dir, p)
			}
			fmt.Fprintf(h, "\x00file %s %s", p, fileSum(p))
		}
	}
	key := "registry " + hex.EncodeToString(h.Sum(nil))
	v, loaded, err := registries.LoadOrNew(key, func() (caddy.Destructor, error) {
		parsed := make([]*config.File, len(srcs))
		for i, src := range srcs {
			v, _, err := registryFiles.LoadOrNew(fileKeys[i], func() (caddy.Destructor, error) {
				registryParses.Add(1)
				return &pooledFile{f: config.ParseFile(src, lookup)}, nil
			})
			if err != nil {
				releaseFiles(fileKeys[:i])
				return nil, err
			}
			parsed[i] = v.(*pooledFile).f
		}
		reg, err := config.Merge(path, srcs, parsed, opts)
		if err != nil {
			releaseFiles(fileKeys)
			return nil, registryError(err)
		}
		return &pooledRegistry{reg: reg, files: providerFiles(reg), parsed: parsed, fileKeys: fileKeys}, nil
	})
	if err != nil {
		return nil, "", err
	}
	pr := v.(*pooledRegistry)
	if loaded && providerFiles(pr.reg) != pr.files {
		// A TLS or key file changed under the same registry: resolve the
		// providers again, outside the pool (the files are as parsed: their
		// content is the same, the key says so).
		reg, err := config.Merge(path, srcs, pr.parsed, opts)
		_, _ = registries.Delete(key)
		if err != nil {
			return nil, "", registryError(err)
		}
		return reg, "", nil
	}
	return pr.reg, key, nil
}

// fileKey is the key of a registry file in registryFiles: its path, its
// content and the values of the environment variables it names.
func fileKey(src config.Source, lookup func(string) (string, bool)) string {
	h := sha256.New()
	fmt.Fprintf(h, "%d:%s\x00", len(src.Path), src.Path)
	h.Write(src.Data)
	for _, m := range envRefRe.FindAllSubmatch(src.Data, -1) {
		v, ok := lookup(string(m[1]))
		fmt.Fprintf(h, "\x00env %s %t %d:%s", m[1], ok, len(v), v)
	}
	return "registry file " + hex.EncodeToString(h.Sum(nil))
}

// providerFiles fingerprints the files the providers were resolved with.
func providerFiles(reg *config.Registry) string {
	h := sha256.New()
	for _, name := range sortedNames(reg.Providers) {
		p := reg.Providers[name]
		for _, f := range []string{p.TLS.CertFile, p.TLS.KeyFile, p.TLS.CAFile, p.PrivateKey} {
			if f != "" {
				fmt.Fprintf(h, "%s %s\x00", f, fileSum(f))
			}
		}
	}
	return hex.EncodeToString(h.Sum(nil))
}

// fileSum is the SHA-256 of a small file's content, or why it cannot be
// read.
func fileSum(path string) string {
	f, err := os.Open(path)
	if err != nil {
		return "error: " + err.Error()
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, io.LimitReader(f, 4<<20)); err != nil {
		return "error: " + err.Error()
	}
	return hex.EncodeToString(h.Sum(nil))
}

func sortedNames[V any](m map[string]V) []string {
	names := make([]string, 0, len(m))
	for k := range m {
		names = append(names, k)
	}
	slices.Sort(names)
	return names
}

// RegistryParses returns how many registry files this process has parsed:
// a reload that changes nothing the registry depends on parses none, and
// one that changes one file of a registry split across several parses
// that file only.
func RegistryParses() int64 { return registryParses.Load() }
