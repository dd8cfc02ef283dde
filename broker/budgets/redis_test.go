package budgets

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// TestKey: a budget key is the provider's name and 12 hex characters,
// the same for the same endpoint and account (every sidecar of a fleet),
// different for another endpoint or another account (another credential
// of one token API), and it shows neither the URL nor the account.
func TestKey(t *testing.T) {
	const url, acct = "https://api.example/organisations", "0123456789abcdef"
	a := Key("nuapay", url, acct)
	if !strings.HasPrefix(a, "nuapay:") || len(a) != len("nuapay:")+12 || strings.Contains(a, "example") || strings.Contains(a, acct[:8]) {
		t.Errorf("key %q: want nuapay: and 12 hex characters, without the URL or the account", a)
	}
	for _, tc := range []struct {
		name, url, account string
		same               bool
	}{
		{"same endpoint and account", url, acct, true},
		{"another endpoint", "https://other.example/organisations", acct, false},
		{"another account", url, "fedcba9876543210", false},
		{"no account", url, "", false},
	} {
		if b := Key("nuapay", tc.url, tc.account); (a == b) != tc.same {
			t.Errorf("%s: keys %q and %q, want the same %t", tc.name, a, b, tc.same)
		}
	}
}

// New without the shared tier panics at once, not at the first spend.
func TestNewRequiresTier(t *testing.T) {
	defer func() {
		if r := recover(); r == nil || !strings.Contains(fmt.Sprint(r), "via") {
			t.Fatalf("New with a nil tier: recovered %v; want a panic naming via", r)
		}
	}()
	New(nil)
}

