package fleet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// counters reads a Cache's metrics.
type counters struct{ m *Metrics }

func (c counters) hit() int64        { return count(c.m.lookups.WithLabelValues("hit")) }
func (c counters) errs() int64       { return count(c.m.errors) }
func (c counters) wait() int64       { return count(c.m.lockWaits) }
func (c counters) adopted() int64    { return count(c.m.adopted) }
func (c counters) inval() int64      { return count(c.m.invalidations) }
func (c counters) undec() int64      { return count(c.m.undecryptable) }
func (c counters) bypass() int64     { return count(c.m.bypassed) }
func (c counters) rolledBack() int64 { return count(c.m.rolledBack) }
func (c counters) timeouts() int64   { return count(c.m.timeouts) }
func (c counters) opened() int64     { return count(c.m.openings) }

// count is the sum of the counters that c collects.
func count(c prometheus.Collector) int64 {
	reg := prometheus.NewRegistry()
	reg.MustRegister(c)
	families, err := reg.Gather()
	if err != nil {
		panic(err)
	}
	var sum float64
	for _, f := range families {
		for _, m := range f.GetMetric() {
			sum += m.GetCounter().GetValue()
		}
	}
	return int64(sum)
}

// node is one broker of the fleet under test.
type node struct {
	*Cache
	obs   counters
	clock *clocktest.Clock
}

func testKeys(t *testing.T, current byte, old ...byte) *seal.Keyring {
	t.Helper()
	var olds [][]byte
	for _, b := range old {
		olds = append(olds, bytes.Repeat([]byte{b}, seal.KeySize))
	}
	kr, err := seal.New(bytes.Repeat([]byte{current}, seal.KeySize), olds...)
	if err != nil {
		t.Fatal(err)
	}
	return kr
}

// newNode starts a Cache on r. Redis calls get a generous timeout (the
// machine is shared) unless mod sets another.
func newNode(t *testing.T, r *redistest.Server, keys *seal.Keyring, mod func(*Options)) *node {
	t.Helper()
	return newNodeAt(t, r.Addr(), keys, mod)
}

// newNodeAt is newNode on the Redis at addr.
func newNodeAt(t *testing.T, addr string, keys *seal.Keyring, mod func(*Options)) *node {
	t.Helper()
	clock := clocktest.New(time.Now())
	opts := Options{Keys: keys, Timeout: 5 * time.Second, LockTTL: 10 * time.Second, Now: clock.Now}
	if mod != nil {
		mod(&opts)
	}
	uo := &redis.UniversalOptions{Addrs: []string{addr}}
	ClientOptions(uo, opts.Timeout, opts.MaxTimeout)
	rdb := redis.NewUniversalClient(uo)
	opts.Client = rdb
	c, err := New(opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); rdb.Close() })
	return &node{Cache: c, obs: counters{c.metrics}, clock: clock}
}

// minter counts mints and hands out distinct tokens valid for an hour.
type minter struct {
	n    atomic.Int64
	gate chan struct{} // when set, each mint waits for it
	in   chan struct{} // when set, each mint signals it started
}

func (m *minter) mint(ctx context.Context) (broker.Token, error) {
	if m.in != nil {
		m.in <- struct{}{}
	}
	if m.gate != nil {
		select {
		case <-m.gate:
		case <-ctx.Done():
			return broker.Token{}, ctx.Err()
		}
	}
	n := m.n.Add(1)
	now := time.Now()
	return broker.Token{Value: broker.Secret(fmt.Sprintf("secret-token-%d-abcdef", n)), Type: "Bearer",
		Expiry: now.Add(time.Hour), IssuedAt: now, ID: fmt.Sprint(n)}, nil
}

func usable(tok broker.Token) bool { return tok.ValidAt(time.Now(), time.Second) }

func testCtx(t *testing.T) context.Context { return testCtxFor(t, 30*time.Second) }

// testCtxFor is a context that ends after d or with the test.
func testCtxFor(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

const testKey = "nuapay|merchant-42|payments accounts|"

func TestFleetMintsOncePerKey(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	var m minter
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	values := make(chan string, 100)
	for i := 0; i < 50; i++ {
		for _, n := range []*node{a, b} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				tok, _, err := n.Fetch(ctx, testKey, usable, m.mint)
				if err != nil {
					errs <- err
					return
				}
				values <- tok.Value.Reveal()
			}()
		}
	}
	wg.Wait()
	close(errs)
	close(values)
	for err := range errs {
		t.Error(err)
	}
	if got := m.n.Load(); got != 1 {
		t.Fatalf("mint called %d times by 2 nodes x 50 concurrent lookups; want 1", got)
	}
	for v := range values {
		if v != "secret-token-1-abcdef" {
			t.Fatalf("a lookup got %q; want the one minted token", v)
		}
	}
	// A third lookup is a plain L2 hit.
	if _, adopted, err := b.Fetch(ctx, testKey, usable, m.mint); err != nil || !adopted {
		t.Fatalf("Fetch after the mint: adopted=%v err=%v; want an L2 hit", adopted, err)
	}
	if b.obs.hit() == 0 || a.obs.errs()+b.obs.errs() != 0 {
		t.Fatalf("hits=%d errors=%d", b.obs.hit(), a.obs.errs()+b.obs.errs())
	}
}

