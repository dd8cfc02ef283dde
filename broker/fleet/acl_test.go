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

// TestMissingCommandsAreLoggedAtStart: a Redis ACL user without a command
// the tier sends is reported when the tier starts, in one log naming the
// user, the missing commands and the ACL SETUSER that grants them, not at
// the first lookups as refused writes. A user refused the check's keys,
// or ACL WHOAMI, is not reported as missing a command, nor a user whose
// channels are only the fleet's (the check's PUBLISH, on another channel,
// is refused for its channel); a user with every command is not reported.
// A user refused the budgets' keys (rate:<key_prefix>*) is told to grant
// them with the prefix's.
// Whatever the user may run, the check leaves no key in Redis.
func TestMissingCommandsAreLoggedAtStart(t *testing.T) {
	r := startRedis(t)
	for _, tc := range []struct {
		name    string
		rules   []string
		missing []string // the commands the log names; nil: no such log
		keys    bool     // a log says the keys under the prefix are refused
	}{
		{name: "all commands", rules: []string{"+@all"}},
		{name: "no evalsha", rules: []string{"+@all", "-evalsha"}, missing: []string{"evalsha"}},
		{name: "no eval nor publish", rules: []string{"+@all", "-eval", "-publish"}, missing: []string{"eval", "publish"}},
		{name: "no pexpire (in the lock scripts)", rules: []string{"+@all", "-pexpire"}, missing: []string{"pexpire"}},
		{name: "no pexpire nor del", rules: []string{"+@all", "-pexpire", "-del"}, missing: []string{"pexpire", "del"}},
		{name: "no time (in the budget scripts)", rules: []string{"+@all", "-time"}, missing: []string{"time"}},
		{name: "no ping (the subscription's health check)", rules: []string{"+@all", "-ping"}, missing: []string{"ping"}},
		{name: "no subscribe", rules: []string{"+@all", "-subscribe"}, missing: []string{"subscribe"}},
		{name: "no acl whoami", rules: []string{"+@all", "-acl", "-evalsha"}, missing: []string{"evalsha"}},
		{name: "other keys only", rules: []string{"+@all", "resetkeys", "~other:*"}, keys: true},
		{name: "the prefix's keys only, not the budgets'", rules: []string{"+@all", "resetkeys", "~" + DefaultKeyPrefix + "*"}, keys: true},
		{name: "the fleet's channel only", rules: []string{"+@all", "resetchannels", "&" + DefaultKeyPrefix + "events"}},
		{name: "the fleet's channel only, no publish", rules: []string{"+@all", "resetchannels", "&" + DefaultKeyPrefix + "events", "-publish"},
			missing: []string{"publish"}},
		{name: "the README's grant", rules: []string{"resetkeys", "~" + DefaultKeyPrefix + "*", "~rate:" + DefaultKeyPrefix + "*",
			"resetchannels", "&" + DefaultKeyPrefix + "events", "-@all", "+get", "+set", "+del", "+pttl", "+pexpire", "+getrange", "+time",
			"+evalsha", "+eval", "+xadd", "+xrange", "+publish", "+subscribe", "+ping"}},
		{name: "read commands only", rules: []string{"+@read", "+@connection", "+subscribe", "+publish", "+eval", "+evalsha"},
			missing: []string{"time", "set", "pexpire", "del", "xadd"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			user := strings.ReplaceAll(tc.name, " ", "-")
			r.CLI(append([]string{"ACL", "SETUSER", user, "reset", "on", ">broker-password-1", "~" + DefaultKeyPrefix + "*", "~rate:" + DefaultKeyPrefix + "*", "&" + DefaultKeyPrefix + "*"}, tc.rules...)...)
			core, logs := observer.New(zap.WarnLevel)
			uo := &redis.UniversalOptions{Addrs: []string{r.Addr()}, Username: user, Password: "broker-password-1"}
			ClientOptions(uo, 5*time.Second, 5*time.Second)
			rdb := redis.NewUniversalClient(uo)
			t.Cleanup(func() { rdb.Close() })
			c, err := New(Options{Client: rdb, Keys: testKeys(t, 1), Timeout: 5 * time.Second, Logger: zap.New(core)})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { c.Close() })

			var commandLogs, keyLogs []observer.LoggedEntry
			for _, e := range logs.All() {
				text := fmt.Sprint(e.Message, e.ContextMap())
				if strings.Contains(text, "broker-password-1") {
					t.Fatalf("a log shows the password: %s", text)
				}
				switch {
				case strings.Contains(e.Message, "may not run commands"):
					commandLogs = append(commandLogs, e)
				case strings.Contains(e.Message, "may not use keys"):
					keyLogs = append(keyLogs, e)
				case strings.Contains(e.Message, "refused the subscription"):
					t.Errorf("a user without subscribe is told to grant the channel: %s", e.Message)
				}
			}
			switch {
			case tc.missing == nil && len(commandLogs) > 0:
				t.Errorf("missing commands reported for a user that has them: %v", commandLogs)
			case tc.missing != nil && len(commandLogs) != 1:
				t.Errorf("%d logs of missing commands; want one naming %v; logs: %v", len(commandLogs), tc.missing, logs.All())
			case tc.missing != nil:
				msg := commandLogs[0].Message
				grant := "ACL SETUSER " + user + " +" + strings.Join(tc.missing, " +")
				if !strings.Contains(msg, "redis user "+user+" ") || !strings.Contains(msg, grant) {
					t.Errorf("log %q; want it to name the user %s and the grant %q", msg, user, grant)
				}
				if got := commandLogs[0].ContextMap()["missing_commands"]; fmt.Sprint(got) != fmt.Sprint(tc.missing) {
					t.Errorf("missing_commands = %v; want %v", got, tc.missing)
				}
			}
			if tc.keys != (len(keyLogs) == 1) || len(keyLogs) > 1 {
				t.Errorf("logs of refused keys: %v; want one: %v", keyLogs, tc.keys)
			}
			if tc.keys && len(keyLogs) == 1 && !strings.Contains(keyLogs[0].Message, "ACL SETUSER "+user+" ~"+DefaultKeyPrefix+"* ~rate:"+DefaultKeyPrefix+"*") {
				t.Errorf("log %q; want the grant of the prefix's keys and the budgets'", keyLogs[0].Message)
			}
			if left, err := r.Client().Keys(testCtx(t), "*").Result(); err != nil || len(left) > 0 {
				t.Errorf("keys in Redis after the check: %v (%v); want none", left, err)
			}
			if tc.missing != nil || tc.keys {
				return
			}
			// A user the check passes can share a token: the lookup
			// stores it, under its lock, with no refusal logged.
			before := logs.Len()
			var m minter
			if tok, _, err := c.Fetch(testCtx(t), testKey, usable, m.mint); err != nil || tok.Value == "" {
				t.Fatalf("lookup: %v", err)
			}
			if stored := r.Client().Keys(testCtx(t), DefaultKeyPrefix+"tok:*").Val(); len(stored) != 1 {
				t.Errorf("tokens in Redis after a lookup: %v; want one", stored)
			}
			if after := logs.All()[before:]; len(after) > 0 {
				t.Errorf("logs of the lookup: %v; want none", after)
			}
			r.Client().FlushAll(testCtx(t))
		})
	}
}
