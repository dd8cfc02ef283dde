package fleet

import (
	"context"
	"crypto/sha1"
	"encoding/hex"
	"errors"
	"regexp"
	"slices"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// The commands the tier's client sends, checked by checkCommands: GET,
// SET, DEL and PTTL; EVALSHA, then EVAL (go-redis's Script.Run), for this
// package's scripts, github.com/bsm/redislock's and the budgets'
// (broker/budgets, on this client), whose scripts call GET, SET, DEL,
// PTTL, PEXPIRE, GETRANGE and TIME (Redis checks a script's calls against
// the user's ACL too); XADD and XRANGE on the purge log; PUBLISH and
// SUBSCRIBE on the channel; PING, the subscription's health check. CONFIG
// GET (checkEviction) is optional.

// probeScript is the script checkCommands runs with EVAL, then EVALSHA: it
// touches no key.
const probeScript = "return 1"

// noCommand reads the command an ACL refused from Redis's answer ("NOPERM
// this user has no permissions to run the 'evalsha' command", "NOPERM User
// broker has no permissions to run the 'evalsha' command"). An answer about
// keys or channels ("... to access one of the keys used as arguments")
// names no command.
var noCommand = regexp.MustCompile(`^NOPERM .*to run the '([^']+)' command`)

// refusedCommand returns the command an ACL refused in err, lower case, or
// "" when err is not such a refusal.
func refusedCommand(err error) string {
	var answer redis.Error
	if !errors.As(err, &answer) {
		return ""
	}
	m := noCommand.FindStringSubmatch(answer.Error())
	if m == nil {
		return ""
	}
	return strings.ToLower(m[1])
}

// refusedKeys reports whether err is an ACL refusing a key the command
// names ("NOPERM this user has no permissions to access one of the keys
// used as arguments", "NOPERM No permissions to access a key"), not the
// command nor a channel.
func refusedKeys(err error) bool {
	var answer redis.Error
	if !errors.As(err, &answer) || refusedCommand(err) != "" {
		return false
	}
	msg := answer.Error()
	return strings.HasPrefix(msg, "NOPERM ") && strings.Contains(msg, " key") && !strings.Contains(msg, "channel")
}

// clientUser is the ACL user the client authenticates as ("default"
// without one), for a client whose options it can read; "<user>"
// otherwise.
func clientUser(client redis.UniversalClient) string {
	var user string
	switch cl := client.(type) {
	case *redis.Client:
		user = cl.Options().Username
	case *redis.ClusterClient:
		user = cl.Options().Username
	default:
		return "<user>"
	}
	if user == "" {
		return "default"
	}
	return user
}

// checkCommands runs each command the tier's client sends once, with no
// effect: on a key (probe:<node>:acl) and a stream (probe:<node>:log) that
// it does not create (SET ... XX, XADD ... NOMKSTREAM), a GET under the
// budgets' prefix rate:<key_prefix>, a script that touches no key, and a
// PUBLISH on a channel nobody subscribes to (<key_prefix>probe). Redis
// checks the ACL before it runs a command, so the commands the user may
// not run (NOPERM naming the command), and subscribe when subscribed is
// such a refusal, are logged once with the ACL SETUSER that grants them,
// rather than found one refused lookup at a time. A probe refused for its
// key is reported apart (Redis checks the command first); a refused probe
// channel proves PUBLISH allowed. In a cluster, only the probe keys'
// shards are asked. It lasts at most max(Options.Timeout, 1 s), not
// through the breaker, as catchUp: Redis has just answered.
func (c *Cache) checkCommands(subscribed error) {
	ctx, cancel := context.WithTimeout(context.Background(), max(c.opts.Timeout, time.Second))
	defer cancel()
	probe := c.opts.KeyPrefix + "probe:" + c.node + ":acl"
	stream := c.opts.KeyPrefix + "probe:" + c.node + ":log"
	sum := sha1.Sum([]byte(probeScript))
	var whoami *redis.StringCmd
	cmds, _ := c.opts.Client.Pipelined(ctx, func(p redis.Pipeliner) error {
		whoami = p.ACLWhoAmI(ctx)
		p.Ping(ctx)
		p.Time(ctx)
		p.SetArgs(ctx, probe, "1", redis.SetArgs{Mode: "XX", TTL: BreakerCooldown})
		p.Get(ctx, probe)
		p.GetRange(ctx, probe, 0, 0)
		p.Get(ctx, "rate:"+probe) // the budgets' range (broker/budgets)
		p.PTTL(ctx, probe)
		p.PExpire(ctx, probe, BreakerCooldown)
		p.Del(ctx, probe)
		p.Eval(ctx, probeScript, nil)
		p.EvalSha(ctx, hex.EncodeToString(sum[:]), nil)
		p.XAdd(ctx, &redis.XAddArgs{Stream: stream, NoMkStream: true, MaxLen: 1, Values: []any{"e", "probe"}})
		p.XRange(ctx, stream, "-", "+")
		p.Publish(ctx, c.opts.KeyPrefix+"probe", "")
		return nil
	})
	var missing []string
	keysRefused := false
	for _, cmd := range cmds {
		if cmd == whoami {
			continue
		}
		if name := refusedCommand(cmd.Err()); name != "" && !slices.Contains(missing, name) {
			missing = append(missing, name)
		}
		keysRefused = keysRefused || refusedKeys(cmd.Err())
	}
	if name := refusedCommand(subscribed); name != "" {
		missing = append(missing, name)
	}
	user := whoami.Val()
	if whoami.Err() != nil || user == "" {
		user = clientUser(c.opts.Client) // ACL WHOAMI refused
	}
	if len(missing) > 0 {
		c.opts.Logger.Error("redis user "+user+" may not run commands the shared tier needs ("+strings.Join(missing, ", ")+
			"): lookups would mint without sharing tokens once Redis refuses them, and refresh tokens could not be loaded or saved; grant them: ACL SETUSER "+
			user+" +"+strings.Join(missing, " +"),
			zap.String("redis_user", user), zap.Strings("missing_commands", missing))
	}
	if keysRefused {
		c.opts.Logger.Error("redis user "+user+" may not use keys under the prefix "+c.opts.KeyPrefix+" or rate:"+c.opts.KeyPrefix+
			": the shared tier cannot store tokens nor refresh tokens, or the budgets' scripts are refused; grant them: ACL SETUSER "+
			user+" ~"+c.opts.KeyPrefix+"* ~rate:"+c.opts.KeyPrefix+"*",
			zap.String("redis_user", user))
	}
}
