package module

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// TestBudgetRedisNeedsFleetSize: with redis, the budget of a provider with
// rate_limit is not made without fleet_size (each sidecar would spend the
// whole limit while Redis fails), and the error says what to set; with
// fleet_size it is, its fallback this sidecar's share.
func TestBudgetRedisNeedsFleetSize(t *testing.T) {
	t.Setenv("TB_TEST_REDIS_KEY", base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32))))
	ctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	rc := &RedisConfig{Address: []string{"127.0.0.1:1"}, EncryptionKey: "{env.TB_TEST_REDIS_KEY}", Timeout: caddy.Duration(20 * time.Millisecond)}
	tier, key, err := rc.provision(ctx, 0, zap.NewNop(), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _, _ = fleets.Delete(key) })
	p := &config.Provider{Name: "np", Endpoint: "https://api.example", RateLimit: budget.Limit{Rate: 20, Period: time.Second, Burst: 20}}
	for _, tt := range []struct {
		fleetSize int
		want      string // "" when the budget is made
	}{
		{0, `provider "np" has rate_limit 20/s burst 20, shared by the fleet through redis, but fleet_size is not set: set the token_broker app's fleet_size`},
		{3, ""},
	} {
		app := &App{Redis: rc, FleetSize: tt.fleetSize, fleet: tier, fleetKey: key}
		b, err := app.budgetsFor()(p)
		if tt.want == "" && (err != nil || b == nil) || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
			t.Errorf("fleet_size %d: budget %v, error %v; want %q", tt.fleetSize, b, err, tt.want)
		}
		if b != nil {
			budgetKeeper.Release(nil) // forget it: held by no configuration
		}
	}
}
