// Package redisstore opens the fleet's shared tier (package fleet) on a
// Redis client: it checks the settings, builds the client's options and
// TLS configuration, and seals with the configured keys.
package redisstore

import (
	"crypto/sha256"
	"crypto/tls"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// Settings are the shared tier's settings, every placeholder resolved.
// Error messages name each by its config name.
type Settings struct {
	// Address is one Redis server (host:port, or the path of its unix
	// socket, starting with "/"), the nodes of a cluster, or sentinels
	// when MasterName is set. Required.
	Address []string
	// MasterName is the master that Sentinel monitors.
	MasterName string
	// Username is the Redis ACL user.
	Username string
	// Password is the Redis password; never logged.
	Password string
	// DB is the Redis database number.
	DB int
	// TLS, when set, connects with TLS.
	TLS *TLS
	// KeyPrefix starts every Redis key and the pub/sub channel.
	KeyPrefix string
	// EncryptionKey seals the values: 32 bytes, base64. Required.
	EncryptionKey string
	// EncryptionKeysOld are previous keys that still open values.
	EncryptionKeysOld []string
	// PlainKeys names Redis keys by the cache key, not its HMAC.
	PlainKeys bool
	// Timeout is the shortest bound of a Redis call (fleet.Options).
	// Default fleet.DefaultTimeout.
	Timeout time.Duration
	// MaxTimeout is the longest bound of a Redis call, from Timeout to a
	// quarter of FetchTimeout. Default fleet.DefaultMaxTimeout, within
	// those limits.
	MaxTimeout time.Duration
	// LockTTL is fleet.Options.LockTTL (the expiry of a refresh token's
	// fleet lock, and the most a token's lease lasts), at least
	// FetchTimeout. Default FetchTimeout plus fleet.LockMargin.
	LockTTL time.Duration
	// FetchTimeout is the broker's fetch timeout. Default
	// broker.DefaultFetchTimeout.
	FetchTimeout time.Duration
}

// Resolve returns s with its secrets (Username, Password, EncryptionKey,
// EncryptionKeysOld) passed through resolve, which expands placeholders;
// the error names the field.
func (s Settings) Resolve(resolve func(string) (string, error)) (Settings, error) {
	type field struct {
		name  string
		value *string
	}
	s.EncryptionKeysOld = slices.Clone(s.EncryptionKeysOld)
	fields := []field{{"username", &s.Username}, {"password", &s.Password}, {"encryption_key", &s.EncryptionKey}}
	for i := range s.EncryptionKeysOld {
		fields = append(fields, field{fmt.Sprintf("encryption_keys_old[%d]", i), &s.EncryptionKeysOld[i]})
	}
	for _, f := range fields {
		out, err := resolve(*f.value)
		if err != nil {
			return Settings{}, fmt.Errorf("%s: %w", f.name, err)
		}
		*f.value = out
	}
	return s, nil
}

// TLS configures TLS to Redis. Its JSON form is the tls object of the
// token_broker app's redis settings.
type TLS struct {
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

// Plan is a checked Settings: what Open builds a tier from.
type Plan struct {
	// Key identifies the settings (secrets included, so that a changed
	// key makes another plan) and the content of the TLS files they name,
	// without revealing them.
	Key string
	// Timeout, MaxTimeout and LockTTL are the settings with their
	// defaults.
	Timeout, MaxTimeout, LockTTL time.Duration
	// OldKeys counts the previous encryption keys.
	OldKeys int

	s    Settings
	keys *seal.Keyring
	opts *redis.UniversalOptions
}

// Prepare checks s, reads its TLS files and returns the plan of its tier.
// Redis is not contacted.
func Prepare(s Settings) (*Plan, error) {
	if len(s.Address) == 0 {
		return nil, errors.New("address is required (host:port, or several for a cluster)")
	}
	if s.EncryptionKey == "" {
		return nil, errors.New("encryption_key is required: 32 random bytes in base64 (head -c 32 /dev/urandom | base64), the same on every broker")
	}
	if err := s.checkServers(); err != nil {
		return nil, err
	}
	keys, err := seal.ParseKeyring("encryption_key", s.EncryptionKey, "encryption_keys_old", s.EncryptionKeysOld, nil)
	if err != nil {
		return nil, err
	}
	if s.Timeout < 0 || s.MaxTimeout < 0 || s.LockTTL < 0 {
		return nil, errors.New("timeout, timeout_max and lock_ttl must not be negative")
	}
	if s.Timeout == 0 {
		s.Timeout = fleet.DefaultTimeout
	}
	if s.FetchTimeout <= 0 {
		s.FetchTimeout = broker.DefaultFetchTimeout
	}
	switch {
	case s.MaxTimeout == 0:
		s.MaxTimeout = max(s.Timeout, min(fleet.DefaultMaxTimeout, s.FetchTimeout/4))
	case s.MaxTimeout < s.Timeout:
		return nil, fmt.Errorf("timeout_max %s is shorter than timeout %s: raise timeout_max (the longest bound of a Redis call) or lower timeout (the shortest)", s.MaxTimeout, s.Timeout)
	case s.MaxTimeout > s.FetchTimeout/4:
		return nil, fmt.Errorf("timeout_max %s is longer than a quarter of fetch_timeout %s: a lookup makes several Redis calls and would outlive its fetch; lower timeout_max", s.MaxTimeout, s.FetchTimeout)
	}
	if s.LockTTL == 0 {
		s.LockTTL = s.FetchTimeout + fleet.LockMargin
	}
	if s.LockTTL < s.FetchTimeout {
		return nil, fmt.Errorf("lock_ttl %s is shorter than fetch_timeout %s: a slow mint would lose its lock and the fleet would mint twice; raise lock_ttl", s.LockTTL, s.FetchTimeout)
	}
	key := planKey(s)
	opts := &redis.UniversalOptions{Addrs: s.Address, MasterName: s.MasterName, Username: s.Username, Password: s.Password, DB: s.DB}
	if s.TLS != nil {
		if opts.TLSConfig, err = s.TLS.config(); err != nil {
			return nil, err
		}
	}
	fleet.ClientOptions(opts, s.Timeout, s.MaxTimeout)
	return &Plan{Key: key, Timeout: s.Timeout, MaxTimeout: s.MaxTimeout, LockTTL: s.LockTTL, OldKeys: len(s.EncryptionKeysOld),
		s: s, keys: keys, opts: opts}, nil
}

// checkServers checks what the client would otherwise fail on at every
// call, Redis then seeming down for good: each address is host:port
// without credentials, or the path of a unix socket (starting with "/")
// when it is the only address, and db is a database the deployment has (a
// cluster only has 0).
func (s Settings) checkServers() error {
	for _, a := range s.Address {
		if len(s.Address) == 1 && strings.HasPrefix(a, "/") {
			continue // the client dials it as a unix socket
		}
		_, port, err := net.SplitHostPort(a)
		if n, perr := strconv.ParseUint(port, 10, 16); err != nil || perr != nil || n == 0 || strings.Contains(a, "@") {
			return fmt.Errorf("address %q: want host:port, such as redis.internal:6379, or a unix socket's path alone (no scheme: for TLS set tls; for credentials, username and password)", redactAddress(a))
		}
	}
	switch {
	case s.DB < 0:
		return fmt.Errorf("db %d: want a database number, 0 or more", s.DB)
	case s.DB != 0 && s.MasterName == "" && len(s.Address) > 1:
		return fmt.Errorf("db %d: several addresses make a cluster, which has only database 0: drop db, or set master_name if the addresses are sentinels", s.DB)
	}
	return nil
}

// redactAddress returns a Redis address as an error may show it: what
// comes before its last "@" (credentials) is shown as "xxxxx", and what
// comes from the first "?" or "#" on (a query or fragment, which may carry
// a password) is dropped.
func redactAddress(a string) string {
	if i := strings.LastIndex(a, "@"); i >= 0 {
		a = "xxxxx" + a[i:]
	}
	if i := strings.IndexAny(a, "?#"); i >= 0 {
		a = a[:i]
	}
	return a
}

// planKey hashes the settings and the content of the TLS files they name,
// so that a replaced CA bundle, client certificate or key makes another
// plan. It is made before the client's TLS setup reads the files: a file
// replaced between the two reads then gives a key of the old content, and
// the next reload opens a tier with the new one. A file it cannot read adds
// nothing; the TLS setup reports it.
func planKey(s Settings) string {
	h := sha256.New()
	settings, _ := json.Marshal(s)
	h.Write(settings)
	if s.TLS != nil {
		for _, name := range []string{s.TLS.CA, s.TLS.Cert, s.TLS.Key} {
			if name == "" {
				continue
			}
			b, _ := os.ReadFile(name)
			fmt.Fprintf(h, "\x00%d:", len(b))
			h.Write(b)
		}
	}
	return "redis " + hex.EncodeToString(h.Sum(nil))
}

// config builds the client TLS configuration (httpclient.TLSOptions);
// without files nor server name, TLS with the system roots.
func (t *TLS) config() (*tls.Config, error) {
	if (t.Cert == "") != (t.Key == "") {
		return nil, errors.New("tls cert and key go together: set both or neither")
	}
	cfg, err := httpclient.TLSOptions{CertFile: t.Cert, KeyFile: t.Key, CAFile: t.CA, ServerName: t.ServerName}.Config()
	if err != nil {
		return nil, fmt.Errorf("tls: %w", err)
	}
	if cfg == nil {
		cfg = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	return cfg, nil
}

// Tier is a Redis client and the shared tier over it. Destruct it when
// done.
type Tier struct {
	// Cache is the shared tier; Cache.Metrics counts what it does.
	Cache *fleet.Cache

	client redis.UniversalClient
}

// Open creates the plan's client and tier; it does not wait for Redis.
func (p *Plan) Open(logger *zap.Logger) (*Tier, error) {
	client := redis.NewUniversalClient(p.opts)
	cache, err := fleet.New(fleet.Options{
		Client: client, Keys: p.keys, KeyPrefix: p.s.KeyPrefix, PlainKeys: p.s.PlainKeys,
		Timeout: p.Timeout, MaxTimeout: p.MaxTimeout, LockTTL: p.LockTTL, Logger: logger,
	})
	if err != nil {
		client.Close()
		return nil, err
	}
	return &Tier{Cache: cache, client: client}, nil
}

// Destruct closes the tier, so that a Tier can be kept in a
// caddy.UsagePool: it stops listening to the fleet at once, and closes the
// client once the lookups and refresh-token locks under way have ended
// (fleet.Cache.Drain): a reload that replaces the tier during a mint
// leaves the token stored and the key's fleet lock released.
func (t *Tier) Destruct() error {
	err := t.Cache.Close()
	t.Cache.Drain(func() { _ = t.client.Close() })
	return err
}
