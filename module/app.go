package module

import (
	"fmt"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/callers"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet/redisstore"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/outbox"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/broker/reload"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/lograte"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

func init() {
	caddy.RegisterModule(App{})
}

// App is the token_broker app: the merchant registry shared by every
// token_broker handler, and the settings of the token cache. It is
// configured with the `token_broker` global option in a Caddyfile. The cache
// itself outlives the app: it is kept across config reloads as long as its
// settings do not change.
type App struct {
	// Config is the path of the TOML merchant registry (providers and
	// merchants) that handlers use unless they name their own: a file, a
	// directory (every *.toml file in it, sorted) or a glob
	// ("/etc/token-broker/*.toml"). A reload parses again only the files
	// that changed.
	Config string `json:"config,omitempty"`

	// RefreshWindow is the last part of a token's lifetime, a fraction
	// between 0 and 1, in which requests still get the cached token and one
	// background refresh starts. Default 0.25.
	RefreshWindow float64 `json:"refresh_window,omitempty"`

	// Leeway is how long a token must still be valid to be used: a token
	// closer to its expiry is fetched anew. Default 1s.
	Leeway caddy.Duration `json:"leeway,omitempty"`

	// Callers, when set, requires every caller to present a JWT and limits
	// the merchants each caller may act for (see CallerPolicy).
	Callers *CallerPolicy `json:"callers,omitempty"`

	// RevokeOnShutdown revokes the cached tokens at their providers when
	// Caddy stops (not on a config reload), for providers that support
	// revocation. Useful with long-lived tokens. Default false.
	RevokeOnShutdown bool `json:"revoke_on_shutdown,omitempty"`

	// FetchTimeout bounds one token fetch, whoever waits on it. Default 30s;
	// each provider's own timeout applies to each call.
	FetchTimeout caddy.Duration `json:"fetch_timeout,omitempty"`

	// BudgetWait is the longest a request waits its turn for a provider's
	// token API budget (rate_limit in the registry) before it is answered
	// 503 budget_exhausted with a Retry-After from the budget's queue, so
	// that the sidecar answers fast instead of holding callers. Default 5s.
	BudgetWait caddy.Duration `json:"budget_wait,omitempty"`

	// Metrics configures the broker's Prometheus series (see
	// MetricsConfig). They are always on; this only shapes their labels.
	Metrics *MetricsConfig `json:"metrics,omitempty"`

	// Redis, when set, shares tokens and refresh tokens with the other
	// brokers of a fleet through Redis (see RedisConfig). Default: none.
	// With it, the providers' token-request budgets (rate_limit in the
	// registry) are shared by the fleet too.
	Redis *RedisConfig `json:"redis,omitempty"`

	// StorageEncryptionKey seals, with AES-256-GCM, the merchants' refresh
	// tokens kept in Caddy's storage (without redis, and those of a
	// handler's own registry): 32 bytes, base64. Write it as a placeholder
	// ({file./run/secrets/storage-key}); it is never logged. Instances
	// sharing the storage need the same key. Refresh tokens stored in
	// clear are still read, and sealed at the next refresh or save.
	// Default: none (stored in clear, with a warning at load).
	StorageEncryptionKey string `json:"storage_encryption_key,omitempty"`

	// StorageEncryptionKeysOld are previous storage encryption keys: refresh tokens sealed
	// with them still open, and are sealed with StorageEncryptionKey at the next refresh or save.
	// Write each as a placeholder, as StorageEncryptionKey; they are never logged.
	StorageEncryptionKeysOld []string `json:"storage_encryption_keys_old,omitempty"`

	// FleetSize is how many sidecars spend the providers' token-request
	// budgets (rate_limit in the registry) without Redis: each spends its
	// share, rate_limit divided by FleetSize (and rate_burst too, at least
	// 1). With redis the fleet shares each budget and FleetSize sizes a
	// sidecar's share while Redis is unavailable: it is then required when
	// a provider has a rate_limit (the load fails without it). Default 1
	// (the whole budget) without redis, at most 10000.
	FleetSize int `json:"fleet_size,omitempty"`

	// AllowedHosts are the Host names, besides the loopback ones
	// (localhost, 127.0.0.1, [::1], any port), that the token_broker
	// handlers and the consent links endpoint answer: the names
	// applications reach the sidecar by (a pod-local or service name).
	// Host names or IP addresses, without scheme or port; "*" accepts any
	// Host, which gives up the protection against DNS rebinding. A request
	// for another Host is refused with 421 host_not_allowed, and a
	// browser's cross-site request with 403 cross_site_request (callers.Site).
	// Default: loopback names only.
	AllowedHosts []string `json:"allowed_hosts,omitempty"`

	registry    *config.Registry
	metrics     *telemetry.Metrics
	recorder    *telemetry.Recorder // of the bindings no handler made (checks)
	metricsKey  string
	broker      *broker.Broker
	tracker     *opstate.Tracker // the operator's view, kept with the broker (pooledBroker)
	stateIndex  *opstate.Index   // the registry's merchants sorted, for the operator's view
	pooled      *pooledBroker
	owner       reload.Owner // this config, to the pooled broker (SecretsSeen, Release)
	poolKey     string
	logger      *zap.Logger
	kept        *reload.Logger // the logger of the objects kept across reloads (keptLoggers)
	before      *App           // current before Start: made current again by Stop, cleared by its Cleanup
	fleet       *redisstore.Tier
	fleetKey    string
	storageKeys *seal.Keyring    // StorageEncryptionKey and the old ones; nil without
	tables      *bindings.Tables // binding tables, by registry and route scopes
	listing     *listing.Listing // the wildcard's organisation listing, if restricted
	listingKey  string
	registryKey string          // the registry's key in the registries pool
	sweeperKey  string          // the consents sweeper's key in pendingSweepers
	site        callers.Site    // AllowedHosts, checked by the handlers
	callers     *callers.Policy // Callers, provisioned; nil admits every caller
	watched     *probe.Watched  // the registries of handlers with their own, for the health answer

	// refusals limits the handlers' logs of repeated refusals.
	refusals *lograte.Limiter[broker.Backoff]
	events   *outbox.Outbox   // the events for Caddy's events app (events.go)
	budgets  []*budget.Budget // the budgets this config holds (budget.go)
}

// CaddyModule returns the Caddy module information.
func (App) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "token_broker",
		New: func() caddy.Module { return new(App) },
	}
}