// The waiter is woken by the holder's announcement: the lock TTL is 10s and
// the waiter does not poll before a minute (LockPoll), so returning well
// before it proves pub/sub did it.
func TestWaiterWokenByAnnouncement(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a := newNode(t, r, keys, nil)
	b := newNode(t, r, keys, func(o *Options) { o.LockPoll = time.Minute })
	ctx := testCtx(t)
	holder := &minter{gate: make(chan struct{}), in: make(chan struct{}, 1)}
	aDone := make(chan error, 1)
	go func() {
		_, _, err := a.Fetch(ctx, testKey, usable, holder.mint)
		aDone <- err
	}()
	<-holder.in // a holds the lock and is minting
	var waiter minter
	type result struct {
		tok     broker.Token
		adopted bool
		err     error
		at      time.Time
	}
	bDone := make(chan result, 1)
	go func() {
		tok, adopted, err := b.Fetch(ctx, testKey, usable, waiter.mint)
		bDone <- result{tok, adopted, err, time.Now()}
	}()
	for b.obs.wait() == 0 { // b is waiting for a's lock
		select {
		case res := <-bDone:
			t.Fatalf("b returned without waiting: %+v", res)
		case <-time.After(5 * time.Millisecond):
		}
	}
	released := time.Now()
	close(holder.gate)
	if err := <-aDone; err != nil {
		t.Fatal(err)
	}
	res := <-bDone
	if res.err != nil || !res.adopted || waiter.n.Load() != 0 || res.tok.Value.Reveal() != "secret-token-1-abcdef" {
		t.Fatalf("waiter: adopted=%v err=%v mints=%d", res.adopted, res.err, waiter.n.Load())
	}
	// The lock would have expired 10s after it was taken: the waiter was
	// woken by the announcement, not by the expiry.
	if waited := res.at.Sub(released); waited > 5*time.Second {
		t.Fatalf("the waiter returned %s after the holder published; want it woken by pub/sub, long before the 10s lock TTL", waited)
	}
	if b.obs.adopted() != 1 {
		t.Fatalf("adopted = %d; want 1", b.obs.adopted())
	}
}

// TestWaiterAdoptsWithoutAnnouncement: the announcement is lost (after a
// Redis restart the subscription reconnects by itself, later; a publish
// can fail): a node waiting for another's lock still adopts the token the
// holder stored, within LockPoll, not at the lock's expiry. The lock here
// is held for 10 minutes and the test's context ends after 30 s: without
// the poll the waiter would fail with the context. An integration run
// under load saw 30 s of token_timeout for every request of a merchant
// minted concurrently on three nodes just after Redis came back.
func TestWaiterAdoptsWithoutAnnouncement(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	holder := newNode(t, r, keys, nil)
	b := newNode(t, r, keys, func(o *Options) { o.LockPoll = 100 * time.Millisecond })
	ctx := testCtx(t)
	lockKey := b.lockKey("tok:" + b.name(testKey))
	// Another node holds the lock (and never announces anything).
	if err := r.Client().Set(ctx, lockKey, "other-node", 10*time.Minute).Err(); err != nil {
		t.Fatal(err)
	}
	type result struct {
		tok     broker.Token
		adopted bool
		err     error
	}
	var waiter minter
	done := make(chan result, 1)
	go func() {
		tok, adopted, err := b.Fetch(ctx, testKey, usable, waiter.mint)
		done <- result{tok, adopted, err}
	}()
	for b.obs.wait() == 0 { // b is waiting for the lock
		select {
		case res := <-done:
			t.Fatalf("b returned without waiting: %+v", res)
		case <-time.After(5 * time.Millisecond):
		}
	}
	// The holder stores its token without announcing it (write publishes
	// nothing; fetchLocked's announcement is what is lost).
	var m minter
	tok, err := m.mint(ctx)
	if err != nil {
		t.Fatal(err)
	}
	holder.write(ctx, testKey, tok)
	res := <-done
	if res.err != nil || !res.adopted || waiter.n.Load() != 0 || res.tok.Value.Reveal() != tok.Value.Reveal() {
		t.Fatalf("waiter: adopted=%v err=%v mints=%d; want the stored token adopted without a mint", res.adopted, res.err, waiter.n.Load())
	}
}

