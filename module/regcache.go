package module

import (
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/command"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/config/regcache"
)

// registries keeps loaded registries across config reloads
// (package regcache): a reload that changes nothing a registry read parses
// no file again and keeps its providers' sources.
var registries = regcache.New()

// loadPooled returns the registry at path (a file, a directory or a glob:
// config.Files) from registries, and the key to release (Cleanup).
// storeKey names where refresh tokens go. The files a load parsed are
// logged.
func loadPooled(logger *zap.Logger, path string, opts config.Options, storeKey string) (*config.Registry, string, error) {
	reg, key, parsed, err := registries.Load(path, opts, storeKey)
	if parsed > 0 {
		logger.Info("merchant registry parsed", zap.String("config", path), zap.Int("files_parsed", parsed))
	}
	if err != nil {
		return nil, "", command.RegistryError(err)
	}
	return reg, key, nil
}
