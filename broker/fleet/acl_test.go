package fleet

import (
	"strings"
	"testing"

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
