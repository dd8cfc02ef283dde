package module

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy" // the example proxies
	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
)

func TestUnmarshalRedis(t *testing.T) {
	no := false
	tests := []struct {
		name    string
		input   string
		want    *RedisConfig
		wantErr string
	}{
		{name: "all", input: `token_broker {
				redis {
					address a:6379 b:6379
					master_name mymaster
					username {env.REDIS_USER}
					password {env.REDIS_PASSWORD}
					db 2
					tls {
						ca /ca.pem
						cert /c.pem
						key /k.pem
						server_name redis.internal
					}
					key_prefix tb:
					encryption_key {file./run/secrets/k}
					encryption_keys_old {env.OLD1} {env.OLD2}
					hash_keys false
					timeout 80ms
					timeout_max 3s
					lock_ttl 40s
				}
			}`,
			want: &RedisConfig{Address: []string{"a:6379", "b:6379"}, MasterName: "mymaster", Username: "{env.REDIS_USER}",
				Password: "{env.REDIS_PASSWORD}", DB: 2, TLS: &RedisTLS{CA: "/ca.pem", Cert: "/c.pem", Key: "/k.pem", ServerName: "redis.internal"},
				KeyPrefix: "tb:", EncryptionKey: "{file./run/secrets/k}", EncryptionKeysOld: []string{"{env.OLD1}", "{env.OLD2}"},
				HashKeys: &no, Timeout: caddy.Duration(80 * time.Millisecond), TimeoutMax: caddy.Duration(3 * time.Second), LockTTL: caddy.Duration(40 * time.Second)}},
		{name: "minimal with tls flag", input: "token_broker {\n redis {\n address r:6379\n encryption_key K\n tls\n }\n}",
			want: &RedisConfig{Address: []string{"r:6379"}, EncryptionKey: "K", TLS: &RedisTLS{}}},
		{name: "no key", input: "token_broker {\n redis {\n address r:6379\n }\n}", wantErr: "encryption_key is required"},
		{name: "no address", input: "token_broker {\n redis {\n encryption_key K\n }\n}", wantErr: "address is required"},
		{name: "bad timeout", input: "token_broker {\n redis {\n timeout soon\n }\n}", wantErr: "timeout 'soon': want a positive duration like 50ms, at Testfile:3"},
		{name: "bad hash_keys", input: "token_broker {\n redis {\n hash_keys maybe\n }\n}", wantErr: "hash_keys 'maybe'"},
		{name: "unknown", input: "token_broker {\n redis {\n cluster yes\n }\n}", wantErr: "unrecognized redis subdirective 'cluster', at Testfile:3"},
		{name: "duplicate", input: "token_broker {\n redis {\n db 1\n db 2\n }\n}", wantErr: "duplicate subdirective 'db', at Testfile:4"},
		{name: "unknown tls", input: "token_broker {\n redis {\n tls {\n insecure yes\n }\n }\n}", wantErr: "unrecognized redis tls subdirective 'insecure'"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a App
			err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(a.Redis, tt.want) {
				t.Fatalf("got %+v\nwant %+v", a.Redis, tt.want)
			}
		})
	}
}

