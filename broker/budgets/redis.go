package budgets

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"time"

	"github.com/go-redis/redis_rate/v10"
	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
)

// Store is a budget.Store in Redis (redis_rate on the shared tier's
// client): every broker of a fleet spends one Redis key per provider, on
// the Redis server's clock. A budget's Redis key is "rate:" + the tier's
// key prefix + "budget:" + the budget's key, and its hold that + ":hold"
// (a Redis ACL for the broker must allow them). Each call runs through the
// shared tier (fleet.Cache.Run), bounded by its timeout and breaker.
type Store struct {
	lim *redis_rate.Limiter
	via *fleet.Cache
}

// Op is the name of the Store's calls in the shared tier's metrics (a
// label).
const Op = "budget"

// New returns a Store on the shared tier via, which must not be nil. The
// Store does not close the client.
func New(via *fleet.Cache) *Store {
	if via == nil {
		panic("budgets.New: via (the shared tier the Store's calls run through) is nil")
	}
	return &Store{lim: redis_rate.NewLimiter(via.Client()), via: via}
}

// AllowN spends n requests of the budget key under l (n = 0 reads what
// remains). RetryAfter is zero when n is allowed. While the key is held it
// spends nothing and answers with the hold's rest as RetryAfter.
func (s *Store) AllowN(ctx context.Context, key string, l budget.Limit, n int) (budget.Result, error) {
	var out budget.Result
	err := s.via.Run(ctx, Op, func(ctx context.Context) error {
		held, err := s.via.Client().PTTL(ctx, s.holdKey(key)).Result()
		if err != nil {
			return err
		}
		if held > 0 {
			out = budget.Result{RetryAfter: held, ResetAfter: held}
			return nil
		}
		res, err := s.lim.AllowN(ctx, s.bucketKey(key), limitOf(l), n)
		if err != nil {
			return err
		}
		out = budget.Result{Allowed: res.Allowed, Remaining: res.Remaining,
			RetryAfter: max(res.RetryAfter, 0), ResetAfter: max(res.ResetAfter, 0)}
		return nil
	})
	if err != nil {
		return budget.Result{}, err
	}
	return out, nil
}

// holdScript sets KEYS[1] to expire in ARGV[1] milliseconds unless it
// already expires later (PTTL: -2 when missing).
var holdScript = redis.NewScript(`
local ms = tonumber(ARGV[1])
if redis.call("PTTL", KEYS[1]) < ms then
	redis.call("SET", KEYS[1], "1", "PX", ms)
end
return 0
`)

// Hold closes the budget key for d (at least a millisecond) on the Redis
// server's clock, keeping a later hold in force. d <= 0 holds nothing.
func (s *Store) Hold(ctx context.Context, key string, d time.Duration) error {
	if d <= 0 {
		return nil
	}
	ms := max(d.Milliseconds(), 1)
	return s.via.Run(ctx, Op, func(ctx context.Context) error {
		return holdScript.Run(ctx, s.via.Client(), []string{s.holdKey(key)}, ms).Err()
	})
}

// bucketKey is the budget key's name for redis_rate, which puts "rate:"
// before it.
func (s *Store) bucketKey(key string) string { return s.via.KeyPrefix() + "budget:" + key }

// holdKey is the Redis key of the budget key's hold, next to its bucket.
func (s *Store) holdKey(key string) string { return "rate:" + s.bucketKey(key) + ":hold" }

// limitOf is l in redis_rate's terms (the same fields).
func limitOf(l budget.Limit) redis_rate.Limit {
	return redis_rate.Limit{Rate: l.Rate, Burst: l.Burst, Period: l.Period}
}

// Key is the budget key of a provider: its name and 12 hex characters of
// a SHA-256 over its token endpoint and account, so that different token
// APIs or credentials under one name keep separate budgets and the key
// holds no secret (its 48 bits still let a reader confirm a guessed
// credential for a known token URL).
func Key(provider, tokenURL, account string) string {
	sum := sha256.Sum256([]byte(tokenURL + "\x00" + account))
	return provider + ":" + hex.EncodeToString(sum[:])[:12]
}

// Interface guard.
var _ budget.Store = (*Store)(nil)
