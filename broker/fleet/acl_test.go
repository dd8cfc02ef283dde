package fleet

import (
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// TestChannelRefusedIsLogged: a Redis whose ACL lets the broker's user
// read and write keys but not the fleet's channel (Redis 7 gives new users
// no channel: acl-pubsub-default resetchannels) refuses the subscription.
// Nodes then never hear purges: New says so, naming the channel and what
// to grant.
func TestChannelRefusedIsLogged(t *testing.T) {
	r := startRedis(t)
	r.CLI("ACL", "SETUSER", "default", "resetchannels")
	core, logs := observer.New(zap.WarnLevel)
	newNode(t, r, testKeys(t, 1), func(o *Options) { o.Logger = zap.New(core) })
	for _, e := range logs.All() {
		if s := e.Message; strings.Contains(s, DefaultKeyPrefix+"events") && strings.Contains(s, "&"+DefaultKeyPrefix+"events") {
			return
		}
	}
	t.Fatalf("no warning naming the refused channel and the ACL grant; logs: %v", logs.All())
}

// TestWrongPasswordIsLoggedAtStart: a Redis that refuses the broker's
// credentials (a wrong password, or none where one is required) is
// reported when the tier starts, naming the settings to fix and never the
// password; lookups mint without Redis.
func TestWrongPasswordIsLoggedAtStart(t *testing.T) {
	const password = "wrong-password-0123"
	r := startRedis(t)
	r.CLI("CONFIG", "SET", "requirepass", "right-password-4567")
	for _, tc := range []struct{ password, answer string }{
		{password, "WRONGPASS"},
		{"", "NOAUTH"},
	} {
		core, logs := observer.New(zap.WarnLevel)
		uo := &redis.UniversalOptions{Addrs: []string{r.Addr()}, Password: tc.password}
		ClientOptions(uo, time.Second, time.Second)
		rdb := redis.NewUniversalClient(uo)
		t.Cleanup(func() { rdb.Close() })
		c, err := New(Options{Client: rdb, Keys: testKeys(t, 1), Timeout: time.Second, Logger: zap.New(core)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { c.Close() })
		var found bool
		for _, e := range logs.All() {
			text := fmt.Sprint(e.Message, e.ContextMap())
			if strings.Contains(text, password) {
				t.Fatalf("a log shows the password: %s", text)
			}
			found = found || strings.Contains(e.Message, "username") && strings.Contains(e.Message, "password") && strings.Contains(text, tc.answer)
		}
		if !found {
			t.Errorf("%s: no log at start naming username and password with Redis's answer; logs: %v", tc.answer, logs.All())
		}
		var m minter
		if tok, _, err := c.Fetch(testCtx(t), testKey, usable, m.mint); err != nil || tok.Value == "" || m.n.Load() != 1 {
			t.Fatalf("%s: lookup with refused credentials: err=%v mints=%d; want a local mint", tc.answer, err, m.n.Load())
		}
	}
}

// TestEvictingPolicyIsLogged: a Redis whose maxmemory-policy may evict
// keys without expiry (allkeys-lru) could drop the merchants' refresh
// tokens: New warns, naming the setting and what to set; not with
// noeviction (Redis's default) nor a volatile-* policy.
func TestEvictingPolicyIsLogged(t *testing.T) {
	r := startRedis(t)
	for _, tc := range []struct {
		policy string
		warned bool
	}{
		{"noeviction", false},
		{"volatile-lru", false},
		{"allkeys-lru", true},
	} {
		r.CLI("CONFIG", "SET", "maxmemory-policy", tc.policy)
		core, logs := observer.New(zap.WarnLevel)
		newNode(t, r, testKeys(t, 1), func(o *Options) { o.Logger = zap.New(core) })
		var warned bool
		for _, e := range logs.All() {
			warned = warned || strings.Contains(e.Message, "maxmemory-policy "+tc.policy) && strings.Contains(e.Message, "noeviction")
		}
		if warned != tc.warned {
			t.Errorf("maxmemory-policy %s: warned %v, want %v; logs: %v", tc.policy, warned, tc.warned, logs.All())
		}
	}
}