func TestProvisionRedis(t *testing.T) {
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	short := base64.StdEncoding.EncodeToString([]byte("secret-but-too-short"))
	t.Setenv("TB_TEST_REDIS_KEY", key)
	t.Setenv("TB_TEST_SHORT_KEY", short)
	// Nothing listens on port 1: provisioning must not need Redis up.
	addr := []string{"127.0.0.1:1"}
	tests := []struct {
		name    string
		cfg     RedisConfig
		fetch   time.Duration
		wantErr string
	}{
		{name: "env key", cfg: RedisConfig{Address: addr, EncryptionKey: "{env.TB_TEST_REDIS_KEY}", Timeout: caddy.Duration(20 * time.Millisecond)}},
		{name: "missing env", cfg: RedisConfig{Address: addr, EncryptionKey: "{env.TB_TEST_NOT_SET}"}, wantErr: "encryption_key"},
		{name: "short key", cfg: RedisConfig{Address: addr, EncryptionKey: "{env.TB_TEST_SHORT_KEY}"}, wantErr: "encryption_key: seal: the key decodes to 20 bytes; want 32"},
		{name: "short old key", cfg: RedisConfig{Address: addr, EncryptionKey: key, EncryptionKeysOld: []string{short}}, wantErr: "encryption_keys_old[0]"},
		{name: "lock shorter than fetch", cfg: RedisConfig{Address: addr, EncryptionKey: key, LockTTL: caddy.Duration(time.Second)}, fetch: 5 * time.Second, wantErr: "lock_ttl 1s is shorter than fetch_timeout 5s"},
		{name: "timeout_max shorter than timeout", cfg: RedisConfig{Address: addr, EncryptionKey: key, Timeout: caddy.Duration(time.Second), TimeoutMax: caddy.Duration(100 * time.Millisecond)},
			wantErr: "timeout_max 100ms is shorter than timeout 1s"},
		{name: "timeout_max beyond the fetch", cfg: RedisConfig{Address: addr, EncryptionKey: key, TimeoutMax: caddy.Duration(3 * time.Second)}, fetch: 10 * time.Second,
			wantErr: "timeout_max 3s is longer than a quarter of fetch_timeout 10s"},
		{name: "cert without key", cfg: RedisConfig{Address: addr, EncryptionKey: key, TLS: &RedisTLS{Cert: "/c.pem"}}, wantErr: "cert and key go together"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
			defer cancel()
			tier, poolKey, err := tt.cfg.provision(ctx, tt.fetch, zap.NewNop(), zap.NewNop())
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				if strings.Contains(err.Error(), key) || strings.Contains(err.Error(), short) {
					t.Fatal("the error reveals a key")
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			defer fleets.Delete(poolKey)
			if strings.Contains(poolKey, key) {
				t.Fatal("the pool key reveals the encryption key")
			}
			// Redis is down: a lookup mints locally, counted as bypassed.
			tok, adopted, err := tier.Cache.Fetch(context.Background(), "k", func(t brokerToken) bool { return true }, mintOne)
			if err != nil || adopted || tok.Value != "minted" {
				t.Fatalf("Fetch with redis down: adopted=%v err=%v", adopted, err)
			}
			reg := prometheus.NewRegistry()
			if err := tier.Cache.Metrics().Register(reg); err != nil {
				t.Fatal(err)
			}
			if got := counterValue(t, reg, "caddy_token_broker_l2_bypassed_total"); got != 1 {
				t.Fatalf("bypassed = %g; want 1", got)
			}
		})
	}
}

// counterValue is the value of the counter name in reg.
func counterValue(t *testing.T, reg *prometheus.Registry, name string) float64 {
	t.Helper()
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == name && len(f.GetMetric()) == 1 {
			return f.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("no counter %s", name)
	return 0
}

type brokerToken = broker.Token

func mintOne(context.Context) (broker.Token, error) {
	return broker.Token{Value: "minted", Expiry: time.Now().Add(time.Hour)}, nil
}

// The example's Caddyfile adapts to a redis block whose secrets stay
// placeholders (resolved at provision, never written into the JSON).
func TestExampleFleetRedisAdapts(t *testing.T) {
	body, err := os.ReadFile(filepath.Join("..", "examples", "fleet-redis", "Caddyfile"))
	if err != nil {
		t.Fatal(err)
	}
	out, warnings, err := caddyconfig.GetAdapter("caddyfile").Adapt(body, map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatal(err)
	}
	if len(warnings) > 0 {
		t.Fatalf("warnings: %v", warnings)
	}
	var cfg struct {
		Apps struct {
			TokenBroker App `json:"token_broker"`
		} `json:"apps"`
	}
	if err := json.Unmarshal(out, &cfg); err != nil {
		t.Fatal(err)
	}
	want := &RedisConfig{Address: []string{"127.0.0.1:6390"}, KeyPrefix: "token_broker:",
		EncryptionKey: "{env.TOKEN_CACHE_KEY}", Timeout: caddy.Duration(50 * time.Millisecond)}
	if got := cfg.Apps.TokenBroker.Redis; !reflect.DeepEqual(got, want) {
		t.Fatalf("redis = %+v\nwant %+v", got, want)
	}
}

// The log line that announces the shared tier shows the key prefix in
// use, the default one when none is set.
func TestRedisLogShowsKeyPrefix(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	core, logs := observer.New(zap.InfoLevel)
	cfg := RedisConfig{Address: []string{"127.0.0.1:1"}, EncryptionKey: base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))}
	_, key, err := cfg.provision(ctx, 0, zap.New(core), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer fleets.Delete(key)
	got := logs.FilterMessage("sharing tokens through redis").All()
	if len(got) != 1 || got[0].ContextMap()["key_prefix"] != fleet.DefaultKeyPrefix {
		t.Fatalf("log entries %+v; want one with key_prefix %q", got, fleet.DefaultKeyPrefix)
	}
}
