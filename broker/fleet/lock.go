package fleet

import (
	"context"
	"sync"
	"time"

	"github.com/bsm/redislock"
)

// held is a fleet lock this node holds. While held, a goroutine extends it
// every third of its TTL, so a long refresh keeps it; release stops that
// and releases it (only if this node still owns it).
type held struct {
	c    *Cache
	lock *redislock.Lock
	stop chan struct{}
	once sync.Once
	wg   sync.WaitGroup
}

// obtain tries once to take subject's lock, with owner token and expiry
// LockTTL. It returns redislock.ErrNotObtained when another node holds it.
func (c *Cache) obtain(ctx context.Context, subject string) (*held, error) {
	var l *redislock.Lock
	err := c.do(ctx, "lock", func(ctx context.Context) error {
		var err error
		l, err = c.locker.Obtain(ctx, c.lockKey(subject), c.opts.LockTTL, nil)
		return err
	})
	if err != nil {
		return nil, err
	}
	h := &held{c: c, lock: l, stop: make(chan struct{})}
	h.wg.Add(1)
	go h.keepAlive()
	return h, nil
}

func (h *held) keepAlive() {
	defer h.wg.Done()
	t := time.NewTicker(h.c.opts.LockTTL / 3)
	defer t.Stop()
	for {
		select {
		case <-h.stop:
			return
		case <-t.C:
			_ = h.c.do(context.Background(), "lock", func(ctx context.Context) error {
				return h.lock.Refresh(ctx, h.c.opts.LockTTL, nil)
			})
		}
	}
}

// release releases the lock if this node still owns it. When Redis is
// down, the lock expires by itself.
func (h *held) release() {
	h.once.Do(func() {
		close(h.stop)
		h.wg.Wait()
		_ = h.c.do(context.Background(), "unlock", func(ctx context.Context) error {
			return h.lock.Release(ctx)
		})
	})
}

// waitLock waits until an announcement about subject arrives, the lock
// would expire (its holder died), Options.LockPoll has passed (an
// announcement may be lost: the caller then looks at the token and the
// lock itself), or ctx is done. It returns an error only when ctx is done
// or Redis fails.
func (c *Cache) waitLock(ctx context.Context, subject string, wake <-chan struct{}) error {
	var ttl time.Duration
	err := c.do(ctx, "pttl", func(ctx context.Context) error {
		var err error
		ttl, err = c.rdb.PTTL(ctx, c.lockKey(subject)).Result()
		return err
	})
	if err != nil {
		return err
	}
	switch {
	case ttl == -2: // go-redis reports "no such key" as -2
		return nil // released meanwhile: try again now
	case ttl <= 0:
		ttl = c.opts.LockTTL // no expiry (not ours): wait at most one TTL
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

// errNotObtained is the lock library's answer when another node holds
// the lock.
var errNotObtained = redislock.ErrNotObtained
