package fleet

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// startsOp names the count of a consent link's starts in the tier's
// metrics.
const startsOp = "starts"

// startsKey is the Redis key of the start count of the consent link
// stored under key (a store key: already a hash of the link): the
// SHA-256 of key under a fixed label, without the encryption key, so
// that nodes on different current keys (during a key rotation) share
// one count, and a count made before a rotation still counts after it.
func (s *Store) startsKey(key string) string {
	h := sha256.Sum256([]byte("token_broker consent link starts\x00" + key))
	return s.c.opts.KeyPrefix + "starts:" + hex.EncodeToString(h[:])
}

// CountStart implements oauth.StartCounter with one count for the fleet
// under starts:<hash>, so that oauth.MaxStartsPerLink holds for the
// fleet. The count expires at kept (Options.Now's clock), set by its
// first start. It is not retried after a timeout (a count run twice counts
// twice); while Redis is unavailable it fails, and the consent flow counts
// at the instance. The first failure after a success (or since New) is
// logged.
func (s *Store) CountStart(ctx context.Context, key string, kept time.Time) (int64, error) {
	ms := max(kept.Sub(s.c.opts.Now()).Milliseconds(), 1)
	var n int64
	err := s.c.do(ctx, startsOp, func(ctx context.Context) error {
		var err error
		n, err = startsScript.Run(ctx, s.c.opts.Client, []string{s.startsKey(key)}, ms).Int64()
		return err
	})
	if err != nil {
		if !s.c.startsFailing.Swap(true) {
			s.c.opts.Logger.Warn("redis did not count a consent link's start: each instance counts its own starts until redis counts them again; check the Redis ACL (the start count script's EVALSHA, EVAL, GET, PTTL and SET) or reachability",
				zap.Error(err))
		}
		return 0, fmt.Errorf("fleet: counting the starts of a consent link in redis (check the Redis ACL or reachability; meanwhile each instance counts its own starts): %w", err)
	}
	s.c.startsFailing.Store(false)
	return n, nil
}

// startsScript adds one to the count in KEYS[1] and returns it; the first
// count expires in ARGV[1] milliseconds, and later ones keep the expiry
// left. A count without an expiry (written without one) gets ARGV[1], so
// that no count is kept for ever. It calls GET, PTTL and SET only
// (commands the tier's ACL check covers; SET ... KEEPTTL would need
// Redis 6).
var startsScript = redis.NewScript(`
local n = (tonumber(redis.call("GET", KEYS[1])) or 0) + 1
local ms = ARGV[1]
if n > 1 then
	local left = redis.call("PTTL", KEYS[1])
	if left > 0 then
		ms = left
	end
end
redis.call("SET", KEYS[1], n, "PX", ms)
return n
`)

var _ oauth.StartCounter = (*Store)(nil)
