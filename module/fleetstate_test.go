package module

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
)

// TestStateFleetTierAfterFailedLoad: a config load that fails after the
// app provisioned (another module's error) with the running config's
// Redis but other cache settings leaves the running app's view of the
// shared tier live: when the tier's breaker opens afterwards (Redis is
// down: nothing listens on port 1), the state says so.
func TestStateFleetTierAfterFailedLoad(t *testing.T) {
	t.Setenv("TB_TEST_REDIS_KEY", base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32))))
	provision := func(leeway time.Duration) *App {
		t.Helper()
		ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
		t.Cleanup(cancel)
		app := &App{Leeway: caddy.Duration(leeway), Redis: &RedisConfig{Address: []string{"127.0.0.1:1"},
			EncryptionKey: "{env.TB_TEST_REDIS_KEY}", Timeout: caddy.Duration(20 * time.Millisecond)}}
		if err := app.Provision(ctx); err != nil {
			t.Fatal(err)
		}
		return app
	}
	running := provision(time.Second)
	t.Cleanup(func() { _ = running.Cleanup() })
	prev := current.Load()
	t.Cleanup(func() { current.Store(prev) })
	if err := running.Start(); err != nil {
		t.Fatal(err)
	}
	failed := provision(2 * time.Second) // the same tier, another broker
	if failed.fleet != running.fleet || failed.pooled == running.pooled {
		t.Fatal("want the failed load to share the running app's tier, not its broker")
	}
	if err := failed.Cleanup(); err != nil {
		t.Fatal(err)
	}

	for i := range fleet.BreakerThreshold {
		if _, _, err := running.fleet.Cache.Fetch(context.Background(), fmt.Sprint("k", i), func(brokerToken) bool { return true }, mintOne); err != nil {
			t.Fatal(err)
		}
	}
	if running.fleet.Cache.Available() {
		t.Fatal("the breaker did not open")
	}
	_, rec := getState(t, http.MethodGet, "")
	var r opstate.Report
	if err := json.Unmarshal(rec.Body.Bytes(), &r); err != nil || r.Fleet == nil {
		t.Fatalf("%s: %v", rec.Body, err)
	}
	if r.Fleet.Up || r.Fleet.LastError == "" {
		t.Fatalf("with Redis down after a failed load: %+v; want the tier down, with its error", *r.Fleet)
	}
}

// The log line that announces the shared tier shows the key prefix in
// use, the default one when none is set.
func TestRedisLogShowsKeyPrefix(t *testing.T) {
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	core, logs := observer.New(zap.InfoLevel)
	cfg := RedisConfig{Address: []string{"127.0.0.1:1"}, EncryptionKey: base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))}
	_, key, err := cfg.provision(ctx, 0, zap.New(core))
	if err != nil {
		t.Fatal(err)
	}
	defer fleets.Delete(key)
	got := logs.FilterMessage("sharing tokens through redis").All()
	if len(got) != 1 || got[0].ContextMap()["key_prefix"] != fleet.DefaultKeyPrefix {
		t.Fatalf("log entries %+v; want one with key_prefix %q", got, fleet.DefaultKeyPrefix)
	}
}
