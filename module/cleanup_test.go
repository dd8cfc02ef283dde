package module

import (
	"context"
	"encoding/base64"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet/redisstore"
	"github.com/tokenbroker/caddy-token-broker/broker/reload"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/config/regcache"
	"github.com/tokenbroker/caddy-token-broker/integration/banktest"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// TestCleanupAtReloadKeepsRefresh: a merchant's refresh is sent to a bank
// that rotates refresh tokens, the broker's fetch times out, and the
// config is replaced (the app's Cleanup, not at exit: the registry
// released, the broker and the shared tier closed) before the bank
// answers. Cleanup does not wait for the refresh (Caddy holds its config
// lock meanwhile), and the rotated refresh token still reaches Redis: the
// tier's client stays open until the merchant's lock is released. At exit
// the release of the registry (regcache.Cache.Release, as Cleanup calls
// it when Caddy exits; a cache of the test's own, whose exit deadline
// stays its own) waits for the bank's answer, and the rotated refresh
// token is in Redis when it returns, before Cleanup closes the tier.
func TestCleanupAtReloadKeepsRefresh(t *testing.T) {
	for _, exiting := range []bool{false, true} {
		t.Run(fmt.Sprintf("exiting=%v", exiting), func(t *testing.T) { testCleanupKeepsRefresh(t, exiting) })
	}
}

func testCleanupKeepsRefresh(t *testing.T, exiting bool) {
	r := redistest.Start(t)
	bank := banktest.Start(t)
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(bank.Registry("timeout = \"1m\"", "acme")), 0o600); err != nil {
		t.Fatal(err)
	}

	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	cctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	tier, fleetKey, err := (&RedisConfig{Address: []string{r.Addr()}, EncryptionKey: key}).provision(cctx, 0, zap.NewNop(), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	cache := registries
	if exiting {
		cache = regcache.New()
	}
	reg, regKey, _, err := cache.Load(path, config.Options{RefreshStore: tier.Cache.Store(), LookupEnv: banktest.LookupEnv}, "store "+fleetKey)
	if err != nil {
		t.Fatal(err)
	}
	poolKey := "fetch_timeout=200ms " + t.Name()
	val, _, err := brokers.LoadOrNew(poolKey, func() (caddy.Destructor, error) {
		return &pooledBroker{Broker: &reload.Broker{Broker: broker.New(broker.Options{FetchTimeout: 200 * time.Millisecond, MaxAttempts: 1}),
			Logger: zap.NewNop()}, unwatchFleet: func() {}}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	app := &App{registry: reg, registryKey: regKey, fleet: tier, fleetKey: fleetKey, poolKey: poolKey, logger: zap.NewNop()}
	p := reg.Providers["bank"]
	src, _ := p.RefreshToken()
	if err := src.SetRefreshToken(context.Background(), "acme", "rt-1"); err != nil {
		t.Fatal(err)
	}

	arrived, answer := bank.Hold(t)
	b := brokertest.NewBinding(p.ID, p.Source, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
	if _, _, err := val.(*pooledBroker).Get(context.Background(), b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a fetch the bank does not answer: %v; want its timeout", err)
	}
	<-arrived

	// Another sidecar of the fleet (a tier of its own) loads the rotated one.
	plan, err := redisstore.Prepare(redisstore.Settings{Address: []string{r.Addr()}, EncryptionKey: key, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	other, err := plan.Open(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Destruct()
	stored := func() (broker.Secret, error) {
		return other.Cache.Store().Load(context.Background(), src.StoreKey("acme"))
	}

	if exiting {
		app.registryKey = ""
		released := make(chan struct{})
		go func() { cache.Release(regKey, true, zap.NewNop()); close(released) }()
		select {
		case <-released:
			t.Fatal("the release at exit returned with a refresh unanswered")
		case <-time.After(300 * time.Millisecond):
		}
		answer()
		<-released
		if rt, err := stored(); rt != "rt-2" {
			t.Fatalf("after the release at exit the store has %q (%v); want the rotated rt-2", rt.Reveal(), err)
		}
	}
	cleaned := make(chan error, 1)
	go func() { cleaned <- app.Cleanup() }()
	select {
	case err := <-cleaned:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Cleanup at a reload waits for a refresh the bank does not answer")
	}
	answer()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		rt, err := stored()
		if rt == "rt-2" {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after Cleanup the store has %q (%v); want the rotated rt-2", rt.Reveal(), err)
		}
	}
}
