package fleet

import (
	"context"
	"fmt"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// startsOp names the count of a consent link's starts in the tier's
// metrics.
const startsOp = "starts"

// startsKey is the Redis key of the start count of the consent link
// stored under key (a store key: already a hash of the link), named as
// the tier names its keys.
func (s *Store) startsKey(key string) string {
	return s.c.opts.KeyPrefix + "starts:" + s.c.name(key)
}

// CountStart implements oauth.StartCounter: the starts of a consent link
// are counted in Redis under starts:<name>, one count for the fleet, so
// that oauth.MaxStartsPerLink holds for the fleet. The count expires at
// kept, by the Cache's clock (Options.Now), set by its first start. The
// call runs once through the breaker (Cache.Run: not tried again after a
// timeout, as a count is not the same when run twice); while Redis is
// unavailable it fails, and the consent flow counts at the instance.
func (s *Store) CountStart(ctx context.Context, key string, kept time.Time) (int64, error) {
	ms := max(kept.Sub(s.c.opts.Now()).Milliseconds(), 1)
	var n int64
	err := s.c.Run(ctx, startsOp, func(ctx context.Context) error {
		var err error
		n, err = startsScript.Run(ctx, s.c.opts.Client, []string{s.startsKey(key)}, ms).Int64()
		return err
	})
	if err != nil {
		return 0, fmt.Errorf("fleet: counting the starts of a consent link in redis: %w", err)
	}
	return n, nil
}

// startsScript adds one to the count in KEYS[1] and returns it; the first
// count expires in ARGV[1] milliseconds, and later ones keep the expiry
// left. It calls GET, PTTL and SET only (commands the tier's ACL check
// covers; SET ... KEEPTTL would need Redis 6).
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
