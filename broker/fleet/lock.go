package fleet

import (
	"context"
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"strings"
	"sync"
	"time"

	"github.com/bsm/redislock"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// held is a fleet lock this node holds. While held, a goroutine extends it
// every quarter of its expiry, each extension given at most a quarter of
// it in Redis time, so that a long mint or refresh keeps it through a
// stalled extension or two; release, called once, stops that and
// releases it (only if this node still owns it).
type held struct {
	c    *Cache
	lock *redislock.Lock
	ttl  time.Duration // the lock's expiry (lockTTL)
	stop chan struct{}
	wg   sync.WaitGroup
}

// lockTTL is the expiry of subject's lock, which its live holder sets
// again every quarter of it (keepAlive). A refresh token's lock expires
// after Options.LockTTL: two refreshes at once could spend a rotating
// refresh token twice. A token's lock is a lease of four times
// Options.MaxTimeout (at least three Options.LockPoll, at most LockTTL):
// long enough for three extensions to be tried, short enough that a node
// killed while it holds it holds up the key's lookups elsewhere for much
// less than their fetch timeout. A lapsed token's lock costs a second
// token.
func (c *Cache) lockTTL(subject string) time.Duration {
	if tokenLock(subject) {
		return min(c.opts.LockTTL, max(4*c.opts.MaxTimeout, 3*c.opts.LockPoll))
	}
	return c.opts.LockTTL
}

// tokenLock reports whether subject is a token's lock ("tok:<name>"),
// not a refresh token's ("rt:<name>").
func tokenLock(subject string) bool { return strings.HasPrefix(subject, "tok:") }

// obtain tries once to take subject's lock, with a random owner token and
// expiry lockTTL. It returns redislock.ErrNotObtained when another node
// holds it. The token is chosen before the call, so a call that timed out
// and runs again (do) takes the lock it may already hold instead of
// finding it held by someone.
func (c *Cache) obtain(ctx context.Context, subject string) (*held, error) {
	token := make([]byte, 16)
	if _, err := rand.Read(token); err != nil {
		return nil, fmt.Errorf("fleet: lock owner token: %w", err)
	}
	lo := &redislock.Options{Token: base64.RawURLEncoding.EncodeToString(token)}
	ttl := c.lockTTL(subject)
	var l *redislock.Lock
	err := c.do(ctx, "lock", func(ctx context.Context) error {
		var err error
		l, err = c.locker.Obtain(ctx, c.lockKey(subject), ttl, lo)
		return err
	})
	if err != nil {
		return nil, err
	}
	h := &held{c: c, lock: l, ttl: ttl, stop: make(chan struct{})}
	h.wg.Go(h.keepAlive)
	return h, nil
}

func (h *held) keepAlive() {
	t := time.NewTicker(h.ttl / 4)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
			_ = h.c.do(withRedisTime(context.Background(), h.ttl/4), "lock", func(ctx context.Context) error {
				return h.lock.Refresh(ctx, h.ttl, nil)
			})
		}
	}
}

// release releases the lock if this node still owns it, its runs lasting
// at most Options.MaxTimeout together. When Redis is down, the lock
// expires by itself.
func (h *held) release() {
	close(h.stop)
	h.wg.Wait()
	_ = h.c.do(withRedisTime(context.Background(), h.c.opts.MaxTimeout), "unlock", func(ctx context.Context) error {
		return h.lock.Release(ctx)
	})
}

// waitLock waits until an announcement about subject arrives, the lock
// would expire (its holder died), Options.LockPoll has passed (an
// announcement may be lost: the caller then looks at the token and the
// lock itself), or ctx is done. A lock without expiry is given one first
// (see repairLock). It returns an error only when ctx is done or Redis
// fails.
func (c *Cache) waitLock(ctx context.Context, subject string, wake <-chan struct{}) error {
	var ttl time.Duration
	err := c.do(ctx, "pttl", func(ctx context.Context) error {
		var err error
		ttl, err = c.opts.Client.PTTL(ctx, c.lockKey(subject)).Result()
		return err
	})
	if err != nil {
		return err
	}
	switch {
	case ttl == -2: // go-redis reports "no such key" as -2
		return nil // released meanwhile: try again now
	case ttl == -1: // a key without expiry
		if ttl, err = c.repairLock(ctx, subject); err != nil {
			return err
		}
		if ttl <= 0 {
			return nil // released or repaired by another node meanwhile: look again
		}
	}
	t := time.NewTimer(min(ttl, c.opts.LockPoll))
	defer t.Stop()
	select {
	case <-wake:
	case <-t.C:
	case <-ctx.Done():
		return ctx.Err()
	}
	return nil
}

// repairLock gives subject's lock an expiry if it has none (left by an
// operator, a bug or a failover: it would stall its key for ever), and
// returns that expiry (0 when the key changed meanwhile). A token's lock
// is taken as expired at once; a refresh token's gets half the lock TTL,
// so that a live holder's keep-alive comes first and keeps it.
func (c *Cache) repairLock(ctx context.Context, subject string) (time.Duration, error) {
	ttl := c.opts.LockTTL / 2
	if tokenLock(subject) {
		ttl = time.Millisecond
	}
	var set int64
	err := c.do(ctx, "repair", func(ctx context.Context) error {
		var err error
		set, err = repairScript.Run(ctx, c.opts.Client, []string{c.lockKey(subject)}, ttl.Milliseconds()).Int64()
		return err
	})
	if err != nil {
		return 0, err
	}
	if set == 0 {
		return 0, nil
	}
	c.opts.Logger.Warn("a fleet lock in redis had no expiry (set by hand, a bug, or a failover that lost it): gave it one; the key is free once it expires",
		zap.String("redis_key", c.lockKey(subject)), zap.Duration("expiry", ttl))
	return ttl, nil
}

// repairScript sets the expiry ARGV[1] (milliseconds) of KEYS[1] if the key
// exists without one (PEXPIRE ... NX, which Redis 7 has, for any Redis);
// it returns 1 when it set it.
var repairScript = redis.NewScript(`
if redis.call("PTTL", KEYS[1]) == -1 then
	return redis.call("PEXPIRE", KEYS[1], ARGV[1])
end
return 0
`)