// Provision loads the merchant registry and attaches the app to the shared
// token cache.
func (a *App) Provision(ctx caddy.Context) error {
	a.logger = ctx.Logger()
	kept, _, _ := keptLoggers.LoadOrNew(keptLoggerKey, func() (caddy.Destructor, error) { return reload.NewLogger(a.logger), nil })
	a.kept = kept.(*reload.Logger) // the running config's logger until this one starts
	a.tables = &bindings.Tables{}
	a.refusals = admission.NewRepeatLimiter(time.Now)
	a.watched = &probe.Watched{}
	a.stateIndex = &opstate.Index{}
	if err := a.validate(); err != nil {
		return err
	}
	if err := a.provisionEvents(ctx); err != nil {
		return err
	}
	var err error
	if a.site, err = callers.NewSite(a.AllowedHosts); err != nil {
		return err
	}
	if a.Callers != nil {
		if a.callers, err = a.Callers.provision(ctx); err != nil {
			return err
		}
	}
	if a.storageKeys, err = seal.ParseKeyring("storage_encryption_key", a.StorageEncryptionKey, "storage_encryption_keys_old", a.StorageEncryptionKeysOld, resolveSecret); err != nil {
		return fmt.Errorf("token_broker: %w", err)
	}
	if a.Redis != nil {
		if a.fleet, a.fleetKey, err = a.Redis.provision(ctx, time.Duration(a.FetchTimeout), a.logger, a.kept.Zap()); err != nil {
			return err
		}
	}
	if a.Config != "" {
		reg, key, err := loadPooled(ctx, a.Config, a.refreshStore(ctx.Storage()), "store "+a.fleetKey+a.budgetKey()+" sealed "+a.storageKeys.Fingerprint(), a.budgetsFor(), a.kept.Zap())
		if err != nil {
			return err
		}
		a.registryKey = key
		a.registry = reg
		if reg.HasConsent() {
			if a.sweeperKey, err = startPendingSweeper(ctx, a.kept.Zap()); err != nil {
				return err
			}
		}
		if a.listing, a.listingKey, err = loadListing(reg, a.kept.Zap()); err != nil {
			return err
		}
		a.logger.Info("merchant registry loaded", zap.String("config", reg.Path),
			zap.Int("merchants", len(reg.Merchants)), zap.Int("providers", len(reg.Providers)))
		for name, p := range reg.Providers {
			if p.DPoP != nil {
				a.logger.Info("provider binds its tokens to a DPoP key", zap.String("provider", name), zap.Object("dpop_key", p.DPoP))
			}
		}
	}
	opts := a.options()
	a.poolKey = fmt.Sprintf("refresh_window=%g leeway=%s fetch_timeout=%s budget_wait=%s %s", opts.RefreshWindow, opts.Leeway, opts.FetchTimeout, opts.BudgetWait, a.fleetKey)
	if a.fleet != nil {
		// The shared tier is part of the pool key: a broker is never shared
		// by configurations with different tiers.
		opts.Shared = a.fleet.Cache
	}
	val, _, err := brokers.LoadOrNew(a.poolKey, func() (caddy.Destructor, error) {
		pb := &pooledBroker{Broker: &reload.Broker{Broker: broker.New(opts), Logger: a.kept.Zap()},
			tracker: opstate.NewTracker(opstate.TrackerOptions{Emit: emitRunning}), unwatchFleet: func() {}}
		if a.fleet != nil { // the broker's tier for its whole life (poolKey)
			pb.unwatchFleet = a.fleet.Cache.OnAvailability(pb.tracker.FleetChanged)
			pb.tracker.SetFleet(true, a.fleet.Cache.Available())
		}
		return pb, nil
	})
	if err != nil {
		return err
	}
	pb := val.(*pooledBroker)
	pb.revokeOnShutdown.Store(a.RevokeOnShutdown)
	a.broker, a.pooled, a.tracker = pb.Broker.Broker, pb, pb.tracker
	a.useRegistry(a.registry)
	merchantLabel := a.Metrics != nil && a.Metrics.MerchantLabel
	metricsKey := fmt.Sprintf("metrics merchant_label=%t", merchantLabel)
	if a.metrics, err = loadCollectors(ctx.GetMetricsRegistry(), metricsKey, func() *telemetry.Metrics { return telemetry.NewMetrics(merchantLabel) }); err != nil {
		return err
	}
	a.metricsKey = metricsKey
	a.instrument()
	return a.registerStateCollector(ctx.GetMetricsRegistry())
}

