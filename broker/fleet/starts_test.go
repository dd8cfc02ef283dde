package fleet

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// keptPendings is a MemoryPendingStore (the consents in progress, which
// the instances of a fleet share through Caddy's storage) that also
// remembers until when each value is kept.
type keptPendings struct {
	oauth.MemoryPendingStore

	mu   sync.Mutex
	kept map[string]time.Time
}

// Put implements oauth.PendingStore.
func (p *keptPendings) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	p.mu.Lock()
	if p.kept == nil {
		p.kept = map[string]time.Time{}
	}
	p.kept[key] = expires
	p.mu.Unlock()
	return p.MemoryPendingStore.Put(ctx, key, val, expires)
}

// linkKept returns until when the one consent link record is kept.
func (p *keptPendings) linkKept(t *testing.T) time.Time {
	t.Helper()
	p.mu.Lock()
	defer p.mu.Unlock()
	var kept []time.Time
	for k, v := range p.kept {
		if strings.HasPrefix(k, "link/") {
			kept = append(kept, v)
		}
	}
	if len(kept) != 1 {
		t.Fatalf("%d consent link records stored, want 1", len(kept))
	}
	return kept[0]
}

// consentInstance is the consent flow of one broker instance: its
// refresh tokens in store, its consents in progress in pend.
func consentInstance(t *testing.T, store oauth.Store, pend oauth.PendingStore, clock *clocktest.Clock) *oauth.AuthCode {
	t.Helper()
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.example/token", ClientID: "c", ClientSecret: "s", Now: clock.Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	flow, err := oauth.NewAuthCode(src, oauth.AuthCodeConfig{RedirectURIs: []string{"https://cb.partner.example/consent/callback"},
		AuthorizationURL: "https://bank.example/authorize", Scopes: []string{"offline_access"}}, &oauth.Pendings{Store: pend, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return flow
}

