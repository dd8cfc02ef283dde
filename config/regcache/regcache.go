// Package regcache keeps loaded merchant registries across config reloads,
// by path, refresh store and the content of the registry's files. A load
// that changes none of them, nor anything else the registry read
// (config.Registry.Inputs), reuses the registry already loaded, its
// providers' sources included; when only those inputs changed, the
// providers are resolved again from the files as parsed.
//
// The parsed files are kept by path and content: a load parses only the
// files that changed (or whose merchants' environment variables did), and
// a parsed file goes with the last registry in the cache that holds it.
package regcache

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"sync"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Cache stores registries and their parsed files while something uses
// them (Load, Release). The zero value is not ready: use New. Safe for
// concurrent use; loads run one at a time (Caddy provisions one config
// at a time).
type Cache struct {
	mu       sync.Mutex
	regs     map[string]*registry // by Load's key
	exitWait time.Duration        // Release's bound at exit: ExitWait
	exitBy   time.Time            // set by the first Release at exit: its start plus exitWait
}

// ExitWait bounds how long the Releases of a Cache wait together, from the
// first one when the process exits, for the refreshes under way: within a
// container runtime's grace period (Kubernetes: 30 s), with time left for
// the rest of the shutdown.
const ExitWait = 10 * time.Second

// New returns an empty cache.
func New() *Cache {
	return &Cache{regs: map[string]*registry{}, exitWait: ExitWait}
}

// registry is a registry in the cache with the parsed files it uses. reg
// is replaced (never modified) when an input it read changed.
type registry struct {
	refs  int
	files []*file          // fixed when the registry is added
	reg   *config.Registry // nil until the first load resolves it
}

// file is a registry file in the cache, parsed on first use.
type file struct {
	key string // fileKey
	f   *config.File
}

// Load returns the registry at path (a file, a directory or a glob:
// config.Files), from the cache when nothing it depends on changed, the
// key to Release when it is no longer used, and how many of its files
// this load parsed. storeKey names where refresh tokens go (the store is
// fixed when the registry is resolved).
func (c *Cache) Load(path string, opts config.Options, storeKey string) (reg *config.Registry, key string, parsed int, err error) {
	srcs, err := config.ReadSources(path)
	if err != nil {
		return nil, "", 0, err
	}
	h := sha256.New()
	fmt.Fprintf(h, "%d:%s\x00%d:%s\x00", len(path), path, len(storeKey), storeKey)
	fileKeys := make([]string, len(srcs))
	for i, src := range srcs {
		fileKeys[i] = fileKey(src)
		fmt.Fprintf(h, "%s\x00", fileKeys[i])
	}
	key = hex.EncodeToString(h.Sum(nil))

	c.mu.Lock()
	defer c.mu.Unlock()
	r := c.regs[key]
	if r == nil {
		r = c.newRegistry(fileKeys)
	}
	reg, parsed, err = r.current(path, srcs, opts)
	if err != nil {
		return nil, "", parsed, err
	}
	c.regs[key] = r
	r.refs++
	return reg, key, parsed, nil
}

// newRegistry returns a registry of the files of fileKeys, with the
// files the cached registries hold (new ones for the others).
func (c *Cache) newRegistry(fileKeys []string) *registry {
	held := map[string]*file{}
	for _, other := range c.regs {
		for _, f := range other.files {
			held[f.key] = f
		}
	}
	r := &registry{files: make([]*file, len(fileKeys))}
	for i, fk := range fileKeys {
		if r.files[i] = held[fk]; r.files[i] == nil {
			r.files[i] = &file{key: fk}
		}
	}
	return r
}

// Release ends one use of the registry of key (from Load); the registry
// leaves the cache with its last use. At the last use when the process is
// exiting, its refresh-token sources start no refresh any more
// (oauth.RefreshToken.Close), and Release waits for the refreshes under
// way, so that the refresh tokens they rotate are saved: at most the
// longest timeout of their providers, and until ExitWait after the
// cache's first Release at exit (Caddy's Cleanups run one after
// another). It logs to logger how many were still under way then.
func (c *Cache) Release(key string, exiting bool, logger *zap.Logger) {
	c.mu.Lock()
	var reg *config.Registry
	if r := c.regs[key]; r != nil {
		if r.refs--; r.refs == 0 {
			delete(c.regs, key)
			reg = r.reg
		}
	}
	if exiting && c.exitBy.IsZero() {
		c.exitBy = time.Now().Add(c.exitWait)
	}
	exitBy := c.exitBy
	c.mu.Unlock()
	if !exiting || reg == nil {
		return
	}
	var srcs []*oauth.RefreshToken
	wait := time.Duration(0)
	for _, p := range reg.Providers {
		if src, ok := p.RefreshToken(); ok {
			src.Close()
			srcs = append(srcs, src)
			wait = max(wait, src.CallTimeout()) // a provider's timeout is positive (config)
		}
	}
	ctx, cancel := context.WithDeadline(context.Background(), exitBy)
	defer cancel()
	ctx, cancel = context.WithTimeout(ctx, wait)
	defer cancel()
	start, running := time.Now(), 0
	for _, src := range srcs {
		running += src.Wait(ctx)
	}
	if running > 0 {
		logger.Warn("exiting with refreshes still under way: a refresh token they rotate may be lost, and its merchant has to consent again",
			zap.String("config", reg.Path), zap.Int("refreshes", running), zap.Duration("waited", time.Since(start)))
	}
}

// current returns the registry, resolved again when something it read
// changed since, and how many files it parsed for it.
func (r *registry) current(path string, srcs []config.Source, opts config.Options) (*config.Registry, int, error) {
	if r.reg != nil && !config.Changed(r.reg.Inputs(), opts.LookupEnv) {
		return r.reg, 0, nil
	}
	files := make([]*config.File, len(srcs))
	parsed := 0
	for i, f := range r.files {
		if f.f == nil || config.Changed(f.f.Inputs(), opts.LookupEnv) {
			f.f = config.ParseFile(srcs[i], opts.LookupEnv)
			parsed++
		}
		files[i] = f.f
	}
	reg, err := config.Merge(path, srcs, files, opts)
	if err != nil {
		return nil, parsed, err
	}
	r.reg = reg
	return reg, parsed, nil
}

// fileKey is the key of a registry file in the cache: its path and its
// content.
func fileKey(src config.Source) string {
	h := sha256.New()
	fmt.Fprintf(h, "%d:%s\x00", len(src.Path), src.Path)
	h.Write(src.Data)
	return hex.EncodeToString(h.Sum(nil))
}
