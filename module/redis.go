package module

import (
	"crypto/sha256"
	"crypto/tls"
	"crypto/x509"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// RedisConfig turns on the shared token tier: the brokers of a fleet keep
// their tokens (sealed) and the merchants' refresh tokens in one Redis, so
// the fleet mints one token per key per lifetime and shares rotated refresh
// tokens. Without it nothing is shared. Caddyfile, inside the token_broker
// global option:
//
//	redis {
//	    address        <host:port>...      # one: a server; several: a cluster
//	    master_name    <name>              # with address: sentinels
//	    username       <user>
//	    password       <password>          # {env.X} / {file.X}
//	    db             <n>
//	    tls            [{ ca <file>; cert <file>; key <file>; server_name <name> }]
//	    key_prefix     token_broker:
//	    encryption_key <base64 of 32 bytes> # {file./run/secrets/key}; required
//	    encryption_keys_old <base64>...
//	    hash_keys      true|false
//	    timeout        50ms
//	    lock_ttl       35s
//	}
//
// Series on Caddy's /metrics (no labels carry a key or a merchant):
// `caddy_token_broker_l2_lookups_total{result="hit|miss"}`,
// `caddy_token_broker_l2_errors_total{op}`, `caddy_token_broker_l2_lock_waits_total`,
// `caddy_token_broker_l2_adopted_total`, `caddy_token_broker_l2_invalidations_received_total`,
// `caddy_token_broker_l2_undecryptable_total`, `caddy_token_broker_l2_bypassed_total`,
// `caddy_token_broker_l2_rolled_back_total`.
type RedisConfig struct {
	// Address is the Redis address (host:port), or several: the nodes of a
	// cluster, or sentinels when MasterName is set.
	Address []string `json:"address,omitempty"`
	// MasterName is the name of the master that Sentinel monitors; set it
	// to use the Address list as sentinels.
	MasterName string `json:"master_name,omitempty"`
	// Username is the Redis ACL user. Placeholders such as {env.REDIS_USER}
	// are resolved when the config loads.
	Username string `json:"username,omitempty"`
	// Password is the Redis password. Write it as a placeholder
	// ({env.REDIS_PASSWORD}, {file./run/secrets/redis}); it is never logged.
	Password string `json:"password,omitempty"`
	// DB is the Redis database number (not with a cluster). Default 0.
	DB int `json:"db,omitempty"`
	// TLS, when set, connects with TLS (the system roots unless CA is set).
	TLS *RedisTLS `json:"tls,omitempty"`
	// KeyPrefix starts every Redis key and the pub/sub channel. Brokers of
	// one fleet use the same prefix. Default "token_broker:".
	KeyPrefix string `json:"key_prefix,omitempty"`
	// EncryptionKey seals everything stored in Redis (AES-256-GCM): 32
	// bytes, base64. Required. Write it as a placeholder
	// ({file./run/secrets/token-cache-key}); it is never logged. Generate
	// one with `head -c 32 /dev/urandom | base64`. Every broker of the
	// fleet needs the same key.
	EncryptionKey string `json:"encryption_key,omitempty"`
	// EncryptionKeysOld are previous encryption keys: values sealed with
	// them still open, new values are sealed with EncryptionKey. To rotate,
	// first add the new key here on every broker, then make it the
	// EncryptionKey and list the old one here, then drop the old one.
	EncryptionKeysOld []string `json:"encryption_keys_old,omitempty"`
	// HashKeys names Redis keys by an HMAC of the cache key, so Redis does
	// not show merchant ids. Default true.
	HashKeys *bool `json:"hash_keys,omitempty"`
	// Timeout bounds each Redis call; a slower Redis is treated as down
	// (the broker mints locally). Default 50ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// LockTTL is the expiry of a key's fleet lock, after which another
	// broker takes over from one that died while minting. At least the
	// fetch timeout. Default the fetch timeout plus 5s (35s).
	LockTTL caddy.Duration `json:"lock_ttl,omitempty"`
}

// RedisTLS configures TLS to Redis.
type RedisTLS struct {
	// CA is a PEM file of the certificate authorities that sign the Redis
	// server's certificate. Default: the system roots.
	CA string `json:"ca,omitempty"`
	// Cert is a PEM client certificate file, for Redis servers that require
	// one (with Key).
	Cert string `json:"cert,omitempty"`
	// Key is the PEM private key file of Cert.
	Key string `json:"key,omitempty"`
	// ServerName is the name expected in the server's certificate. Default:
	// the host of the address.
	ServerName string `json:"server_name,omitempty"`
}

// fleetTier is a Redis client and its shared tier, kept across reloads in
// fleets while the Redis settings do not change.
type fleetTier struct {
	client  redis.UniversalClient
	cache   *fleet.Cache
	metrics *fleetMetrics
}

// Destruct closes the tier and its client.
func (f *fleetTier) Destruct() error {
	return errors.Join(f.cache.Close(), f.client.Close())
}

// fleets holds the shared tiers across config reloads, keyed by a hash of
// their settings.
var fleets = caddy.NewUsagePool()

// provision resolves placeholders, checks the settings and returns the
// (pooled) shared tier and the key to release it with.
func (r *RedisConfig) provision(ctx caddy.Context, fetchTimeout time.Duration, logger *zap.Logger) (*fleetTier, string, error) {
	rc := *r
	repl := caddy.NewReplacer()
	resolve := func(field, v string) (string, error) {
		out, err := repl.ReplaceOrErr(v, true, true)
		if err != nil {
			return "", fmt.Errorf("token_broker: redis: %s: %w", field, err)
		}
		return out, nil
	}
	var err error
	if r.Username != "" {
		if rc.Username, err = resolve("username", r.Username); err != nil {
			return nil, "", err
		}
	}
	if r.Password != "" {
		if rc.Password, err = resolve("password", r.Password); err != nil {
			return nil, "", err
		}
	}
	if len(rc.Address) == 0 {
		return nil, "", errors.New("token_broker: redis: address is required (host:port, or several for a cluster)")
	}
	if rc.EncryptionKey == "" {
		return nil, "", errors.New("token_broker: redis: encryption_key is required: 32 random bytes in base64 (head -c 32 /dev/urandom | base64), the same on every broker")
	}
	rc.EncryptionKey, err = resolve("encryption_key", rc.EncryptionKey)
	if err != nil {
		return nil, "", err
	}
	current, err := seal.ParseKey(rc.EncryptionKey)
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: redis: encryption_key: %w", err)
	}
	var old [][]byte
	rc.EncryptionKeysOld = append([]string(nil), r.EncryptionKeysOld...)
	for i, k := range rc.EncryptionKeysOld {
		if rc.EncryptionKeysOld[i], err = resolve(fmt.Sprintf("encryption_keys_old[%d]", i), k); err != nil {
			return nil, "", err
		}
		raw, err := seal.ParseKey(rc.EncryptionKeysOld[i])
		if err != nil {
			return nil, "", fmt.Errorf("token_broker: redis: encryption_keys_old[%d]: %w", i, err)
		}
		old = append(old, raw)
	}
	keys, err := seal.New(current, old...)
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: redis: %w", err)
	}
	timeout := time.Duration(rc.Timeout)
	if timeout < 0 || rc.LockTTL < 0 {
		return nil, "", errors.New("token_broker: redis: timeout and lock_ttl must not be negative")
	}
	if timeout == 0 {
		timeout = fleet.DefaultTimeout
	}
	if fetchTimeout <= 0 {
		fetchTimeout = broker.DefaultFetchTimeout
	}
	lockTTL := time.Duration(rc.LockTTL)
	if lockTTL == 0 {
		lockTTL = fetchTimeout + 5*time.Second
	}
	if lockTTL < fetchTimeout {
		return nil, "", fmt.Errorf("token_broker: redis: lock_ttl %s is shorter than fetch_timeout %s: a slow mint would lose its lock and the fleet would mint twice; raise lock_ttl", lockTTL, fetchTimeout)
	}
	uo := &redis.UniversalOptions{Addrs: rc.Address, MasterName: rc.MasterName, Username: rc.Username, Password: rc.Password, DB: rc.DB}
	if rc.TLS != nil {
		if uo.TLSConfig, err = rc.TLS.config(); err != nil {
			return nil, "", err
		}
	}
	fleet.ClientOptions(uo, timeout)

	// The pool key is a hash of the resolved settings (secrets included, so
	// a changed key builds a new tier), never the settings themselves.
	settings, _ := json.Marshal(struct {
		R       RedisConfig
		Fetch   time.Duration
		LockTTL time.Duration
	}{rc, fetchTimeout, lockTTL})
	sum := sha256.Sum256(settings)
	key := "redis " + hex.EncodeToString(sum[:])
	val, _, err := fleets.LoadOrNew(key, func() (caddy.Destructor, error) {
		client := redis.NewUniversalClient(uo)
		m := newFleetMetrics()
		cache, err := fleet.New(fleet.Options{
			Client: client, Keys: keys, KeyPrefix: rc.KeyPrefix, PlainKeys: rc.HashKeys != nil && !*rc.HashKeys,
			Timeout: timeout, LockTTL: lockTTL, Observer: m, Logger: logger.Named("redis"),
		})
		if err != nil {
			client.Close()
			return nil, err
		}
		return &fleetTier{client: client, cache: cache, metrics: m}, nil
	})
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: redis: %w", err)
	}
	tier := val.(*fleetTier)
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		if err := tier.metrics.register(reg); err != nil {
			fleets.Delete(key)
			return nil, "", err
		}
	}
	logger.Info("sharing tokens through redis", zap.Strings("address", rc.Address),
		zap.String("key_prefix", rc.KeyPrefix), zap.Bool("hash_keys", rc.HashKeys == nil || *rc.HashKeys),
		zap.Duration("timeout", timeout), zap.Duration("lock_ttl", lockTTL), zap.Int("old_keys", len(old)))
	return tier, key, nil
}

