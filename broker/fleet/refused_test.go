package fleet

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/internal/breaker"
)

// writeRefusals are the ways a Redis answers reads but refuses writes:
// the redis-cli arguments that make it refuse, and those that make it take
// writes again.
var writeRefusals = []struct {
	name          string
	refuse, allow []string
}{
	{"replica", []string{"REPLICAOF", "127.0.0.1", "1"}, []string{"REPLICAOF", "NO", "ONE"}},
	{"maxmemory", []string{"CONFIG", "SET", "maxmemory", "1"}, []string{"CONFIG", "SET", "maxmemory", "0"}},
	{"acl", []string{"ACL", "SETUSER", "default", "-@write"}, []string{"ACL", "SETUSER", "default", "+@write"}},
}

// TestWriteRefusingRedisIsUnavailable: a Redis that answers reads but
// refuses every write (a read-only replica, maxmemory reached without
// eviction, an ACL without write commands) cannot share tokens: each
// lookup mints. Its refusals open the breaker although reads succeed in
// between, so the node says Redis is unavailable and keeps it out; after
// the cooldown the probe writes first, so the breaker closes only once
// Redis takes writes again.
func TestWriteRefusingRedisIsUnavailable(t *testing.T) {
	for _, tc := range writeRefusals {
		t.Run(tc.name, func(t *testing.T) {
			r := startRedis(t)
			a := newNode(t, r, testKeys(t, 1), nil)
			var downs, ups atomic.Int64
			a.OnAvailability(func(up bool, err error) {
				if up {
					ups.Add(1)
				} else {
					downs.Add(1)
				}
			})
			ctx := testCtx(t)
			var m minter
			if _, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil {
				t.Fatal(err)
			}
			r.CLI(tc.refuse...)
			for i := 0; i < 2*BreakerThreshold; i++ {
				before := m.n.Load()
				tok, adopted, err := a.Fetch(ctx, fmt.Sprint("refused-", i), usable, m.mint)
				if err != nil || adopted || tok.Value == "" || m.n.Load() != before+1 {
					t.Fatalf("lookup %d: adopted=%v err=%v mints=%d; want one local mint", i, adopted, err, m.n.Load()-before)
				}
			}
			if a.Available() || downs.Load() != 1 || a.obs.opened() != 1 {
				t.Fatalf("available=%v told down %d, opened %d; want unavailable, told once", a.Available(), downs.Load(), a.obs.opened())
			}
			// After the cooldown, the probe's write is refused: the
			// breaker opens again although Redis answers reads.
			a.clock.Add(BreakerCooldown)
			for i := 0; i < 2; i++ {
				if _, _, err := a.Fetch(ctx, fmt.Sprint("probe-", i), usable, m.mint); err != nil {
					t.Fatal(err)
				}
			}
			if a.Available() || ups.Load() != 0 {
				t.Fatalf("available=%v told up %d after a cooldown with writes still refused; want unavailable, never told up", a.Available(), ups.Load())
			}
			r.CLI(tc.allow...)
			a.clock.Add(BreakerCooldown)
			deadline := time.Now().Add(10 * time.Second)
			for i := 0; !a.Available() || ups.Load() != 1; i++ {
				if time.Now().After(deadline) {
					t.Fatalf("available=%v told up %d after redis took writes again", a.Available(), ups.Load())
				}
				if _, _, err := a.Fetch(ctx, fmt.Sprint("back-", i), usable, m.mint); err != nil {
					t.Fatal(err)
				}
			}
		})
	}
}

