package fleet

import (
	"context"
	"fmt"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// A cold burst of lookups on three nodes while Redis holds every command
// (CLIENT PAUSE: a Redis starved of CPU): the calls outlive the bounds the
// nodes had learnt, yet the fleet waits for Redis instead of each node
// minting for itself, and no breaker opens. Then Redis dies (its process
// killed): every node's breaker opens after a few lookups, without waiting
// for the slow span.
func TestSlowRedisKeepsTheFleet(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	const timeout, maxTimeout = 10 * time.Millisecond, 3 * time.Second
	real := func(o *Options) { o.Timeout, o.MaxTimeout, o.Now = timeout, maxTimeout, time.Now }
	nodes := []*node{newNode(t, r, keys, real), newNode(t, r, keys, real), newNode(t, r, keys, real)}
	ctx := testCtx(t)
	var m minter
	for i, n := range nodes {
		if _, _, err := n.Fetch(ctx, fmt.Sprintf("warm-%d", i), usable, m.mint); err != nil {
			t.Fatal(err)
		}
	}
	before := m.n.Load()

	const merchants = 200
	const pause = 500 * time.Millisecond
	if got := r.CLI("CLIENT", "PAUSE", fmt.Sprint(pause.Milliseconds()), "ALL"); got != "OK\n" {
		t.Fatalf("CLIENT PAUSE: %q", got)
	}
	var wg sync.WaitGroup
	errs := make(chan error, merchants*len(nodes))
	for _, n := range nodes {
		for k := range merchants {
			wg.Go(func() {
				if _, _, err := n.Fetch(ctx, fmt.Sprintf("merchant-%d", k), usable, m.mint); err != nil {
					errs <- err
				}
			})
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	var timeouts int64
	for i, n := range nodes {
		timeouts += n.obs.timeouts()
		if n.obs.bypass() != 0 || n.obs.opened() != 0 || !n.Available() {
			t.Errorf("node %d: bypassed %d, breaker opened %d, available %v; want the fleet kept", i, n.obs.bypass(), n.obs.opened(), n.Available())
		}
	}
	if got := m.n.Load() - before; got != merchants {
		t.Errorf("token requests for %d merchants on %d nodes: %d; want %d", merchants, len(nodes), got, merchants)
	}
	if timeouts == 0 {
		t.Fatalf("no call outlived its bound during a %s pause: the test did not make Redis slow", pause)
	}
	t.Logf("%d calls timed out during the burst; %d token requests", timeouts, m.n.Load()-before)

	r.Kill()
	for i, n := range nodes {
		start := time.Now()
		for k := 0; n.Available(); k++ {
			if k == BreakerThreshold {
				t.Fatalf("node %d: the breaker is still closed after %d lookups with redis dead", i, k)
			}
			if _, _, err := n.Fetch(ctx, fmt.Sprintf("dead-%d-%d", i, k), usable, m.mint); err != nil {
				t.Fatal(err)
			}
		}
		if d := time.Since(start); d >= maxTimeout {
			t.Errorf("node %d: the breaker opened %s after redis died; want at once, not after timeouts", i, d)
		}
		if n.obs.opened() != 1 {
			t.Errorf("node %d: breaker opened %d times; want once", i, n.obs.opened())
		}
	}
}

// Cold lookups while Redis holds every command (CLIENT PAUSE): the Redis
// calls of a lookup last at most timeout_max together (a timed-out GET is
// tried again from the current bound, but not past that), then the lookup
// mints without Redis; the mint runs on the caller's context, its
// deadline the caller's, not what Redis left.
func TestPausedRedisBoundsALookup(t *testing.T) {
	r := startRedis(t)
	const timeout, maxTimeout = 10 * time.Millisecond, 400 * time.Millisecond
	n := newNode(t, r, testKeys(t, 1), func(o *Options) { o.Timeout, o.MaxTimeout, o.Now = timeout, maxTimeout, time.Now })
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	callerDeadline, _ := ctx.Deadline()
	var m minter
	if _, _, err := n.Fetch(ctx, "warm", usable, m.mint); err != nil {
		t.Fatal(err)
	}

	if got := r.CLI("CLIENT", "PAUSE", "5000", "ALL"); got != "OK\n" {
		t.Fatalf("CLIENT PAUSE: %q", got)
	}
	const lookups = 20
	took := make([]time.Duration, lookups)
	errs := make(chan error, lookups)
	var wg sync.WaitGroup
	for i := range lookups {
		wg.Go(func() {
			start := time.Now()
			_, _, err := n.Fetch(ctx, fmt.Sprintf("cold-%d", i), usable, func(mctx context.Context) (broker.Token, error) {
				if d, ok := mctx.Deadline(); !ok || !d.Equal(callerDeadline) {
					return broker.Token{}, fmt.Errorf("the mint's deadline is %v (set %v), want the caller's %v", d, ok, callerDeadline)
				}
				return m.mint(mctx)
			})
			took[i] = time.Since(start)
			if err != nil {
				errs <- err
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	// Without the limit a lookup's GET alone runs 10, 20, 40 ... 400 ms:
	// over a second. The margin is for busy CPUs.
	limit := maxTimeout + 300*time.Millisecond
	for i, d := range took {
		if d > limit {
			t.Errorf("lookup %d with Redis paused took %s; want its Redis calls within timeout_max %s (at most %s)", i, d, maxTimeout, limit)
		}
	}
	if got := n.obs.bypass(); got != lookups {
		t.Errorf("%d lookups bypassed Redis, want %d", got, lookups)
	}
}