// A lock left by a dead node expires and a waiter takes it over.
func TestLockOfDeadHolderIsTakenOver(t *testing.T) {
	r := startRedis(t)
	a := newNode(t, r, testKeys(t, 1), nil)
	ctx := testCtx(t)
	raw := r.Client()
	lockKey := a.lockKey("tok:" + a.name(testKey))
	if err := raw.Set(ctx, lockKey, "dead-node", 300*time.Millisecond).Err(); err != nil {
		t.Fatal(err)
	}
	var m minter
	tok, adopted, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil || adopted || m.n.Load() != 1 || tok.Value == "" {
		t.Fatalf("Fetch: adopted=%v err=%v mints=%d", adopted, err, m.n.Load())
	}
	if a.obs.wait() != 1 {
		t.Fatalf("lock waits = %d; want 1", a.obs.wait())
	}
}

// What Redis holds reveals neither the token nor the merchant.
func TestRedisHoldsCiphertext(t *testing.T) {
	r := startRedis(t)
	a := newNode(t, r, testKeys(t, 1), nil)
	ctx := testCtx(t)
	var m minter
	tok, _, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	rt := a.Store()
	if err := rt.Save(ctx, "bank/merchant-42", "secret-refresh-token"); err != nil {
		t.Fatal(err)
	}
	raw := r.Client()
	names, err := raw.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	if len(names) != 2 {
		t.Fatalf("redis keys = %q; want a token and a refresh token", names)
	}
	for _, name := range names {
		if !strings.HasPrefix(name, DefaultKeyPrefix) || strings.Contains(name, "merchant-42") {
			t.Fatalf("redis key %q: want the prefix and no merchant id", name)
		}
		v, err := raw.Get(ctx, name).Result()
		if err != nil {
			t.Fatal(err)
		}
		for _, secret := range []string{tok.Value.Reveal(), "secret-token", "secret-refresh-token", "merchant-42"} {
			if strings.Contains(v, secret) {
				t.Fatalf("redis value of %q contains %q in clear", name, secret)
			}
		}
	}
	if ttl := raw.TTL(ctx, a.tokenKey(testKey)).Val(); ttl <= 0 || ttl > time.Hour {
		t.Fatalf("token TTL = %s; want the token's remaining life", ttl)
	}
}