// newTier is a shared tier on client with the key prefix prefix (the
// default when empty), closed with the test. Its calls get a generous
// bound: the machine is shared.
func newTier(t *testing.T, client redis.UniversalClient, prefix string) *fleet.Cache {
	t.Helper()
	keys, err := seal.New(bytes.Repeat([]byte{1}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	tier, err := fleet.New(fleet.Options{Client: client, Keys: keys, KeyPrefix: prefix, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { tier.Close() })
	return tier
}

// TestSharedBudget spends one budget from two clients, as two brokers of a
// fleet do, on a real redis-server. The rate is one request per 100 s, so
// that the test does not depend on how fast it runs.
func TestSharedBudget(t *testing.T) {
	srv := redistest.Start(t)
	ctx := context.Background()
	var stores [2]*Store
	for i := range stores {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
		t.Cleanup(func() { c.Close() })
		stores[i] = New(newTier(t, c, "tb-test:"))
	}
	l := budget.Limit{Rate: 1, Period: 100 * time.Second, Burst: 3}
	key := Key("nuapay", "https://api.example", budget.Account("key"))
	for i, st := range []struct {
		store, n, allowed, remaining int
		spent                        int // the bucket is full again after spent*100 s
	}{
		{0, 0, 0, 3, 0}, // a read spends nothing
		{0, 2, 2, 1, 2},
		{1, 1, 1, 0, 3},
		{1, 1, 0, 0, 3},
		{0, 1, 0, 0, 3},
	} {
		res, err := stores[st.store].AllowN(ctx, key, l, st.n)
		if err != nil {
			t.Fatal(err)
		}
		if res.Allowed != st.allowed || res.Remaining != st.remaining {
			t.Errorf("step %d: allowed %d remaining %d, want %d %d", i, res.Allowed, res.Remaining, st.allowed, st.remaining)
		}
		denied := st.n > 0 && st.allowed == 0
		if denied != (res.RetryAfter > 0) || denied && (res.RetryAfter > 100*time.Second || res.RetryAfter < 90*time.Second) {
			t.Errorf("step %d: RetryAfter %s (denied %v)", i, res.RetryAfter, denied)
		}
		if full := time.Duration(st.spent) * 100 * time.Second; res.ResetAfter > full || res.ResetAfter < full-10*time.Second {
			t.Errorf("step %d: ResetAfter %s, want about %s", i, res.ResetAfter, full)
		}
	}
	// Another provider's budget is its own.
	if res, err := stores[1].AllowN(ctx, Key("nuapay", "https://other.example", budget.Account("key")), l, 1); err != nil || res.Allowed != 1 {
		t.Errorf("another key: %+v %v", res, err)
	}
	c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	defer c.Close()
	keys, err := c.Keys(ctx, "*").Result()
	if err != nil {
		t.Fatal(err)
	}
	for _, k := range keys {
		if !strings.HasPrefix(k, "rate:tb-test:budget:nuapay:") {
			t.Errorf("Redis key %q: want rate:tb-test:budget:nuapay:HASH", k)
		}
	}
}

// A budget's Redis key is "rate:", the tier's key prefix (its default when
// the tier has none), "budget:" and the budget's key.
func TestStoreKeyPrefix(t *testing.T) {
	srv := redistest.Start(t)
	ctx := context.Background()
	c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
	t.Cleanup(func() { c.Close() })
	key := Key("nuapay", "https://api.example", budget.Account("key"))
	for _, tt := range []struct{ prefix, want string }{
		{"", "rate:token_broker:budget:" + key},
		{"custom:", "rate:custom:budget:" + key},
	} {
		if _, err := New(newTier(t, c, tt.prefix)).AllowN(ctx, key, budget.Limit{Rate: 1, Period: 100 * time.Second, Burst: 1}, 1); err != nil {
			t.Fatal(err)
		}
		if n, err := c.Exists(ctx, tt.want).Result(); err != nil || n != 1 {
			t.Errorf("prefix %q: Redis key %q exists %d (%v), want 1", tt.prefix, tt.want, n, err)
		}
	}
}

// TestHoldSharedByFleet: two sidecars (two Keepers, two Redis clients)
// spend one provider's budget on a real redis-server; a 429's hold on one
// (Budget.Hold) refuses the other's callers and refreshes until it ends,
// on the Redis server's clock: the hold key next to the bucket expires
// then, and a shorter hold does not shorten it. The hold is 30 s and the
// bounds are loose, so that the test does not depend on how fast it runs.
func TestHoldSharedByFleet(t *testing.T) {
	srv := redistest.Start(t)
	ctx := context.Background()
	spec := Spec{Provider: "nuapay", Endpoint: "https://api.example", Limit: budget.Limit{Rate: 1, Period: 100 * time.Second, Burst: 3}, FleetSize: 2}
	var sidecars [2]*budget.Budget
	for i := range sidecars {
		c := redis.NewClient(&redis.Options{Addr: srv.Addr()})
		t.Cleanup(func() { c.Close() })
		b, err := NewKeeper(nil).Budget(spec, New(newTier(t, c, "tb-test:")), "redis")
		if err != nil {
			t.Fatal(err)
		}
		sidecars[i] = b
	}
	held, other := sidecars[0], sidecars[1]
	if _, err := other.Take(ctx, budget.Background, time.Time{}, nil); err != nil {
		t.Fatalf("refresh before the hold: %v, want served", err)
	}
	const hold = 30 * time.Second
	held.Hold(time.Now(), hold)(ctx)
	near := func(what string, d, want time.Duration) {
		t.Helper()
		if d > want || d < want-10*time.Second {
			t.Errorf("%s: %s, want about %s", what, d, want)
		}
	}
	var ee *budget.ExhaustedError
	if _, err := other.Take(ctx, budget.Background, time.Time{}, nil); !errors.As(err, &ee) {
		t.Fatalf("refresh on the other sidecar during the hold: %v, want the budget exhausted", err)
	}
	near("refresh's retry after", ee.RetryAfter, hold)
	if _, err := other.Take(ctx, budget.Foreground, time.Now().Add(5*time.Second), nil); !errors.As(err, &ee) {
		t.Fatalf("caller on the other sidecar during the hold: %v, want the budget exhausted", err)
	}
	near("caller's retry after", ee.RetryAfter, hold)

	c := srv.Client()
	holdKey := "rate:tb-test:budget:" + Key(spec.Provider, spec.Endpoint, spec.Account) + ":hold"
	ttl := func() time.Duration {
		t.Helper()
		d, err := c.PTTL(ctx, holdKey).Result()
		if err != nil {
			t.Fatal(err)
		}
		return d
	}
	near("hold key's expiry", ttl(), hold)
	other.Hold(time.Now(), time.Second)(ctx)
	near("hold key's expiry after a shorter hold", ttl(), hold)
	other.Hold(time.Now(), 2*hold)(ctx)
	near("hold key's expiry after a longer hold", ttl(), 2*hold)
}
