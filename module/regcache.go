package module

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"sync"
	"sync/atomic"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// registries keeps loaded registries across config reloads, by path,
// refresh store and the content of the registry's files. A reload that
// changes none of them, nor anything else the registry read
// (config.Registry.Inputs: the environment variables, the {file.PATH}
// secrets, the TLS and key files its entries name), reuses the registry
// already loaded: no file is parsed again, and the providers' sources are
// the same objects (their cached tokens were kept anyway: the cache is
// keyed by provider ID). When only those inputs changed, the providers
// are resolved again from the files as parsed.
var registries = caddy.NewUsagePool()

// registryFiles keeps the parsed files of the registries in the pool, by
// path and content: when one file of a registry split across several
// changes, a reload parses that file only, and merges it with the others
// as parsed before (again when an environment variable its merchants read
// changed). A registry in the pool holds its files; a file goes when no
// registry holds it.
var registryFiles = caddy.NewUsagePool()

// registryParses counts the registry files parsed (for tests).
var registryParses atomic.Int64

// pooledRegistry is a registry in the pool with the parsed files it
// holds in registryFiles. reg is replaced when an input it read changed;
// a registry handed out before stays as it was.
type pooledRegistry struct {
	mu       sync.Mutex
	reg      *config.Registry // nil until the first current
	files    []*pooledFile
	fileKeys []string
}

// Destruct releases the registry's parsed files.
func (pr *pooledRegistry) Destruct() error {
	for _, k := range pr.fileKeys {
		_, _ = registryFiles.Delete(k)
	}
	return nil
}

// current returns the registry, resolved again when something it read
// changed since.
func (pr *pooledRegistry) current(path string, srcs []config.Source, opts config.Options) (*config.Registry, error) {
	pr.mu.Lock()
	defer pr.mu.Unlock()
	if pr.reg != nil && !config.Changed(pr.reg.Inputs(), opts.LookupEnv) {
		return pr.reg, nil
	}
	parsed := make([]*config.File, len(srcs))
	for i, pf := range pr.files {
		parsed[i] = pf.current(srcs[i], opts.LookupEnv)
	}
	reg, err := config.Merge(path, srcs, parsed, opts)
	if err != nil {
		return nil, registryError(err)
	}
	pr.reg = reg
	return reg, nil
}

// pooledFile is a registry file in registryFiles, parsed on first use.
type pooledFile struct {
	mu sync.Mutex
	f  *config.File
}

func (*pooledFile) Destruct() error { return nil }

// current returns the parsed file, parsed again when an environment
// variable it read changed since.
func (pf *pooledFile) current(src config.Source, lookup func(string) (string, bool)) *config.File {
	pf.mu.Lock()
	defer pf.mu.Unlock()
	if pf.f == nil || config.Changed(pf.f.Inputs(), lookup) {
		registryParses.Add(1)
		pf.f = config.ParseFile(src, lookup)
	}
	return pf.f
}

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
	if opts.LookupEnv == nil {
		opts.LookupEnv = os.LookupEnv
	}
	h := sha256.New()
	fmt.Fprintf(h, "%d:%s\x00%d:%s\x00", len(path), path, len(storeKey), storeKey)
	fileKeys := make([]string, len(srcs))
	for i, src := range srcs {
		fileKeys[i] = fileKey(src)
		fmt.Fprintf(h, "%s\x00", fileKeys[i])
	}
	key := "registry " + hex.EncodeToString(h.Sum(nil))
	v, _, _ := registries.LoadOrNew(key, func() (caddy.Destructor, error) {
		pr := &pooledRegistry{fileKeys: fileKeys, files: make([]*pooledFile, len(srcs))}
		for i := range srcs {
			f, _, _ := registryFiles.LoadOrNew(fileKeys[i], func() (caddy.Destructor, error) { return &pooledFile{}, nil })
			pr.files[i] = f.(*pooledFile)
		}
		return pr, nil
	})
	reg, err := v.(*pooledRegistry).current(path, srcs, opts)
	if err != nil {
		_, _ = registries.Delete(key)
		return nil, "", err
	}
	return reg, key, nil
}

// fileKey is the key of a registry file in registryFiles: its path and
// its content.
func fileKey(src config.Source) string {
	h := sha256.New()
	fmt.Fprintf(h, "%d:%s\x00", len(src.Path), src.Path)
	h.Write(src.Data)
	return "registry file " + hex.EncodeToString(h.Sum(nil))
}

// RegistryParses returns how many registry files this process has parsed:
// a reload that changes nothing the registry depends on parses none, and
// one that changes one file of a registry split across several parses
// that file only.
func RegistryParses() int64 { return registryParses.Load() }