// A value another key sealed, or garbage, is ignored, counted and replaced.
func TestUndecryptableValueIgnored(t *testing.T) {
	r := startRedis(t)
	plain := func(o *Options) { o.PlainKeys = true } // same names whatever the key
	a := newNode(t, r, testKeys(t, 1), plain)
	b := newNode(t, r, testKeys(t, 2), plain)
	ctx := testCtx(t)
	var m minter
	if _, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil {
		t.Fatal(err)
	}
	// b's key is not a's: the value does not open.
	tok, adopted, err := b.Fetch(ctx, testKey, usable, m.mint)
	if err != nil || adopted || m.n.Load() != 2 {
		t.Fatalf("b: adopted=%v err=%v mints=%d; want a mint of its own", adopted, err, m.n.Load())
	}
	if b.obs.undec() == 0 {
		t.Fatal("the undecryptable value was not counted")
	}
	// b replaced it: b now hits, with its own token.
	again, adopted, err := b.Fetch(ctx, testKey, usable, m.mint)
	if err != nil || !adopted || again.Value != tok.Value {
		t.Fatalf("b again: adopted=%v err=%v", adopted, err)
	}
	// Garbage and a value moved from another key are ignored too.
	raw := r.Client()
	other := "nuapay|merchant-7|payments|"
	if err := raw.Set(ctx, b.tokenKey(other), raw.Get(ctx, b.tokenKey(testKey)).Val(), time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	before := b.obs.undec()
	if _, adopted, err := b.Fetch(ctx, other, usable, m.mint); err != nil || adopted {
		t.Fatalf("a value moved to another key was adopted (adopted=%v err=%v)", adopted, err)
	}
	if err := raw.Set(ctx, b.tokenKey(testKey), "not a sealed value", time.Hour).Err(); err != nil {
		t.Fatal(err)
	}
	if _, adopted, err := b.Fetch(ctx, testKey, usable, m.mint); err != nil || adopted {
		t.Fatalf("garbage was adopted (adopted=%v err=%v)", adopted, err)
	}
	if got := b.obs.undec() - before; got < 2 {
		t.Fatalf("undecryptable count grew by %d; want 2 or more", got)
	}
}

// After a rotation (new key current, old key listed), a node adopts what
// a not-yet-rotated node stored, and seals with the new key.
func TestKeyRotation(t *testing.T) {
	r := startRedis(t)
	oldNode := newNode(t, r, testKeys(t, 1), nil)
	rotated := newNode(t, r, testKeys(t, 2, 1), nil)
	newOnly := newNode(t, r, testKeys(t, 2), nil)
	ctx := testCtx(t)
	var m minter
	tok, _, err := oldNode.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	got, adopted, err := rotated.Fetch(ctx, testKey, usable, m.mint)
	if err != nil || !adopted || got.Value != tok.Value || m.n.Load() != 1 {
		t.Fatalf("rotated node: adopted=%v err=%v mints=%d; want the old node's token", adopted, err, m.n.Load())
	}
	// The rotated node seals with the new key: a node with only the new
	// key opens its refresh token.
	if err := rotated.Store().Save(ctx, "bank/m1", "rt-1"); err != nil {
		t.Fatal(err)
	}
	if rt, err := newOnly.Store().Load(ctx, "bank/m1"); err != nil || rt.Reveal() != "rt-1" {
		t.Fatalf("new-key node Load = %v", err)
	}
	// A refresh token saved before the rotation is still found and opened.
	if err := oldNode.Store().Save(ctx, "bank/m2", "rt-2"); err != nil {
		t.Fatal(err)
	}
	if rt, err := rotated.Store().Load(ctx, "bank/m2"); err != nil || rt.Reveal() != "rt-2" {
		t.Fatalf("rotated node Load of an old refresh token = %v", err)
	}
}

// Purge deletes only the token with the given fingerprint, and the other
// nodes hear of it.
func TestPurgeCompareAndDelete(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	type purge struct{ key, fp string }
	heardA, heardB := make(chan purge, 10), make(chan purge, 10)
	a.OnPurge(func(k, fp string) { heardA <- purge{k, fp} })
	b.OnPurge(func(k, fp string) { heardB <- purge{k, fp} })
	var m minter
	tok, _, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	raw := r.Client()
	if err := a.Purge(ctx, testKey, "00000000"); err != nil {
		t.Fatal(err)
	}
	if n := raw.Exists(ctx, a.tokenKey(testKey)).Val(); n != 1 {
		t.Fatal("a purge with another fingerprint deleted the token")
	}
	if err := a.Purge(ctx, testKey, tok.Fingerprint()); err != nil {
		t.Fatal(err)
	}
	if n := raw.Exists(ctx, a.tokenKey(testKey)).Val(); n != 0 {
		t.Fatal("a purge with the token's fingerprint did not delete it")
	}
	want := []purge{{testKey, "00000000"}, {testKey, tok.Fingerprint()}}
	for i, w := range want {
		select {
		case got := <-heardB:
			if got != w {
				t.Fatalf("b heard purge %d = %+v; want %+v", i, got, w)
			}
		case <-ctx.Done():
			t.Fatalf("b did not hear purge %d", i)
		}
	}
	// b purges; once a has heard it, a has handled its own purges before
	// (one channel, in order) and must not have called its callback.
	if err := b.Purge(ctx, testKey, ""); err != nil {
		t.Fatal(err)
	}
	select {
	case got := <-heardA:
		if got != (purge{testKey, ""}) {
			t.Fatalf("a heard %+v; want only b's purge", got)
		}
	case <-ctx.Done():
		t.Fatal("a did not hear b's purge")
	}
	if len(heardA) != 0 {
		t.Fatal("a's OnPurge fired for its own purge")
	}
	if a.obs.inval() != 1 || b.obs.inval() != 2 {
		t.Fatalf("invalidations received: a=%d b=%d; want 1 and 2", a.obs.inval(), b.obs.inval())
	}
}

// The tier outlives the brokers of successive configs: a closed broker
// stops hearing purges, so the callbacks do not grow across reloads and a
// replaced broker is not kept; an unregistered callback is not called.
func TestOnPurgeUnregister(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	callbacks := func() int {
		a.mu.Lock()
		defer a.mu.Unlock()
		return len(a.onPurge)
	}
	for range 3 { // three config reloads
		br := broker.New(broker.Options{Shared: a.Cache})
		if n := callbacks(); n != 1 {
			t.Fatalf("%d purge callbacks with one broker; want 1", n)
		}
		br.Close()
	}
	if n := callbacks(); n != 0 {
		t.Fatalf("%d purge callbacks after every broker was closed; want 0", n)
	}

	var gone atomic.Bool
	unregister := a.OnPurge(func(string, string) { gone.Store(true) })
	heard := make(chan string, 1)
	a.OnPurge(func(_, fp string) { heard <- fp })
	unregister()
	unregister()
	if err := b.Purge(ctx, testKey, ""); err != nil {
		t.Fatal(err)
	}
	select {
	case <-heard:
	case <-ctx.Done():
		t.Fatal("a did not hear b's purge")
	}
	if gone.Load() {
		t.Fatal("an unregistered purge callback was called")
	}
}

// A nil function given to OnAvailability is ignored: a change of
// availability tells the other functions, and its unregister does nothing.
func TestOnAvailabilityNil(t *testing.T) {
	n := newNode(t, startRedis(t), testKeys(t, 1), nil)
	unregister := n.OnAvailability(nil)
	var told atomic.Int32
	n.OnAvailability(func(bool, error) { told.Add(1) })
	n.tellAvailability(false, errors.New("redis down"))
	unregister()
	if told.Load() != 1 {
		t.Fatalf("told %d times, want once", told.Load())
	}
}

// Redis killed: lookups mint locally, without error, bounded by the
// timeout; the breaker then keeps Redis out; Redis back: sharing resumes.
func TestRedisDownAndBack(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	fast := func(o *Options) { o.Timeout = 50 * time.Millisecond }
	a, b := newNode(t, r, keys, fast), newNode(t, r, keys, fast)
	var mu sync.Mutex
	var told []string // OnAvailability's calls
	b.OnAvailability(func(up bool, err error) {
		mu.Lock()
		defer mu.Unlock()
		told = append(told, fmt.Sprintf("up=%v failed=%v", up, err != nil))
	})
	availability := func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(told)
	}
	ctx := testCtx(t)
	var m minter
	if _, _, err := a.Fetch(ctx, testKey, usable, m.mint); err != nil {
		t.Fatal(err)
	}
	if !b.Available() {
		t.Fatal("unavailable before any failure")
	}
	r.Kill()
	for i := 0; i < 10; i++ {
		before := m.n.Load()
		start := time.Now()
		tok, adopted, err := b.Fetch(ctx, fmt.Sprintf("down-%d", i), usable, m.mint)
		if err != nil || adopted || tok.Value == "" || m.n.Load() != before+1 {
			t.Fatalf("lookup %d with redis down: adopted=%v err=%v", i, adopted, err)
		}
		if d := time.Since(start); d > 10*time.Second {
			t.Fatalf("lookup %d took %s with redis down", i, d)
		}
	}
	if b.obs.bypass() != 10 || b.obs.errs() < 3 {
		t.Fatalf("bypassed=%d errors=%d; want 10 bypasses and the breaker's errors", b.obs.bypass(), b.obs.errs())
	}
	errsWhenOpen := b.obs.errs()
	if _, _, err := b.Fetch(ctx, "down-open", usable, m.mint); err != nil {
		t.Fatal(err)
	}
	if b.obs.errs() != errsWhenOpen {
		t.Fatal("the open breaker still called redis")
	}
	if err := b.Purge(ctx, testKey, ""); !errors.Is(err, ErrUnavailable) {
		t.Fatalf("Purge with the breaker open = %v; want ErrUnavailable", err)
	}
	if got := availability(); b.Available() || !slices.Equal(got, []string{"up=false failed=true"}) {
		t.Fatalf("available %v, told %q; want unavailable, told once", b.Available(), got)
	}

	r.Restart()
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; ; i++ {
		a.clock.Add(time.Minute)
		b.clock.Add(time.Minute)
		key := fmt.Sprintf("back-%d", i)
		if _, _, err := a.Fetch(ctx, key, usable, m.mint); err != nil {
			t.Fatal(err)
		}
		_, adopted, err := b.Fetch(ctx, key, usable, m.mint)
		if err != nil {
			t.Fatal(err)
		}
		if adopted {
			break // b used the token a stored: sharing resumed
		}
		if time.Now().After(deadline) {
			t.Fatal("sharing did not resume after redis came back")
		}
	}
	if got := availability(); !b.Available() || !slices.Equal(got, []string{"up=false failed=true", "up=true failed=false"}) {
		t.Fatalf("available %v, told %q; want available, told down then up", b.Available(), got)
	}
}