// resolveSecret expands the placeholders of a secret setting; an unknown or empty one is an error.
func resolveSecret(v string) (string, error) { return caddy.NewReplacer().ReplaceOrErr(v, true, true) }

// options are the broker options of the app's settings.
func (a *App) options() broker.Options {
	return broker.Options{RefreshWindow: a.RefreshWindow, Leeway: time.Duration(a.Leeway),
		FetchTimeout: time.Duration(a.FetchTimeout), BudgetWait: time.Duration(a.BudgetWait)}
}

func (a *App) validate() error {
	if err := a.options().Check(); err != nil {
		return fmt.Errorf("token_broker: %w", err)
	}
	if a.FleetSize < 0 || a.FleetSize > maxFleetSize {
		return fmt.Errorf("token_broker: fleet_size %d must be from 1 to %d (the sidecars that share the providers' rate limits)", a.FleetSize, maxFleetSize)
	}
	return nil
}

// maxFleetSize bounds fleet_size.
const maxFleetSize = 10_000

// Start makes the app current (the one the admin API serves, whose events
// the operator's view emits, whose logger the kept objects log through),
// then makes that view agree with the broker about the sources of the
// registries of the app and its handlers. Tokens are fetched on demand.
func (a *App) Start() error {
	a.before = current.Swap(a)
	a.kept.Swap(a.logger)
	if a.tracker != nil {
		opstate.Reconcile(a.stateSources())
	}
	return nil
}