// newLinkID hands out a consent link of flow and returns its id.
func newLinkID(t *testing.T, flow *oauth.AuthCode) string {
	t.Helper()
	link, err := flow.NewLink(context.Background(), "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	u, err := url.Parse(link.URL)
	if err != nil || u.Query().Get("link") == "" {
		t.Fatalf("consent link %v: %v", link, err)
	}
	return u.Query().Get("link")
}

// TestLinkStartsAcrossTheFleet: two instances whose refresh tokens are
// in one Redis take oauth.MaxStartsPerLink starts of a consent link in
// total, however they are spread, and whichever encryption key each has
// as current during a key rotation; without Redis, each instance takes
// that many; with Redis gone, each counts its own starts again. A start
// beyond the limit at an instance is refused there without a Redis call,
// so Redis keeps its count. A refusal says where the starts were counted
// and holds no link id.
func TestLinkStartsAcrossTheFleet(t *testing.T) {
	const limit = oauth.MaxStartsPerLink
	rows := []struct {
		name    string
		redis   bool
		rotated bool   // b has key 2 as current, key 1 as old; a has key 1
		down    int    // kill Redis before this start (0: never)
		seq     string // the instance of each start, a or b
		want    string // + started; refused: F counted across the fleet, I at this instance
		count   int64  // the count in Redis at the end, with redis and no down
	}{
		{"redis, alternating", true, false, 0, strings.Repeat("ab", 7), strings.Repeat("+", limit) + "FFFF", 14},
		{"redis, one then the other", true, false, 0, strings.Repeat("a", limit) + "bba", strings.Repeat("+", limit) + "FFI", 12},
		{"redis, beyond the limit at one instance: no redis call", true, false, 0, strings.Repeat("a", limit+4), strings.Repeat("+", limit) + "IIII", limit},
		{"redis, key rotated between a and b", true, true, 0, strings.Repeat("a", limit) + "b", strings.Repeat("+", limit) + "F", limit + 1},
		{"no redis: per instance", false, false, 0, strings.Repeat("a", limit+1) + strings.Repeat("b", limit+1),
			strings.Repeat("+", limit) + "I" + strings.Repeat("+", limit) + "I", 0},
		{"redis gone after 4 starts at a: per instance", true, false, 5, strings.Repeat("a", limit+1) + strings.Repeat("b", limit+1),
			strings.Repeat("+", limit) + "I" + strings.Repeat("+", limit) + "I", 0},
	}
	where := map[byte]string{'F': "across the fleet", 'I': "at this instance"}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			ctx := testCtx(t)
			clock := clocktest.New(time.Now())
			pend := &keptPendings{MemoryPendingStore: oauth.MemoryPendingStore{Now: clock.Now}}
			stores := []oauth.Store{&oauth.MemoryStore{}, &oauth.MemoryStore{}}
			kill := func() {}
			var r *redistest.Server
			var prefix string
			if row.redis {
				r = startRedis(t)
				keysB, clocked := testKeys(t, 1), func(o *Options) { o.Now = clock.Now }
				if row.rotated {
					keysB = testKeys(t, 2, 1)
				}
				a := newNode(t, r, testKeys(t, 1), clocked)
				stores, kill, prefix = []oauth.Store{a.Store(), newNode(t, r, keysB, clocked).Store()}, r.Kill, a.KeyPrefix()
			}
			flows := map[byte]*oauth.AuthCode{'a': consentInstance(t, stores[0], pend, clock), 'b': consentInstance(t, stores[1], pend, clock)}
			id := newLinkID(t, flows['a'])
			var got strings.Builder
			for i := range len(row.seq) {
				if i+1 == row.down {
					kill()
				}
				_, _, err := flows[row.seq[i]].Start(ctx, id, "cb.partner.example")
				var ce *oauth.ConsentError
				switch {
				case err == nil:
					got.WriteByte('+')
				case errors.As(err, &ce) && ce.Reason == oauth.ReasonTooManyStarts:
					c := byte('?')
					for k, w := range where {
						if strings.Contains(err.Error(), "times "+w+",") {
							c = k
						}
					}
					got.WriteByte(c)
					if strings.Contains(err.Error(), id) {
						t.Errorf("start %d at %c refused with %q: holds the link", i+1, row.seq[i], err)
					}
				default:
					t.Fatalf("start %d at %c: %v", i+1, row.seq[i], err)
				}
			}
			if got.String() != row.want {
				t.Errorf("starts at %s: %s, want %s", row.seq, got.String(), row.want)
			}
			if row.count == 0 {
				return
			}
			names, err := r.Client().Keys(ctx, prefix+"starts:*").Result()
			if err != nil || len(names) != 1 {
				t.Fatalf("start count keys %q (%v), want one", names, err)
			}
			if v := r.CLI("GET", names[0]); strings.TrimSpace(v) != strconv.FormatInt(row.count, 10) {
				t.Errorf("start count in redis %q, want %d", v, row.count)
			}
		})
	}
}

// TestLinkStartCountExpiresWithLink: the fleet's count of a link's starts
// is named by a hash (not the link id) and expires when the link's record
// does, by the instances' clock.
func TestLinkStartCountExpiresWithLink(t *testing.T) {
	ctx := testCtx(t)
	r := startRedis(t)
	clock := clocktest.New(time.Now().Add(-time.Hour)) // the broker's clock, not Redis's
	n := newNode(t, r, testKeys(t, 1), func(o *Options) { o.Now = clock.Now })
	pend := &keptPendings{MemoryPendingStore: oauth.MemoryPendingStore{Now: clock.Now}}
	flow := consentInstance(t, n.Store(), pend, clock)
	id := newLinkID(t, flow)
	for range 2 {
		if _, _, err := flow.Start(ctx, id, "cb.partner.example"); err != nil {
			t.Fatal(err)
		}
		clock.Add(time.Minute) // a later start keeps the first one's expiry
	}
	names, err := r.Client().Keys(ctx, n.KeyPrefix()+"starts:*").Result()
	if err != nil || len(names) != 1 {
		t.Fatalf("start count keys %q (%v), want one", names, err)
	}
	if strings.Contains(names[0], id) || strings.Contains(names[0], "link") {
		t.Errorf("start count key %q names the link", names[0])
	}
	if v := r.CLI("GET", names[0]); strings.TrimSpace(v) != "2" {
		t.Errorf("start count %q, want 2", v)
	}
	left, err := r.Client().PTTL(ctx, names[0]).Result()
	want := pend.linkKept(t).Sub(clock.Now().Add(-2 * time.Minute))
	if err != nil || left > want || left < want-10*time.Second {
		t.Errorf("start count expires in %s (%v), want the link record's %s", left, err, want)
	}
}