// A refresh token saved under one key's name while an older copy remains
// under another key's name (a rotation whose delete of the old copy
// failed): every node loads the newest, whichever name its current key
// gives.
func TestRefreshTokenLoadTakesTheNewestName(t *testing.T) {
	r := startRedis(t)
	oldNode := newNode(t, r, testKeys(t, 1, 2), nil)
	rotated := newNode(t, r, testKeys(t, 2, 1), nil)
	ctx := testCtx(t)
	if err := oldNode.Store().Save(ctx, "bank/m1", "rt-1"); err != nil {
		t.Fatal(err)
	}
	raw := r.Client()
	oldName := oldNode.Store().redisKey(oldNode.nameKeys[0], "bank/m1")
	stale, err := raw.Get(ctx, oldName).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	if err := rotated.Store().Save(ctx, "bank/m1", "rt-2"); err != nil {
		t.Fatal(err)
	}
	// The rotated node's delete of the old copy is undone.
	if err := raw.Set(ctx, oldName, stale, 0).Err(); err != nil {
		t.Fatal(err)
	}
	for _, keys := range [][]byte{{1, 2}, {2, 1}} {
		fresh := newNode(t, r, testKeys(t, keys[0], keys[1:]...), nil)
		if rt, err := fresh.Store().Load(ctx, "bank/m1"); err != nil || rt.Reveal() != "rt-2" {
			t.Fatalf("a node with keys %v loads %q (err %v); want the newest, rt-2 (the older one is spent)", keys, rt.Reveal(), err)
		}
	}
}