// config builds the client TLS configuration.
func (t *RedisTLS) config() (*tls.Config, error) {
	cfg := &tls.Config{MinVersion: tls.VersionTLS12, ServerName: t.ServerName}
	if t.CA != "" {
		pem, err := os.ReadFile(t.CA)
		if err != nil {
			return nil, fmt.Errorf("token_broker: redis: tls ca: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("token_broker: redis: tls ca %s: no PEM certificate in it", t.CA)
		}
		cfg.RootCAs = pool
	}
	if (t.Cert == "") != (t.Key == "") {
		return nil, errors.New("token_broker: redis: tls cert and key go together: set both or neither")
	}
	if t.Cert != "" {
		pair, err := tls.LoadX509KeyPair(t.Cert, t.Key)
		if err != nil {
			return nil, fmt.Errorf("token_broker: redis: tls cert %s / key %s: %w", t.Cert, t.Key, err)
		}
		cfg.Certificates = []tls.Certificate{pair}
	}
	return cfg, nil
}

// refreshStore is where the registry keeps refresh tokens: Redis when the
// shared tier is on, else Caddy's storage.
func (a *App) refreshStore(ctx caddy.Context) oauth.Store {
	if a.fleet != nil {
		return a.fleet.cache.Store()
	}
	return storageStore{s: ctx.Storage()}
}

// loadRegistryStore is loadRegistry with the refresh tokens in store and
// the consents in progress in Caddy's storage; the registry is kept across
// reloads (regcache.go) and key is its pool key.
func loadRegistryStore(ctx caddy.Context, path string, store oauth.Store, storeKey string) (reg *config.Registry, key string, err error) {
	path = caddy.NewReplacer().ReplaceKnown(path, "")
	return loadPooled(ctx.Logger(), path, config.Options{RefreshStore: store, ConsentStore: storagePending{s: ctx.Storage()}}, storeKey+" consents in "+storageID(ctx.Storage()))
}

// parseRedis reads the redis block of the token_broker global option.
func parseRedis(d *caddyfile.Dispenser) (*RedisConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	r := &RedisConfig{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if err := once(d, seen); err != nil {
			return nil, err
		}
		switch sub {
		case "address", "encryption_keys_old":
			args := d.RemainingArgs()
			if len(args) == 0 {
				return nil, d.ArgErr()
			}
			if sub == "address" {
				r.Address = args
			} else {
				r.EncryptionKeysOld = args
			}
			continue
		case "tls":
			t, err := parseRedisTLS(d)
			if err != nil {
				return nil, err
			}
			r.TLS = t
			continue
		}
		v, err := oneArg(d)
		if err != nil {
			return nil, err
		}
		switch sub {
		case "master_name":
			r.MasterName = v
		case "username":
			r.Username = v
		case "password":
			r.Password = v
		case "db":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return nil, d.Errf("db '%s': want a database number such as 0", v)
			}
			r.DB = n
		case "key_prefix":
			r.KeyPrefix = v
		case "encryption_key":
			r.EncryptionKey = v
		case "hash_keys":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, d.Errf("hash_keys '%s': want true or false", v)
			}
			r.HashKeys = &b
		case "timeout", "lock_ttl":
			dur, err := positiveDuration(d, sub, v, "50ms")
			if err != nil {
				return nil, err
			}
			if sub == "timeout" {
				r.Timeout = dur
			} else {
				r.LockTTL = dur
			}
		default:
			return nil, d.Errf("unrecognized redis subdirective '%s'", sub)
		}
	}
	if len(r.Address) == 0 {
		return nil, d.Err("redis: address is required")
	}
	if r.EncryptionKey == "" {
		return nil, d.Err("redis: encryption_key is required (32 random bytes, base64; use a placeholder such as {file./run/secrets/token-cache-key})")
	}
	return r, nil
}

