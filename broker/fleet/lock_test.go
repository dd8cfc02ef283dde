package fleet

import (
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestLockWithoutExpiry: a lock key without expiry (set by hand, a bug, a
// failover that lost it) does not stall its key until every lookup times
// out: a token's lock is taken as expired, and a lookup takes the lock and
// mints once; a refresh token's lock is given half the lock TTL, then
// taken. The context is five times the lock TTL, so a lookup that waited
// for the context to end would fail.
func TestLockWithoutExpiry(t *testing.T) {
	for _, tt := range []struct {
		name    string
		grace   bool // the lock keeps half the lock TTL for a live owner
		subject func(n *node) string
		take    func(n *node) error
	}{
		{"token", false, func(n *node) string { return "tok:" + n.name(testKey) }, func(n *node) error {
			var m minter
			tok, adopted, err := n.Fetch(testCtxFor(t, 10*time.Second), testKey, usable, m.mint)
			if err == nil && (adopted || m.n.Load() != 1 || tok.Value == "") {
				t.Errorf("Fetch: adopted=%v mints=%d; want one mint under the lock", adopted, m.n.Load())
			}
			return err
		}},
		{"refresh token", true, func(n *node) string { return "rt:" + n.name("bank/m1") }, func(n *node) error {
			unlock, err := n.Store().Lock(testCtxFor(t, 10*time.Second), "bank/m1")
			if err == nil {
				unlock()
			}
			return err
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := startRedis(t)
			n := newNode(t, r, testKeys(t, 1), func(o *Options) {
				o.LockTTL = 2 * time.Second
				o.LockPoll = 50 * time.Millisecond
			})
			raw := r.Client()
			lockKey := n.lockKey(tt.subject(n))
			if err := raw.Set(testCtx(t), lockKey, "left-without-expiry", 0).Err(); err != nil {
				t.Fatal(err)
			}
			start := time.Now()
			if err := tt.take(n); err != nil {
				t.Fatalf("with a lock without expiry: %v; want it repaired and taken", err)
			}
			if took := time.Since(start); tt.grace && took < 900*time.Millisecond {
				t.Errorf("took the lock after %s; want it left to a live holder for half the lock TTL (1s)", took)
			}
			if n.obs.bypass() != 0 {
				t.Errorf("bypassed = %d; want the lock taken, not bypassed", n.obs.bypass())
			}
			if v := raw.Get(testCtx(t), lockKey).Val(); v == "left-without-expiry" {
				t.Errorf("the lock without expiry is still there")
			}
		})
	}
}

// TestLockWaitBoundedByLockTTL: a lookup that has waited the lock TTL for
// another node's lock (held longer than any mint of this fleet takes: here
// a lock of ten minutes) mints without it, stores and announces its token,
// rather than wait for its context to end. The wait is measured on the
// injected clock and on the real one its timers run on.
func TestLockWaitBoundedByLockTTL(t *testing.T) {
	for _, tt := range []struct {
		name    string
		lockTTL time.Duration
		advance bool // move the injected clock by the lock TTL
	}{
		{"injected clock", 10 * time.Second, true},
		{"real time", 500 * time.Millisecond, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := startRedis(t)
			keys := testKeys(t, 1)
			n := newNode(t, r, keys, func(o *Options) {
				o.LockTTL = tt.lockTTL
				o.LockPoll = 20 * time.Millisecond
			})
			other := newNode(t, r, keys, nil)
			ctx := testCtx(t)
			lockKey := n.lockKey("tok:" + n.name(testKey))
			if err := r.Client().Set(ctx, lockKey, "stuck-node", 10*time.Minute).Err(); err != nil {
				t.Fatal(err)
			}
			type result struct {
				tok     broker.Token
				adopted bool
				err     error
			}
			var m minter
			done := make(chan result, 1)
			go func() {
				tok, adopted, err := n.Fetch(ctx, testKey, usable, m.mint)
				done <- result{tok, adopted, err}
			}()
			for n.obs.wait() == 0 {
				select {
				case res := <-done:
					t.Fatalf("returned without waiting: %+v", res)
				case <-time.After(5 * time.Millisecond):
				}
			}
			if tt.advance {
				select {
				case res := <-done:
					t.Fatalf("returned before the lock TTL had passed: %+v", res)
				case <-time.After(100 * time.Millisecond):
				}
				n.clock.Add(tt.lockTTL)
			}
			res := <-done
			if res.err != nil || res.adopted || m.n.Load() != 1 || n.obs.bypass() != 1 {
				t.Fatalf("after waiting the lock TTL: adopted=%v err=%v mints=%d bypassed=%d; want one mint without the lock",
					res.adopted, res.err, m.n.Load(), n.obs.bypass())
			}
			// The token is shared: another node adopts it.
			var m2 minter
			tok, adopted, err := other.Fetch(ctx, testKey, usable, m2.mint)
			if err != nil || !adopted || tok.Value != res.tok.Value || m2.n.Load() != 0 {
				t.Fatalf("another node: adopted=%v err=%v mints=%d; want the token adopted", adopted, err, m2.n.Load())
			}
		})
	}
}