// Many refreshes at once from nodes one step apart in a key rotation (key
// 1 only, key 1 with key 2 listed, key 2 with key 1 listed): one at a
// time, none waiting for ever (every node takes its locks in the same
// order); and a node that gave up while holding some of its locks
// released them.
func TestRefreshTokenLocksUnderLoadAcrossKeyRotation(t *testing.T) {
	r := startRedis(t)
	fast := func(o *Options) { o.LockPoll = 20 * time.Millisecond }
	var stores []*Store
	for _, keys := range [][]byte{{2, 1}, {1, 2}, {1}, {2}} {
		stores = append(stores, newNode(t, r, testKeys(t, keys[0], keys[1:]...), fast).Store())
	}
	ctx := testCtx(t)

	// A node that gives up while waiting for one of its locks keeps none.
	unlock, err := stores[3].Lock(ctx, "bank/m1") // key 2's lock only
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = stores[0].Lock(short, "bank/m1") // both locks
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Lock while key 2's lock is held = %v; want its deadline", err)
	}
	short, cancel = context.WithTimeout(ctx, 5*time.Second)
	unlockOld, err := stores[2].Lock(short, "bank/m1") // key 1's lock only
	cancel()
	if err != nil {
		t.Fatalf("key 1's lock is still held by a node that gave up: %v", err)
	}
	unlockOld()
	unlock()

	var inside atomic.Int64
	var wg sync.WaitGroup
	failures := make(chan string, 40)
	rotating := stores[:3] // {2}, which shares no key with {1}, is left out
	for i := range 40 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock, err := rotating[i%len(rotating)].Lock(ctx, "bank/m1")
			if err != nil {
				failures <- err.Error()
				return
			}
			defer unlock()
			if inside.Add(1) != 1 {
				failures <- "two holders at once"
			}
			// Hold the lock across a Redis round trip, as a refresh
			// does, so that a second holder would overlap.
			if err := r.Client().Ping(ctx).Err(); err != nil {
				failures <- err.Error()
			}
			inside.Add(-1)
		}()
	}
	wg.Wait()
	close(failures)
	for f := range failures {
		t.Error(f)
	}
}

// During a rolling key rotation, nodes whose current keys differ still
// serialise the refreshes of a merchant: while one holds the refresh-token
// lock, the other waits, whatever the order of its keys.
func TestRefreshTokenLockAcrossKeyRotation(t *testing.T) {
	cases := []struct {
		name       string
		keysA      []byte // current first
		keysB      []byte
		plainNames bool
	}{
		{"same keys", []byte{1}, []byte{1}, false},
		{"new key added as old on one node", []byte{1}, []byte{1, 2}, false},
		{"one node rotated", []byte{2, 1}, []byte{1, 2}, false},
		{"rotated node and a node with only the old key", []byte{2, 1}, []byte{1}, false},
		{"plain names, one node rotated", []byte{2, 1}, []byte{1, 2}, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			r := startRedis(t)
			plain := func(o *Options) { o.PlainKeys = tc.plainNames }
			a := newNode(t, r, testKeys(t, tc.keysA[0], tc.keysA[1:]...), plain).Store()
			b := newNode(t, r, testKeys(t, tc.keysB[0], tc.keysB[1:]...), plain).Store()
			ctx := testCtx(t)
			for _, order := range []struct{ holder, waiter *Store }{{a, b}, {b, a}} {
				requireLocksExclude(t, ctx, order.holder, order.waiter, "bank/m1")
			}
		})
	}
}