// parseRedisTLS reads `tls` (a flag) or `tls { ca; cert; key; server_name }`.
func parseRedisTLS(d *caddyfile.Dispenser) (*RedisTLS, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	t := &RedisTLS{}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if err := once(d, seen); err != nil {
			return nil, err
		}
		v, err := oneArg(d)
		if err != nil {
			return nil, err
		}
		switch sub {
		case "ca":
			t.CA = v
		case "cert":
			t.Cert = v
		case "key":
			t.Key = v
		case "server_name":
			t.ServerName = v
		default:
			return nil, d.Errf("unrecognized redis tls subdirective '%s'", sub)
		}
	}
	return t, nil
}

// fleetMetrics counts what the shared tier does; it is the tier's
// fleet.Observer. Its collectors live as long as the tier and are
// registered in each config's metrics registry.
type fleetMetrics struct {
	lookups       *prometheus.CounterVec
	errors        *prometheus.CounterVec
	lockWaits     prometheus.Counter
	adopted       prometheus.Counter
	invalidations prometheus.Counter
	undecryptable prometheus.Counter
	bypassed      prometheus.Counter
	rolledBack    prometheus.Counter
}

func newFleetMetrics() *fleetMetrics {
	const ns, sub = "caddy", "token_broker"
	counter := func(name, help string) prometheus.Counter {
		return prometheus.NewCounter(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: name, Help: help})
	}
	return &fleetMetrics{
		lookups: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "l2_lookups_total",
			Help: "Reads of the shared (Redis) tier after a memory miss, by result: hit (a usable token) or miss."}, []string{"result"}),
		errors: prometheus.NewCounterVec(prometheus.CounterOpts{Namespace: ns, Subsystem: sub, Name: "l2_errors_total",
			Help: "Redis calls that failed or timed out, by operation."}, []string{"op"}),
		lockWaits:     counter("l2_lock_waits_total", "Lookups that waited for another broker of the fleet to mint."),
		adopted:       counter("l2_adopted_total", "Lookups that used a token another broker minted instead of minting."),
		invalidations: counter("l2_invalidations_received_total", "Purges announced by other brokers of the fleet."),
		undecryptable: counter("l2_undecryptable_total", "Values in Redis that did not open with the configured keys (ignored)."),
		bypassed:      counter("l2_bypassed_total", "Lookups that minted without the shared tier because Redis was unavailable, or without the key's lock after waiting lock_ttl for it."),
		rolledBack:    counter("l2_rolled_back_total", "Values in Redis older than one this broker had seen for their key (an old value written back), ignored."),
	}
}

