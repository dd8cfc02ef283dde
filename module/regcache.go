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
// does not change the registry file, the environment variables it names,
// the {file.PATH} secrets it names, the TLS and key files of its providers,
// or the store its refresh tokens go to, reuses the registry already
// loaded: the file is not parsed again, and the providers' sources are the
// same objects (their cached tokens were kept anyway: the cache is keyed
// by provider ID).
var registries = caddy.NewUsagePool()

// registryParses counts the registry files parsed (for tests).
var registryParses atomic.Int64

// pooledRegistry is a registry in the pool, with the fingerprint of the
// provider files (TLS, private keys) it was resolved with.
type pooledRegistry struct {
	reg   *config.Registry
	files string
}

func (*pooledRegistry) Destruct() error { return nil }

var (
	envRefRe  = regexp.MustCompile(`\{env\.([A-Za-z_][A-Za-z0-9_]*)\}`)
	fileRefRe = regexp.MustCompile(`\{file\.([^{}]+)\}`)
)

// loadPooled returns the registry at path, from the pool when nothing it
// depends on changed, and the pool key to release (Cleanup). storeKey
// names where refresh tokens go (the store is fixed when the registry is
// resolved).
func loadPooled(path string, opts config.Options, storeKey string) (*config.Registry, string, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: %w", &config.Error{File: path, Msg: fmt.Sprintf("cannot read the registry: %v", err)})
	}
	h := sha256.New()
	fmt.Fprintf(h, "%s\x00%s\x00", path, storeKey)
	h.Write(data)
	lookup := opts.LookupEnv
	if lookup == nil {
		lookup = os.LookupEnv
	}
	for _, m := range envRefRe.FindAllSubmatch(data, -1) {
		v, ok := lookup(string(m[1]))
		fmt.Fprintf(h, "\x00env %s %t %d:%s", m[1], ok, len(v), v)
	}
	dir := filepath.Dir(path)
	for _, m := range fileRefRe.FindAllSubmatch(data, -1) {
		p := string(m[1])
		if !filepath.IsAbs(p) {
			p = filepath.Join(dir, p)
		}
		fmt.Fprintf(h, "\x00file %s %s", p, fileSum(p))
	}
	key := "registry " + hex.EncodeToString(h.Sum(nil))
	parse := func() (*config.Registry, error) {
		registryParses.Add(1)
		reg, err := config.ParseWith(path, data, opts)
		if err != nil {
			return nil, fmt.Errorf("token_broker: %w", err)
		}
		return reg, nil
	}
	v, loaded, err := registries.LoadOrNew(key, func() (caddy.Destructor, error) {
		reg, err := parse()
		if err != nil {
			return nil, err
		}
		return &pooledRegistry{reg: reg, files: providerFiles(reg)}, nil
	})
	if err != nil {
		return nil, "", err
	}
	pr := v.(*pooledRegistry)
	if loaded && providerFiles(pr.reg) != pr.files {
		// A TLS or key file changed under the same registry: resolve
		// again, outside the pool.
		_, _ = registries.Delete(key)
		reg, err := parse()
		return reg, "", err
	}
	return pr.reg, key, nil
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
// a reload that changes nothing the registry depends on parses none.
func RegistryParses() int64 { return registryParses.Load() }
