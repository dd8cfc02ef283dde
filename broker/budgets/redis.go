package budgets

import (
	"context"
	"crypto/sha256"
	"encoding/hex"

	"github.com/go-redis/redis_rate/v10"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
)

// Store is a budget.Store in Redis, over the generic cell rate algorithm
// of github.com/go-redis/redis_rate on the shared tier's go-redis client:
// every broker of a fleet spends the same Redis key per provider, and the
// Redis server's clock decides, so the fleet together stays within the
// provider's limit. redis_rate names its keys "rate:" + key: with the
// tier's key prefix (fleet.Cache.KeyPrefix), a budget's Redis key is
// "rate:" + prefix + "budget:" + the budget's key (a Redis ACL for the
// broker must allow it). Each call runs through the shared tier
// (fleet.Cache.Run), which bounds it by the tier's adaptive timeout and
// keeps Redis out while the tier's breaker is open. Safe for concurrent
// use.
type Store struct {
	lim *redis_rate.Limiter
	via *fleet.Cache
}

// Op is the name of the Store's calls in the shared tier's metrics (a
// label).
const Op = "budget"

// New returns a Store on the Redis client of via (the shared tier), whose
// keys start with the tier's key prefix and whose calls run through the
// tier. via is required: New panics when it is nil. The Store does not
// close the client.
func New(via *fleet.Cache) *Store {
	if via == nil {
		panic("budgets.New: via (the shared tier the Store's calls run through) is nil")
	}
	return &Store{lim: redis_rate.NewLimiter(via.Client()), via: via}
}

// AllowN spends n requests of the budget key under l (n = 0 reads what
// remains without spending). RetryAfter is zero when n is allowed.
func (s *Store) AllowN(ctx context.Context, key string, l budget.Limit, n int) (budget.Result, error) {
	var res *redis_rate.Result
	err := s.via.Run(ctx, Op, func(ctx context.Context) error {
		var err error
		res, err = s.lim.AllowN(ctx, s.via.KeyPrefix()+"budget:"+key, limitOf(l), n)
		return err
	})
	if err != nil {
		return budget.Result{}, err
	}
	return budget.Result{Allowed: res.Allowed, Remaining: res.Remaining,
		RetryAfter: max(res.RetryAfter, 0), ResetAfter: max(res.ResetAfter, 0)}, nil
}

// limitOf is l in redis_rate's terms (the same fields).
func limitOf(l budget.Limit) redis_rate.Limit {
	return redis_rate.Limit{Rate: l.Rate, Burst: l.Burst, Period: l.Period}
}

// Key is the budget key of a provider: its name and the first 12 hex
// characters of the SHA-256 of its token endpoint, so that two registries
// that give one name to different token APIs keep two budgets, and the key
// holds no secret (a URL with credentials is refused by the registry; only
// its hash is used anyway).
func Key(provider, tokenURL string) string {
	sum := sha256.Sum256([]byte(tokenURL))
	return provider + ":" + hex.EncodeToString(sum[:])[:12]
}

// Interface guard.
var _ budget.Store = (*Store)(nil)