func (m *fleetMetrics) register(registry *prometheus.Registry) error {
	for _, c := range []prometheus.Collector{m.lookups, m.errors, m.lockWaits, m.adopted, m.invalidations, m.undecryptable, m.bypassed, m.rolledBack} {
		if err := registry.Register(c); err != nil {
			var are prometheus.AlreadyRegisteredError
			if errors.As(err, &are) && are.ExistingCollector == c {
				continue
			}
			return fmt.Errorf("token_broker: registering redis metrics: %w", err)
		}
	}
	return nil
}

// L2Hit implements fleet.Observer.
func (m *fleetMetrics) L2Hit() { m.lookups.WithLabelValues("hit").Inc() }

// L2Miss implements fleet.Observer.
func (m *fleetMetrics) L2Miss() { m.lookups.WithLabelValues("miss").Inc() }

// L2Error implements fleet.Observer.
func (m *fleetMetrics) L2Error(op string) { m.errors.WithLabelValues(op).Inc() }

// LockWait implements fleet.Observer.
func (m *fleetMetrics) LockWait() { m.lockWaits.Inc() }

// Adopted implements fleet.Observer.
func (m *fleetMetrics) Adopted() { m.adopted.Inc() }

// InvalidationReceived implements fleet.Observer.
func (m *fleetMetrics) InvalidationReceived() { m.invalidations.Inc() }

// Undecryptable implements fleet.Observer.
func (m *fleetMetrics) Undecryptable() { m.undecryptable.Inc() }

// Bypassed implements fleet.Observer.
func (m *fleetMetrics) Bypassed() { m.bypassed.Inc() }

// RolledBack implements fleet.Observer.
func (m *fleetMetrics) RolledBack() { m.rolledBack.Inc() }

// Interface guards.
var (
	_ fleet.Observer         = (*fleetMetrics)(nil)
	_ fleet.RollbackObserver = (*fleetMetrics)(nil)
)
