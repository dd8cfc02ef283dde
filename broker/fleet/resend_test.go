package fleet

import (
	"errors"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// TestPurgeUnsentIsSentLater: a node purges a token (the upstream
// rejected it) while it cannot reach Redis, once or until its breaker
// opens. Once Redis answers again, the node sends the purge at once
// (redisAnswered, within answeredWithin): the other node hears it and
// drops the token, and Redis no longer stores it.
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
			r, px, a, b := proxiedPair(t)
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
			heardPurge(t, heard, tok.Fingerprint(), answeredWithin)
			if n := r.Client().Exists(ctx, a.tokenKey(testKey)).Val(); n != 0 {
				t.Fatal("Redis still stores the purged token")
			}
		})
	}
}

// answeredWithin is how long a test waits for a purge to be sent again
// once Redis answers: shorter than resendLoop's BreakerCooldown ticker,
// started by the purge's first try, so that the purge arrives in time only
// when Redis answering wakes the loop (redisAnswered).
const answeredWithin = BreakerCooldown / 2

// proxiedPair starts a Redis and two nodes of it: a reaches it through
// a proxy the test can cut, with calls bounded by 200 ms, and b directly.
func proxiedPair(t *testing.T) (*redistest.Server, *proxy, *node, *node) {
	r := startRedis(t)
	px := newProxy(t, r.Addr())
	return r, px, newNodeAt(t, px.Addr(), testKeys(t, 1), func(o *Options) { o.Timeout = 200 * time.Millisecond }), newNode(t, r, testKeys(t, 1), nil)
}

// goneRedis returns the address of a Redis that is gone: a listener of
// the test's own (so no other server gets its port) that closes each
// connection at once.
func goneRedis(t *testing.T) string {
	px := newProxy(t, "")
	px.setCut(true)
	return px.Addr()
}

// TestUnsentPurgesBounded: a node whose Redis is gone keeps at most
// maxUnsent purges to send, dropping the one whose token expires first,
// and drops each when its token has expired.
func TestUnsentPurgesBounded(t *testing.T) {
	a := newNodeAt(t, goneRedis(t), testKeys(t, 1), func(o *Options) { o.Timeout = 20 * time.Millisecond })
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

// TestUnsentPurgeNotKept: a purge Redis did not take is not kept to be
// sent again when a try again would fail the same way (its announcement
// does not seal: logged), or when it purges any token ("") and the node
// had seen none: what Redis stores by the next try may be newer.
func TestUnsentPurgeNotKept(t *testing.T) {
	tests := []struct {
		name        string
		fingerprint string
		err         error // the purge's outcome; nil: a Purge with Redis gone
		kept        bool
		logged      bool
	}{
		{name: "Redis gone", fingerprint: "fp", kept: true},
		{name: "the announcement does not seal", fingerprint: "fp", err: fmt.Errorf("%w: %w", errSeal, errors.New("no randomness")), logged: true},
		{name: "any token, none seen", fingerprint: ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			core, logs := observer.New(zap.WarnLevel)
			a := newNodeAt(t, goneRedis(t), testKeys(t, 1), func(o *Options) { o.Timeout = 20 * time.Millisecond; o.Logger = zap.New(core) })
			p := unsentPurge{testKey, tt.fingerprint}
			if tt.err == nil {
				if err := a.Purge(testCtx(t), testKey, tt.fingerprint); err == nil {
					t.Fatal("Purge with Redis gone succeeded")
				}
			} else {
				a.keepUnsent(p, unsentFloor{set: true}, false, tt.err)
			}
			a.unsent.mu.Lock()
			_, kept := a.unsent.m[p]
			a.unsent.mu.Unlock()
			if kept != tt.kept {
				t.Errorf("kept to be sent again: %v; want %v", kept, tt.kept)
			}
			if logged := logs.FilterMessageSnippet("not sent again").Len() > 0; logged != tt.logged {
				t.Errorf("logged: %v; want %v", logged, tt.logged)
			}
		})
	}
}

