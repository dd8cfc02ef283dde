package fleet

import (
	"fmt"
	"sync/atomic"
	"testing"
	"time"
)

// TestWriteRefusingRedisIsUnavailable: a Redis that answers reads but
// refuses every write (a read-only replica, maxmemory reached without
// eviction, an ACL without write commands) cannot share tokens: each
// lookup mints. Its refusals open the breaker although reads succeed in
// between, so the node says Redis is unavailable and keeps it out; a read
// answered after the cooldown does not close the breaker, a write does once
// Redis takes writes again.
func TestWriteRefusingRedisIsUnavailable(t *testing.T) {
	for _, tc := range []struct {
		name          string
		refuse, allow []string // redis-cli arguments
	}{
		{"replica", []string{"REPLICAOF", "127.0.0.1", "1"}, []string{"REPLICAOF", "NO", "ONE"}},
		{"maxmemory", []string{"CONFIG", "SET", "maxmemory", "1"}, []string{"CONFIG", "SET", "maxmemory", "0"}},
		{"acl", []string{"ACL", "SETUSER", "default", "-@write"}, []string{"ACL", "SETUSER", "default", "+@write"}},
	} {
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
			// After the cooldown, a read answered by the refusing Redis
			// does not close the breaker; the next write refused opens it
			// again.
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
