package fleet

import (
	"fmt"
	"testing"
	"time"
)

// TestPurgeUnsentIsSentLater: a node purges a token (the upstream
// rejected it) while it cannot reach Redis, once or until its breaker
// opens. Once Redis answers again, the node sends the purge: the other
// node hears it and drops the token, and Redis no longer stores it.
func TestPurgeUnsentIsSentLater(t *testing.T) {
	tests := []struct {
		name  string
		tries int // failed purges
	}{
		{name: "one failed purge", tries: 1},
		{name: "breaker opened", tries: BreakerThreshold},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := startRedis(t)
			keys := testKeys(t, 1)
			px := newProxy(t, r.Addr())
			a := newNodeAt(t, px.Addr(), keys, func(o *Options) { o.Timeout = 200 * time.Millisecond })
			b := newNode(t, r, keys, nil)
			ctx := testCtx(t)
			tok, heard := sharedToken(t, a, b, &minter{})
			px.setCut(true)
			for range tt.tries {
				if err := a.Purge(ctx, testKey, tok.Fingerprint()); err == nil {
					t.Fatal("Purge with Redis cut off succeeded")
				}
			}
			if got := a.Available(); got != (tt.tries < BreakerThreshold) {
				t.Fatalf("a's tier available: %v after %d failed purges", got, tt.tries)
			}
			heardPurge(t, heard, "", 200*time.Millisecond)
			a.clock.Add(BreakerCooldown)
			px.setCut(false)
			heardPurge(t, heard, tok.Fingerprint(), 20*time.Second)
			if n := r.Client().Exists(ctx, a.tokenKey(testKey)).Val(); n != 0 {
				t.Fatal("Redis still stores the purged token")
			}
		})
	}
}

// TestUnsentPurgesBounded: a node whose Redis is gone keeps at most
// maxUnsent purges to send, dropping the one whose token expires first,
// and drops each when its token has expired.
func TestUnsentPurgesBounded(t *testing.T) {
	a := newNodeAt(t, "127.0.0.1:1", testKeys(t, 1), func(o *Options) { o.Timeout = 20 * time.Millisecond })
	ctx := testCtx(t)
	for i := range maxUnsent + 1 {
		if err := a.Purge(ctx, fmt.Sprintf("key-%d", i), "fp"); err == nil {
			t.Fatal("Purge with Redis gone succeeded")
		}
		a.clock.Add(time.Millisecond)
	}
	kept := func() (int, bool) {
		a.unsent.mu.Lock()
		defer a.unsent.mu.Unlock()
		_, first := a.unsent.m[unsentPurge{"key-0", "fp"}]
		return len(a.unsent.m), first
	}
	if n, first := kept(); n != maxUnsent || first {
		t.Fatalf("%d purges kept, the first one among them: %v; want %d, not the first", n, first, maxUnsent)
	}
	a.clock.Add(unsentTTL)
	if a.resend() {
		t.Fatal("resend goes on with every purge's token expired")
	}
	if n, _ := kept(); n != 0 {
		t.Fatalf("%d purges kept after their tokens expired", n)
	}
}