// TestResendStopsWhenClosed: a node keeps purges to send while its Redis
// is gone, and is closed: resend tries none of them and ends.
func TestResendStopsWhenClosed(t *testing.T) {
	a := newNodeAt(t, goneRedis(t), testKeys(t, 1), func(o *Options) { o.Timeout = 20 * time.Millisecond })
	for i := range 3 {
		if err := a.Purge(testCtx(t), fmt.Sprintf("key-%d", i), "fp"); err == nil {
			t.Fatal("Purge with Redis gone succeeded")
		}
	}
	a.Close()
	a.clock.Add(BreakerCooldown)
	if a.resend() {
		t.Fatal("resend goes on after the Cache closed")
	}
}

// TestResendKeepsANewerToken: a node purges a token while Redis is cut
// off from it, and another node then mints a newer token of the key
// (stored in Redis). When the purge is sent again, Redis keeps the newer
// token, and neither node drops or refuses it: the purge names the token
// purged (a purge of any token, "", the one the purging node had seen),
// with the floor of its first try.
func TestResendKeepsANewerToken(t *testing.T) {
	tests := []struct {
		name string
		any  bool // Purge(key, "")
	}{
		{name: "the purged token's fingerprint"},
		{name: "any token", any: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, px, a, b := proxiedPair(t)
			ctx := testCtx(t)
			var m minter
			tok, heard := sharedToken(t, a, b, &m)
			fp := tok.Fingerprint()
			if tt.any {
				fp = ""
			}
			px.setCut(true)
			if err := a.Purge(ctx, testKey, fp); err == nil {
				t.Fatal("Purge with Redis cut off succeeded")
			}
			newer, adopted, err := b.Fetch(ctx, testKey, func(t broker.Token) bool { return usable(t) && t.Value != tok.Value }, m.mint)
			if err != nil || adopted || newer.Value == tok.Value {
				t.Fatalf("b: adopted=%v err=%v; want a newer token minted", adopted, err)
			}
			a.clock.Add(BreakerCooldown)
			px.setCut(false)
			select {
			case <-heard:
			case <-time.After(answeredWithin):
				t.Fatal("the purge was not sent again")
			}
			for _, n := range []*node{b, a} {
				got, _, err := n.Fetch(ctx, testKey, usable, m.mint)
				if err != nil || got.Value != newer.Value {
					t.Errorf("after the purge was sent again, a node gets %s (%v); want the newer %s", got.Fingerprint(), err, newer.Fingerprint())
				}
			}
			if n := m.n.Load(); n != 2 {
				t.Errorf("%d tokens minted; want 2", n)
			}
		})
	}
}

// TestResendAnnouncesTheFirstFloor: a node purges a token while Redis is
// cut off from it, then, Redis back, adopts a newer token another node
// minted meanwhile before the purge is sent again. The purge sent again
// carries the floor of its first try: a third node that had the purged
// token refuses it when it is written back to Redis.
func TestResendAnnouncesTheFirstFloor(t *testing.T) {
	r, px, a, b := proxiedPair(t)
	c := newNode(t, r, testKeys(t, 1), nil)
	ctx := testCtx(t)
	var m minter
	sharedToken(t, a, b, &m)
	tok, heard := sharedToken(t, a, c, &m)
	purged, err := r.Client().Get(ctx, a.tokenKey(testKey)).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	px.setCut(true)
	if err := a.Purge(ctx, testKey, tok.Fingerprint()); err == nil {
		t.Fatal("Purge with Redis cut off succeeded")
	}
	newer, adopted, err := b.Fetch(ctx, testKey, func(t broker.Token) bool { return usable(t) && t.Value != tok.Value }, m.mint)
	if err != nil || adopted {
		t.Fatalf("b: adopted=%v err=%v; want a newer token minted", adopted, err)
	}
	px.setCut(false)
	if got, adopted, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil || !adopted || got.Value != newer.Value {
		t.Fatalf("a: adopted=%v err=%v; want b's newer token adopted", adopted, err)
	}
	a.clock.Add(resendEvery)
	a.redisAnswered()
	select {
	case <-heard:
	case <-time.After(answeredWithin):
		t.Fatal("the purge was not sent again")
	}
	if err := r.Client().Set(ctx, a.tokenKey(testKey), purged, 0).Err(); err != nil {
		t.Fatal(err)
	}
	if got, _, err := c.Fetch(ctx, testKey, usable, m.mint); err != nil || got.Value == tok.Value {
		t.Fatalf("c gets %s (%v) written back after the purge; want it refused", got.Fingerprint(), err)
	}
}
