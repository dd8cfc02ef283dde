package fleet

import (
	"fmt"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// waitFor polls cond with backoff until it holds or 10 s pass.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for d := time.Millisecond; !cond(); d = min(2*d, 100*time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within 10 s", what)
		}
		time.Sleep(d)
	}
}

// TestPurgedTokenWrittenBackIsRefused: the sealed value of a purged token,
// copied from Redis before the purge and written back to its key, opens
// (it is the fleet's own ciphertext) but is older than the purge: the node
// that purged, a node that cached the token, and a node that only heard the
// purge announced all refuse it and mint a new token.
func TestPurgedTokenWrittenBackIsRefused(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	purger, holder, listener := newNode(t, r, keys, nil), newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	raw := r.Client()
	var m minter
	old, _, err := purger.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	if tok, adopted, err := holder.Fetch(ctx, testKey, usable, m.mint); err != nil || !adopted || tok.Value != old.Value {
		t.Fatalf("holder: adopted=%v err=%v; want the token adopted", adopted, err)
	}
	copied, err := raw.Get(ctx, purger.tokenKey(testKey)).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	if err := purger.Purge(ctx, testKey, old.Fingerprint()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the purge announcement", func() bool { return holder.obs.inval() == 1 && listener.obs.inval() == 1 })

	for _, tt := range []struct {
		name string
		n    *node
	}{{"the purging node", purger}, {"a node that cached it", holder}, {"a node that heard the purge", listener}} {
		t.Run(tt.name, func(t *testing.T) {
			if err := raw.Set(ctx, purger.tokenKey(testKey), copied, time.Hour).Err(); err != nil {
				t.Fatal(err)
			}
			before := m.n.Load()
			tok, adopted, err := tt.n.Fetch(ctx, testKey, usable, m.mint)
			if err != nil || adopted || tok.Value == old.Value || m.n.Load() != before+1 {
				t.Fatalf("after the purged token was written back: adopted=%v err=%v purged token served=%v mints=%d; want it refused and one mint",
					adopted, err, tok.Value == old.Value, m.n.Load()-before)
			}
			if tt.n.obs.rolledBack() == 0 {
				t.Error("the rollback was not counted")
			}
		})
	}
}

// TestNewestTokenVersionKept: a token older than the one a node has seen
// for the key (an old value written back over a refreshed one) is refused;
// the newest is still adopted.
func TestNewestTokenVersionKept(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	raw := r.Client()
	var m minter
	if _, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil {
		t.Fatal(err)
	}
	first, _ := raw.Get(ctx, a.tokenKey(testKey)).Bytes()
	// A refresh: a newer token replaces it.
	newer, _ := m.mint(ctx)
	a.write(ctx, testKey, newer)
	if tok, adopted, err := b.Fetch(ctx, testKey, usable, m.mint); err != nil || !adopted || tok.Value != newer.Value {
		t.Fatalf("b: adopted=%v err=%v; want the newer token", adopted, err)
	}
	if err := raw.Set(ctx, a.tokenKey(testKey), first, time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	for name, n := range map[string]*node{"writer": a, "reader": b} {
		_, found, err := n.read(ctx, testKey)
		if err != nil || found {
			t.Errorf("%s: the older token written back was found (err %v); want it refused", name, err)
		}
	}
}

// TestVersionsAcrossSkewedClocks: a node whose clock is an hour behind
// mints after a purge it heard: its token's version is above the purge's
// floor, so the node that purged adopts it (no endless refusal).
func TestVersionsAcrossSkewedClocks(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, late := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	late.clock.Add(-time.Hour)
	// The late node judges tokens on its own clock, as its broker does.
	lateUsable := func(tok broker.Token) bool { return tok.ValidAt(late.clock.Now(), time.Second) }
	ctx := testCtx(t)
	var m minter
	tok, _, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	if _, adopted, err := late.Fetch(ctx, testKey, lateUsable, m.mint); err != nil || !adopted {
		t.Fatalf("late node: adopted=%v err=%v; want a's token adopted", adopted, err)
	}
	if err := a.Purge(ctx, testKey, tok.Fingerprint()); err != nil {
		t.Fatal(err)
	}
	waitFor(t, "the purge announcement", func() bool { return late.obs.inval() == 1 })
	minted, adopted, err := late.Fetch(ctx, testKey, lateUsable, m.mint)
	if err != nil || adopted {
		t.Fatalf("late node: adopted=%v err=%v; want a mint", adopted, err)
	}
	got, adopted, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil || !adopted || got.Value != minted.Value {
		t.Fatalf("a: adopted=%v err=%v; want the late node's token adopted", adopted, err)
	}
}

// TestRotatedRefreshTokenWrittenBackIsRefused: a spent rotating refresh
// token written back over the new one is never handed out by a node that
// has seen the new one: Load returns the new one and puts it back in Redis,
// so that a node that has seen neither loads the new one too.
func TestRotatedRefreshTokenWrittenBackIsRefused(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b, fresh := newNode(t, r, keys, nil), newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	raw := r.Client()
	const key = "bank/m1"
	name := a.Store().redisKey(a.nameKeys[0], key)
	if err := a.Store().Save(ctx, key, "rt-1"); err != nil {
		t.Fatal(err)
	}
	spent, _ := raw.Get(ctx, name).Bytes()
	if err := a.Store().Save(ctx, key, "rt-2"); err != nil {
		t.Fatal(err)
	}
	if rt, err := b.Store().Load(ctx, key); err != nil || rt != "rt-2" {
		t.Fatalf("b Load = %v", err)
	}
	for _, tt := range []struct {
		name string
		n    *node
	}{{"the node that saved it", a}, {"a node that loaded it", b}} {
		t.Run(tt.name, func(t *testing.T) {
			if err := raw.Set(ctx, name, spent, 0).Err(); err != nil {
				t.Fatal(err)
			}
			rt, err := tt.n.Store().Load(ctx, key)
			if err != nil || rt != "rt-2" {
				t.Fatalf("Load after the spent token was written back = %q, %v; want rt-2", rt.Reveal(), err)
			}
			if tt.n.obs.rolledBack() == 0 {
				t.Error("the rollback was not counted")
			}
			if rt, err := fresh.Store().Load(ctx, key); err != nil || rt != "rt-2" {
				t.Fatalf("a node that saw neither loads %q, %v; want rt-2 put back", rt.Reveal(), err)
			}
		})
	}
	// A save after that is newer still, on every node.
	if err := b.Store().Save(ctx, key, "rt-3"); err != nil {
		t.Fatal(err)
	}
	if rt, err := a.Store().Load(ctx, key); err != nil || rt != "rt-3" {
		t.Fatalf("a Load after b saved rt-3 = %q, %v", rt.Reveal(), err)
	}
}

// TestRefreshTokenVersionsAcrossSkewedClocks: an operator loads a new
// refresh token on a node whose clock is an hour behind: it is newer than
// the stored one all the same (Save reads the stored version), so a node
// that saw the old one takes the new one.
func TestRefreshTokenVersionsAcrossSkewedClocks(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, late := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	late.clock.Add(-time.Hour)
	ctx := testCtx(t)
	if err := a.Store().Save(ctx, "bank/m1", "rt-old"); err != nil {
		t.Fatal(err)
	}
	if _, err := a.Store().Load(ctx, "bank/m1"); err != nil {
		t.Fatal(err)
	}
	if err := late.Store().Save(ctx, "bank/m1", "rt-new"); err != nil {
		t.Fatal(err)
	}
	if rt, err := a.Store().Load(ctx, "bank/m1"); err != nil || rt != "rt-new" {
		t.Fatalf("Load = %q, %v; want rt-new", rt.Reveal(), err)
	}
}

// TestVersionsAreBounded: a node keeps a record per key while the newest
// token it saw for the key is valid; records of expired tokens are swept.
func TestVersionsAreBounded(t *testing.T) {
	v := newVersions()
	now := time.Unix(1_000_000, 0)
	for i := range 5000 {
		v.saw(fmt.Sprintf("key-%d", i), int64(i+1), "abcdef01", now.Add(time.Minute), now)
	}
	if n := v.len(); n != 5000 {
		t.Fatalf("records = %d; want 5000 while their tokens are valid", n)
	}
	later := now.Add(2 * time.Minute)
	for i := range 5000 {
		v.saw(fmt.Sprintf("other-%d", i), int64(i+1), "abcdef01", later.Add(time.Minute), later)
	}
	if n := v.len(); n > 5000+minSweep {
		t.Fatalf("records = %d after the first 5000 tokens expired; want them swept", n)
	}
	if !v.accept("key-1", 0, later) {
		t.Error("a key whose token expired still refuses old versions")
	}
	if v.accept("other-10", 10, later) || !v.accept("other-10", 11, later) {
		t.Error("a kept record does not refuse older versions")
	}
}

// len is the number of records, for tests.
func (v *versions) len() int {
	v.mu.Lock()
	defer v.mu.Unlock()
	return len(v.m)
}