// requireLocksExclude fails t unless waiter's Lock of key waits while
// holder holds it, and takes it once holder unlocks.
func requireLocksExclude(t *testing.T, ctx context.Context, holder, waiter *Store, key string) {
	t.Helper()
	unlock, err := holder.Lock(ctx, key)
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 300*time.Millisecond)
	_, err = waiter.Lock(short, key)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a second node took the refresh-token lock while the first held it (err %v): two refreshes could spend one rotating refresh token", err)
	}
	got := make(chan error, 1)
	go func() {
		unlockW, err := waiter.Lock(ctx, key)
		if err == nil {
			unlockW()
		}
		got <- err
	}()
	unlock()
	if err := <-got; err != nil {
		t.Fatalf("Lock after the holder unlocked: %v", err)
	}
}

// Refresh tokens round-trip sealed, and two nodes' Locks exclude each other.
func TestRefreshTokenStore(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	sa, sb := a.Store(), b.Store()
	if _, err := sa.Load(ctx, "bank/m1"); err == nil || !strings.Contains(err.Error(), "no refresh token") {
		t.Fatalf("Load of nothing = %v; want ErrNoRefreshToken", err)
	}
	if err := sa.Save(ctx, "bank/m1", "rt-secret-1"); err != nil {
		t.Fatal(err)
	}
	if rt, err := sb.Load(ctx, "bank/m1"); err != nil || rt.Reveal() != "rt-secret-1" {
		t.Fatalf("b Load = %v", err)
	}
	// Moved under another merchant, it does not open.
	raw := r.Client()
	if err := raw.Set(ctx, sa.redisKey(a.nameKeys[0], "bank/m2"), raw.Get(ctx, sa.redisKey(a.nameKeys[0], "bank/m1")).Val(), 0).Err(); err != nil {
		t.Fatal(err)
	}
	if _, err := sb.Load(ctx, "bank/m2"); !errors.Is(err, ErrRefreshTokenSealed) {
		t.Fatalf("Load of a moved value = %v; want ErrRefreshTokenSealed", err)
	}

	requireLocksExclude(t, ctx, sa, sb, "bank/m1")

	// Alternating refreshes from two nodes, many goroutines each: one at a
	// time, and every refresh sees the previous one's token.
	var inside atomic.Int64
	var wg sync.WaitGroup
	failures := make(chan string, 40)
	for i := 0; i < 20; i++ {
		for _, s := range []*Store{sa, sb} {
			wg.Add(1)
			go func() {
				defer wg.Done()
				unlock, err := s.Lock(ctx, "bank/m1")
				if err != nil {
					failures <- err.Error()
					return
				}
				defer unlock()
				if inside.Add(1) != 1 {
					failures <- "two holders at once"
				}
				defer inside.Add(-1)
				rt, err := s.Load(ctx, "bank/m1")
				if err != nil {
					failures <- err.Error()
					return
				}
				var n int
				fmt.Sscanf(rt.Reveal(), "rt-secret-%d", &n)
				if err := s.Save(ctx, "bank/m1", broker.Secret(fmt.Sprintf("rt-secret-%d", n+1))); err != nil {
					failures <- err.Error()
				}
			}()
		}
	}
	wg.Wait()
	close(failures)
	for f := range failures {
		t.Error(f)
	}
	if rt, _ := sa.Load(ctx, "bank/m1"); rt.Reveal() != "rt-secret-41" {
		t.Fatalf("after 40 serialised rotations the token is %s; want rt-secret-41 (a rotation was lost)", rt.Reveal())
	}
}

