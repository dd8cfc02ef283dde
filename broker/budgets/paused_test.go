package budgets

import (
	"bytes"
	"context"
	"errors"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// A budget shared through the fleet tier's Redis while Redis holds every
// command (CLIENT PAUSE): each budget call ends within the tier's adaptive
// bound (the first within the shortest bound, not the client's timeout_max),
// the tier's breaker opens on the budget's calls alone, and meanwhile this
// sidecar spends only its share of the limit (rate_limit / fleet_size) in
// the fallback bucket, answered at once once the breaker is open.
func TestBudgetPausedRedis(t *testing.T) {
	srv := redistest.Start(t)
	const timeout, maxTimeout = 20 * time.Millisecond, time.Second
	uo := &redis.UniversalOptions{Addrs: []string{srv.Addr()}}
	fleet.ClientOptions(uo, timeout, maxTimeout)
	client := redis.NewUniversalClient(uo)
	t.Cleanup(func() { client.Close() })
	keys, err := seal.New(bytes.Repeat([]byte{1}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	cache, err := fleet.New(fleet.Options{Client: client, Keys: keys, KeyPrefix: "tb-test:", Timeout: timeout, MaxTimeout: maxTimeout, SlowSpan: 2 * maxTimeout})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cache.Close() })

	// 3 per 100 s: the whole limit lets 3 requests through at once, a
	// third of it (fleet_size 3) one.
	spec := Spec{Provider: "nuapay", Endpoint: "https://api.example", Limit: budget.Limit{Rate: 3, Period: 100 * time.Second, Burst: 3}, FleetSize: 3}
	b, err := NewKeeper(nil).Budget(spec, New(cache), "redis")
	if err != nil {
		t.Fatal(err)
	}
	take := func() (time.Duration, bool) {
		t.Helper()
		start := time.Now()
		_, err := b.Take(context.Background(), budget.Foreground, time.Now().Add(time.Second), nil)
		took := time.Since(start)
		if ee := (*budget.ExhaustedError)(nil); err != nil && !errors.As(err, &ee) {
			t.Fatalf("Take: %v; want a token request or the budget exhausted", err)
		}
		return took, err == nil
	}
	if _, ok := take(); !ok {
		t.Fatal("Redis answering: the first request of the budget was refused")
	}

	// Long enough for the breaker to open (a slow span and three
	// timeouts) even on busy CPUs.
	if got := srv.CLI("CLIENT", "PAUSE", "12000", "ALL"); got != "OK\n" {
		t.Fatalf("CLIENT PAUSE: %q", got)
	}
	allowed := 0
	for i := 0; cache.Available(); i++ {
		if i == 50 {
			t.Fatalf("the tier's breaker is still closed after %d budget calls to a paused Redis", i)
		}
		took, ok := take()
		if ok {
			allowed++
		}
		limit := maxTimeout + 200*time.Millisecond
		if i == 0 {
			limit = maxTimeout / 2 // the shortest bound, well under timeout_max
		}
		if took > limit {
			t.Errorf("budget call %d with Redis paused took %s; want at most %s", i, took, limit)
		}
	}
	for i := range 5 {
		took, ok := take()
		if ok {
			allowed++
		}
		// A call that reached the paused Redis would wait for the tier's
		// bound, grown towards timeout_max by the timeouts above; half of
		// timeout_max leaves room for busy CPUs.
		if took > maxTimeout/2 {
			t.Errorf("budget call %d with the breaker open took %s; want the fallback at once", i, took)
		}
	}
	if want := spec.Limit.Share(spec.FleetSize).Burst; allowed != want {
		t.Errorf("requests allowed while Redis was paused: %d; want this sidecar's share %d (fleet_size %d of burst %d), not the whole limit",
			allowed, want, spec.FleetSize, spec.Limit.Burst)
	}
}