// TestCountStartExpiry: a start count expires at the kept time the
// first start gives, by the Cache's clock; later starts keep it; a count
// found without an expiry gets one.
func TestCountStartExpiry(t *testing.T) {
	ctx := testCtx(t)
	r := startRedis(t)
	n := newNode(t, r, testKeys(t, 1), nil)
	st := n.Store()
	rows := []struct {
		name   string
		preset string          // the count SET (without an expiry) before the starts; "": none
		kept   []time.Duration // after the Cache's clock, per start
		count  int64
		ttl    time.Duration // 0: at once (expired, or left at most 1ms)
	}{
		{"one start", "", []time.Duration{time.Hour}, 1, time.Hour},
		{"later starts keep the first expiry", "", []time.Duration{20 * time.Minute, time.Hour, 2 * time.Hour}, 3, 20 * time.Minute},
		{"a kept time passed: at once", "", []time.Duration{-time.Minute}, 1, 0},
		{"a count without an expiry gets one", "5", []time.Duration{time.Hour}, 6, time.Hour},
	}
	for _, row := range rows {
		t.Run(row.name, func(t *testing.T) {
			key := "link/" + row.name
			if row.preset != "" {
				r.CLI("SET", st.startsKey(key), row.preset)
			}
			var got int64
			for _, d := range row.kept {
				var err error
				if got, err = st.CountStart(ctx, key, n.clock.Now().Add(d)); err != nil {
					t.Fatal(err)
				}
			}
			if got != row.count {
				t.Errorf("count %d, want %d", got, row.count)
			}
			// PTTL answers -2 for a key that is gone, -1 for one without an
			// expiry (go-redis: as nanoseconds), 0 for one that expires
			// within the millisecond.
			left, err := r.Client().PTTL(ctx, st.startsKey(key)).Result()
			if row.ttl == 0 {
				if err != nil || (left != -2 && (left < 0 || left > time.Millisecond)) {
					t.Errorf("expires in %s (%v), want at once", left, err)
				}
				return
			}
			if err != nil || left > row.ttl || left < row.ttl-10*time.Second {
				t.Errorf("expires in %s (%v), want %s", left, err, row.ttl)
			}
		})
	}
}

// TestCountStartFailureLogged: a start count that Redis does not make
// fails with an error that says what to check, and the first failure of
// each streak is logged, without the link's key; a count that succeeds
// ends the streak.
func TestCountStartFailureLogged(t *testing.T) {
	ctx := testCtx(t)
	r := startRedis(t)
	core, logs := observer.New(zap.WarnLevel)
	n := newNode(t, r, testKeys(t, 1), func(o *Options) { o.Logger = zap.New(core) })
	st := n.Store()
	const key = "link/a-link-store-key"
	kept := n.clock.Now().Add(time.Hour)
	startLogs := func() []observer.LoggedEntry {
		return logs.FilterMessageSnippet("consent link's start").All()
	}
	for streak := 1; streak <= 2; streak++ {
		if _, err := st.CountStart(ctx, key, kept); err != nil {
			t.Fatalf("streak %d: count with redis up: %v", streak, err)
		}
		r.Kill()
		for i := range 2 * BreakerThreshold {
			_, err := st.CountStart(ctx, key, kept)
			if err == nil || !strings.Contains(err.Error(), "check the Redis ACL or reachability") {
				t.Fatalf("streak %d, count %d with redis gone: %v, want an error saying what to check", streak, i, err)
			}
		}
		if got := len(startLogs()); got != streak {
			t.Fatalf("streak %d: %d start count failures logged in all, want %d", streak, got, streak)
		}
		r.Restart()
		n.clock.Add(BreakerCooldown)
		deadline := time.Now().Add(10 * time.Second)
		for !n.Available() {
			if time.Now().After(deadline) {
				t.Fatalf("streak %d: redis not available again after its restart", streak)
			}
			_, _ = st.CountStart(ctx, key, kept) // the breaker's probe
			n.clock.Add(BreakerCooldown)
		}
	}
	for _, e := range startLogs() {
		if e.Level != zap.WarnLevel {
			t.Errorf("start count failure logged at %s, want warn", e.Level)
		}
		line := e.Message + fmt.Sprint(e.ContextMap())
		if strings.Contains(line, key) || strings.Contains(line, st.startsKey(key)) {
			t.Errorf("start count failure log %q names the link's key", line)
		}
	}
}
