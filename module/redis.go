package module

import (
	"fmt"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/certmagic"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/fleet/redisstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// RedisConfig turns on the shared token tier: the brokers of a fleet keep
// their tokens (sealed) and the merchants' refresh tokens in one Redis, so
// the fleet mints one token per key per lifetime and shares rotated refresh
// tokens. Without it nothing is shared. Caddyfile, inside the token_broker
// global option:
//
//	redis {
//	    address        <host:port>...      # one (or a unix socket /path): a server; several: a cluster
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
//	    timeout_max    2s
//	    lock_ttl       35s
//	}
//
// The tier's series on Caddy's /metrics are those of fleet.Metrics.
type RedisConfig struct {
	// Address is the Redis address (host:port, or alone a unix socket's
	// /path), or several: the nodes of a cluster, or sentinels (MasterName).
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
	// Timeout is the shortest bound of a Redis call. Each call's bound
	// follows how fast Redis answers (its recent latency, longer after a
	// timeout and while calls queue for a connection), from Timeout to
	// TimeoutMax. Redis that cannot be reached is treated as down at once
	// (the broker mints locally); timeouts only when they last 5s (or
	// twice TimeoutMax) without an answer. Default 50ms.
	Timeout caddy.Duration `json:"timeout,omitempty"`
	// TimeoutMax is the longest bound of a Redis call, from Timeout to a
	// quarter of the fetch timeout. Default 2s (within those limits).
	TimeoutMax caddy.Duration `json:"timeout_max,omitempty"`
	// LockTTL is fleet.Options.LockTTL: a refresh-token lock's expiry,
	// a token lock's longest lease. At least the fetch timeout. Default
	// the fetch timeout plus 5s (35s).
	LockTTL caddy.Duration `json:"lock_ttl,omitempty"`
}

// RedisTLS configures TLS to Redis (redisstore.TLS).
type RedisTLS = redisstore.TLS

// fleets holds the shared tiers (*redisstore.Tier) across config
// reloads while the Redis settings do not change, keyed by a hash of
// their settings.
var fleets = caddy.NewUsagePool()

// provision resolves placeholders, checks the settings and returns the
// (pooled) shared tier, logging through kept, and the key to release it
// with.
func (r *RedisConfig) provision(ctx caddy.Context, fetchTimeout time.Duration, logger, kept *zap.Logger) (*redisstore.Tier, string, error) {
	s, err := redisstore.Settings{Address: r.Address, MasterName: r.MasterName, Username: r.Username, Password: r.Password,
		DB: r.DB, TLS: r.TLS, KeyPrefix: r.KeyPrefix, EncryptionKey: r.EncryptionKey, EncryptionKeysOld: r.EncryptionKeysOld,
		PlainKeys: r.HashKeys != nil && !*r.HashKeys, Timeout: time.Duration(r.Timeout), MaxTimeout: time.Duration(r.TimeoutMax), LockTTL: time.Duration(r.LockTTL),
		FetchTimeout: fetchTimeout}.Resolve(resolveSecret)
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: redis: %w", err)
	}
	plan, err := redisstore.Prepare(s)
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: redis: %w", err)
	}
	val, _, err := fleets.LoadOrNew(plan.Key, func() (caddy.Destructor, error) {
		tier, err := plan.Open(kept.Named("redis"))
		if err != nil {
			return nil, err
		}
		return tier, nil
	})
	if err != nil {
		return nil, "", fmt.Errorf("token_broker: redis: %w", err)
	}
	tier := val.(*redisstore.Tier)
	if reg := ctx.GetMetricsRegistry(); reg != nil {
		if err := tier.Cache.Metrics().Register(reg); err != nil {
			fleets.Delete(plan.Key)
			return nil, "", fmt.Errorf("token_broker: %w", err)
		}
	}
	logger.Info("sharing tokens through redis", zap.Strings("address", s.Address),
		zap.String("key_prefix", tier.Cache.KeyPrefix()), zap.Bool("hash_keys", !s.PlainKeys),
		zap.Duration("timeout", plan.Timeout), zap.Duration("timeout_max", plan.MaxTimeout), zap.Duration("lock_ttl", plan.LockTTL), zap.Int("old_keys", plan.OldKeys))
	return tier, plan.Key, nil
}

// refreshStore is where the registry keeps refresh tokens: Redis when the
// shared tier is on, else storage (Caddy's).
func (a *App) refreshStore(storage certmagic.Storage) oauth.Store {
	if a.fleet != nil {
		return a.fleet.Cache.Store()
	}
	return storageStore(storage, a.storageKeys)
}

// parseRedis reads the redis block of the token_broker global option.
func parseRedis(d *caddyfile.Dispenser) (*RedisConfig, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	r := &RedisConfig{}
	fields := map[string]*string{"master_name": &r.MasterName, "username": &r.Username, "password": &r.Password,
		"key_prefix": &r.KeyPrefix, "encryption_key": &r.EncryptionKey}
	durations := map[string]*caddy.Duration{"timeout": &r.Timeout, "timeout_max": &r.TimeoutMax, "lock_ttl": &r.LockTTL}
	lists := map[string]*[]string{"address": &r.Address, "encryption_keys_old": &r.EncryptionKeysOld}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if err := once(d, seen); err != nil {
			return nil, err
		}
		switch sub {
		case "address", "encryption_keys_old":
			if *lists[sub] = d.RemainingArgs(); len(*lists[sub]) == 0 {
				return nil, d.ArgErr()
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
		if field, ok := fields[sub]; ok {
			*field = v
			continue
		}
		switch sub {
		case "db":
			n, err := strconv.Atoi(v)
			if err != nil || n < 0 {
				return nil, d.Errf("db '%s': want a database number such as 0", v)
			}
			r.DB = n
		case "hash_keys":
			b, err := strconv.ParseBool(v)
			if err != nil {
				return nil, d.Errf("hash_keys '%s': want true or false", v)
			}
			r.HashKeys = &b
		case "timeout", "timeout_max", "lock_ttl":
			dur, err := positiveDuration(d, sub, v, "50ms")
			if err != nil {
				return nil, err
			}
			*durations[sub] = dur
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
	fields := map[string]*string{"ca": &t.CA, "cert": &t.Cert, "key": &t.Key, "server_name": &t.ServerName}
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
		field, ok := fields[sub]
		if !ok {
			return nil, d.Errf("unrecognized redis tls subdirective '%s'", sub)
		}
		*field = v
	}
	return t, nil
}