// TestReadsCloseAfterWritesRefusedAgain: once Redis takes writes again,
// a node that only reads (lookups of a token already stored) closes the
// breaker after the cooldown: the probe writes first. Then concurrent
// lookups of the stored token all find it: no token is minted.
func TestReadsCloseAfterWritesRefusedAgain(t *testing.T) {
	r := startRedis(t)
	a := newNode(t, r, testKeys(t, 1), nil)
	var ups atomic.Int64
	a.OnAvailability(func(up bool, err error) {
		if up {
			ups.Add(1)
		}
	})
	ctx := testCtx(t)
	var m minter
	if _, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil {
		t.Fatal(err)
	}
	r.CLI("CONFIG", "SET", "maxmemory", "1")
	for i := 0; a.Available(); i++ {
		if i == 2*BreakerThreshold {
			t.Fatalf("the breaker is closed after %d lookups refused by a full Redis", i)
		}
		if _, _, err := a.Fetch(ctx, fmt.Sprint("refused-", i), usable, m.mint); err != nil {
			t.Fatal(err)
		}
	}
	r.CLI("CONFIG", "SET", "maxmemory", "0")
	a.clock.Add(BreakerCooldown)
	before := m.n.Load()
	if tok, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil || tok.Value == "" {
		t.Fatalf("lookup after the cooldown: %v", err)
	}
	if a.br.State() != breaker.Closed || ups.Load() != 1 {
		t.Fatalf("breaker %s, told up %d after a lookup of a stored token with Redis taking writes; want closed, told once", a.br.State(), ups.Load())
	}
	const lookups = 320
	var wg sync.WaitGroup
	errs := make(chan error, lookups)
	for i := 0; i < lookups; i++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if _, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil {
				errs <- err
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	if n := m.n.Load() - before; n != 0 {
		t.Fatalf("%d concurrent lookups of a stored token minted %d tokens; want 0", lookups, n)
	}
}

// TestRefusedFollowsWrites: only a write Redis refuses (writeRefusal)
// marks Redis as refusing writes; another error answer is a failure of
// its call, so healthy reads still close the breaker and reset its count.
// Only a call that certainly wrote clears the mark: not a budget call that
// may only read, nor a purge that found nothing.
func TestRefusedFollowsWrites(t *testing.T) {
	r := startRedis(t)
	a := newNode(t, r, testKeys(t, 1), nil)
	ctx := testCtx(t)
	list := a.opts.KeyPrefix + "a-list"
	r.CLI("RPUSH", list, "x")
	tests := []struct {
		name     string
		refused  bool // before the call
		op       string
		fn       func(context.Context) error
		want     bool // after it
		failures bool // whether the call fails
	}{
		{"a read's error answer", false, "get", func(ctx context.Context) error { return a.opts.Client.Get(ctx, list).Err() }, false, true},
		{"a write's error answer other than a refusal", false, "set", func(ctx context.Context) error { return a.opts.Client.Incr(ctx, list).Err() }, false, true},
		{"a call of a Run caller that may only read", true, "budget", func(ctx context.Context) error { return a.opts.Client.PTTL(ctx, list).Err() }, true, false},
		{"a purge that found nothing", true, "purge", func(ctx context.Context) error {
			return purgeScript.Run(ctx, a.opts.Client, []string{a.tokenKey("missing")}, "").Err()
		}, true, false},
		{"a write", true, "set", func(ctx context.Context) error {
			return a.opts.Client.Set(ctx, a.tokenKey("w"), "v", time.Minute).Err()
		}, false, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			a.refused.Store(tt.refused)
			err := a.Run(ctx, tt.op, tt.fn)
			if (err != nil && !errors.Is(err, redis.Nil)) != tt.failures {
				t.Fatalf("err %v; want failing %v", err, tt.failures)
			}
			if got := a.refused.Load(); got != tt.want {
				t.Fatalf("refused %v after the call; want %v", got, tt.want)
			}
		})
	}
	// Error answers to reads between healthy reads never add up to
	// opening the breaker.
	a.refused.Store(false)
	for i := 0; i < 3*BreakerThreshold; i++ {
		fn := func(ctx context.Context) error { return a.opts.Client.Get(ctx, a.tokenKey("missing")).Err() }
		if i%BreakerThreshold != 0 {
			fn = tests[0].fn
		}
		_ = a.Run(ctx, "get", fn)
		if !a.Available() {
			t.Fatalf("the breaker opened on call %d, after error answers to reads with healthy reads between them", i)
		}
	}
}