// Stop leaves the cache to the next config, stops emitting events and,
// unless another config started since, makes before (still running after a
// failed reload) current again, with the kept objects' logger.
func (a *App) Stop() error {
	if current.CompareAndSwap(a, a.before) && a.before != nil {
		a.kept.CompareAndSwap(a.logger, a.before.logger)
	}
	if a.events != nil {
		a.events.Stop()
	}
	return nil
}

// Cleanup ends the app's use of the shared token cache; the cache lives
// on while another config (the one being loaded) uses it. The broker goes
// before the shared tier: revoking at shutdown purges the tier.
func (a *App) Cleanup() error {
	if next := current.Load(); next != nil && next.before == a { // Caddy's config changes are serial
		next.before = nil
	}
	if a.events != nil {
		a.events.Stop()
	}
	if a.listingKey != "" {
		_, _ = listings.Delete(a.listingKey)
	}
	budgetKeeper.Release(a.budgets)
	a.budgets = nil
	if a.registryKey != "" {
		registries.Release(a.registryKey, caddy.Exiting(), a.logger)
	}
	if a.sweeperKey != "" {
		_, _ = pendingSweepers.Delete(a.sweeperKey)
	}
	var err error
	if a.pooled != nil { // after its revocations at shutdown, which use what this config showed it
		_, err = brokers.Delete(a.poolKey)
		a.pooled.Release(&a.owner)
	}
	if a.fleetKey != "" {
		_, _ = fleets.Delete(a.fleetKey)
	}
	if a.metricsKey != "" {
		metricsPool.Delete(a.metricsKey)
	}
	if a.kept != nil {
		_, _ = keptLoggers.Delete(keptLoggerKey)
	}
	return err
}

// keptLoggers holds the logger of the objects kept across reloads
// (reload.Logger) under keptLoggerKey, from the Provision of a config to
// its Cleanup: one for every config of the process.
var keptLoggers = caddy.NewUsagePool()

// keptLoggerKey is the key of the logger in keptLoggers.
const keptLoggerKey = "kept objects' logger"

// brokers holds the token caches shared across config reloads, keyed by
// their settings.
var brokers = caddy.NewUsagePool()

// pooledBroker is a broker in the pool (reload.Broker). Its Destruct runs
// when the last config using it is gone: at shutdown, or when a reload
// changes the cache settings.
type pooledBroker struct {
	*reload.Broker
	revokeOnShutdown atomic.Bool
	// tracker is the operator's view of the broker's merchants and
	// providers: it lives as long as the broker whose observers feed it.
	tracker *opstate.Tracker
	// unwatchFleet stops telling tracker the shared tier's availability.
	unwatchFleet func()
}

// emitRunning emits an event of the operator's view through the running
// app (App.emit); nothing when none runs.
func emitRunning(event string, data map[string]any) {
	if app := current.Load(); app != nil {
		app.emit(event, data)
	}
}

// shuttingDown reports whether Caddy is stopping for good (the process
// exits, or the running config is stopped without a new one), rather than
// reloading.
func shuttingDown() bool { return caddy.Exiting() || caddy.ActiveContext().Context == nil }

// Destruct closes the broker. A reload never revokes: the running app's
// broker inherits the tokens, to revoke them at shutdown. At shutdown,
// with revoke_on_shutdown, the tokens are revoked at their providers.
func (p *pooledBroker) Destruct() error {
	defer p.Close()
	p.unwatchFleet()
	entries := p.Tokens()
	if next := current.Load(); next != nil && next.pooled != nil && next.pooled != p {
		next.pooled.Inherit(entries)
		return nil
	}
	if p.revokeOnShutdown.Load() && shuttingDown() {
		p.Revoke(entries)
	}
	return nil
}

// Interface guards.
var (
	_ caddy.App          = (*App)(nil)
	_ caddy.Provisioner  = (*App)(nil)
	_ caddy.CleanerUpper = (*App)(nil)
)