// A Redis that accepts connections but never answers: every call gives up
// after its bound and lookups mint locally without error; it is taken as
// slow for the slow span, then the breaker keeps the silent server out.
func TestSilentRedisIsBypassed(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	var held []net.Conn
	var mu sync.Mutex
	go func() {
		for {
			c, err := l.Accept()
			if err != nil {
				return
			}
			mu.Lock()
			held = append(held, c) // read nothing, answer nothing
			mu.Unlock()
		}
	}()
	t.Cleanup(func() {
		l.Close()
		mu.Lock()
		for _, c := range held {
			c.Close()
		}
		mu.Unlock()
	})
	const timeout, maxTimeout, slowSpan = 50 * time.Millisecond, 200 * time.Millisecond, time.Second
	uo := &redis.UniversalOptions{Addrs: []string{l.Addr().String()}}
	ClientOptions(uo, timeout, maxTimeout)
	rdb := redis.NewUniversalClient(uo)
	clock := clocktest.New(time.Now())
	c, err := New(Options{Client: rdb, Keys: testKeys(t, 1), Timeout: timeout, MaxTimeout: maxTimeout, SlowSpan: slowSpan,
		Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	obs := counters{c.metrics}
	t.Cleanup(func() { c.Close(); rdb.Close() })
	ctx := testCtx(t)
	var m minter
	// Within the slow span a silent Redis is taken as slow: each lookup
	// reads with longer bounds up to maxTimeout, then mints without it.
	for i := 0; i < 3; i++ {
		tok, adopted, err := c.Fetch(ctx, testKey, usable, m.mint)
		if err != nil || adopted || tok.Value == "" {
			t.Fatalf("lookup %d with a silent redis: adopted=%v err=%v", i, adopted, err)
		}
	}
	if m.n.Load() != 3 || obs.bypass() != 3 || obs.timeouts() < 3 || !c.Available() {
		t.Fatalf("mints=%d bypassed=%d timeouts=%d available=%v; want 3, 3, at least 3, and the breaker closed",
			m.n.Load(), obs.bypass(), obs.timeouts(), c.Available())
	}
	// Once timeouts have lasted the slow span, each counts: the breaker
	// opens after the threshold and keeps Redis out.
	clock.Add(slowSpan)
	errs := obs.errs()
	for i := 0; i < 5; i++ {
		tok, adopted, err := c.Fetch(ctx, testKey, usable, m.mint)
		if err != nil || adopted || tok.Value == "" {
			t.Fatalf("lookup %d after the slow span: adopted=%v err=%v", i, adopted, err)
		}
	}
	if m.n.Load() != 8 || obs.bypass() != 8 || c.Available() || obs.opened() != 1 {
		t.Fatalf("mints=%d bypassed=%d available=%v opened=%d; want 8, 8, unavailable, opened once", m.n.Load(), obs.bypass(), c.Available(), obs.opened())
	}
	if got := obs.errs() - errs; got != BreakerThreshold {
		t.Fatalf("redis errors after the slow span = %d; want %d, then the breaker keeps redis out", got, BreakerThreshold)
	}
	// After each cooldown one call probes the still silent Redis, and its
	// timeout keeps Redis out for another cooldown.
	errs = obs.errs()
	for round := 1; round <= 2; round++ {
		clock.Add(BreakerCooldown)
		for i := 0; i < 5; i++ {
			if _, _, err := c.Fetch(ctx, testKey, usable, m.mint); err != nil {
				t.Fatal(err)
			}
		}
		if got, want := obs.errs()-errs, int64(round); got != want {
			t.Fatalf("redis errors after %d cooldowns = %d; want %d (one probe each)", round, got, want)
		}
	}
}

// TestPlainKeyNames: with PlainKeys, a Redis name shows the cache key in
// printable ASCII (a key starts with a binary tag), and two keys never
// share a name.
func TestPlainKeyNames(t *testing.T) {
	c := &Cache{opts: Options{PlainKeys: true}}
	keys := []string{"\x8b\x01>\x11org1", "\\x8b\x01>\x11org1", "org1", "org1\x00m1", "\xff\xfeorg-é"}
	seen := map[string]string{}
	for _, k := range keys {
		n := c.nameWith(nil, k)
		for i := 0; i < len(n); i++ {
			if n[i] < 0x20 || n[i] >= 0x7f {
				t.Errorf("name %q of key %q is not printable ASCII", n, k)
				break
			}
		}
		if other, ok := seen[n]; ok {
			t.Errorf("keys %q and %q share the name %q", other, k, n)
		}
		seen[n] = k
	}
	if n := c.nameWith(nil, "org1"); n != "org1" {
		t.Errorf("name of a printable key %q, want it unchanged", n)
	}
}

// TestCancelledLookupIsNotBypassed: a lookup whose context has ended
// mints nothing and is not counted as a bypass of the shared tier.
func TestCancelledLookupIsNotBypassed(t *testing.T) {
	r := startRedis(t)
	n := newNode(t, r, testKeys(t, 1), nil)
	ctx, cancel := context.WithCancel(testCtx(t))
	cancel()
	var m minter
	_, _, err := n.Fetch(ctx, testKey, usable, m.mint)
	if !errors.Is(err, context.Canceled) || m.n.Load() != 0 || n.obs.bypass() != 0 {
		t.Fatalf("cancelled lookup: err=%v mints=%d bypassed=%d; want context.Canceled, no mint, no bypass", err, m.n.Load(), n.obs.bypass())
	}
}
