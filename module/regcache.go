package module

import (
	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/command"
	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/config/regcache"
)

// registries keeps loaded registries across config reloads
// (package regcache): a reload that changes nothing a registry read parses
// no file again and keeps its providers' sources.
var registries = regcache.New()

// loadPooled returns the registry at path (a file, a directory or a glob:
// config.Files; placeholders such as {env.TOKEN_BROKER_CONFIG} are
// resolved) from registries, and the key to release (Cleanup). Its
// refresh tokens go in store, its consents in progress in Caddy's storage,
// its providers' budgets are made by budgets, DPoP nonce challenges are
// counted on the running app's metrics, and its sources log to logger.
// storeKey names store and whatever budgets depends on. The files a load
// parsed are logged, and a warning when store keeps refresh tokens
// unsealed in Caddy's storage.
func loadPooled(ctx caddy.Context, path string, store oauth.Store, storeKey string, budgets func(*config.Provider) (*budget.Budget, error), logger *zap.Logger) (*config.Registry, string, error) {
	path = registryExpand(path)
	opts := config.Options{RefreshStore: store, ConsentStore: kvstore.Pending{S: ctx.Storage()},
		OnDPoPNonce: tokenNonceChallenged, Budgets: budgets, Logger: logger}
	reg, key, parsed, err := registries.Load(path, opts, storeKey+" consents in "+storageID(ctx.Storage()))
	if parsed > 0 {
		ctx.Logger().Info("merchant registry parsed", zap.String("config", path), zap.Int("files_parsed", parsed))
	}
	if err != nil {
		return nil, "", command.RegistryError(err)
	}
	if st, ok := store.(kvstore.Refresh); ok && st.Keys == nil && reg.HasRefreshTokens() {
		ctx.Logger().Warn("refresh tokens are stored unsealed in Caddy's storage: set storage_encryption_key in the token_broker global option to seal them", zap.String("config", reg.Path))
	}
	return reg, key, nil
}
