package fleet

import (
	"context"
	"maps"
	"math"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"
)

// A purge that Redis did not take (unreachable, the breaker open, an error
// answer) reaches neither the stored token nor the other nodes, which keep
// serving the token. The node keeps such purges, at most maxUnsent, each
// until the token it names expires as far as the node has seen it
// (unsentTTL when it has not), and sends them again once Redis answers:
// when a call of the tier succeeds, when the subscription is confirmed
// again, and every BreakerCooldown while some are kept; at most once per
// resendEvery.

// Bounds of the purges kept to be sent again.
const (
	// maxUnsent is how many purges a node keeps: beyond it, the one whose
	// token expires first is dropped.
	maxUnsent = purgeLogLen
	// unsentTTL is how long a purge of a token the node has no record of
	// is kept.
	unsentTTL = time.Hour
	// resendEvery is the shortest time between two tries of a purge.
	resendEvery = time.Second
)

// unsentPurge names a purge: Purge's arguments.
type unsentPurge struct{ key, fingerprint string }

// unsentPurges are the purges a node keeps to send again.
type unsentPurges struct {
	mu      sync.Mutex
	m       map[unsentPurge]int64 // until when to send it (unix ns)
	tried   time.Time             // the last try (Options.Now)
	running bool                  // resendLoop runs
	n       atomic.Int64          // len(m), read without mu
	wake    chan struct{}         // (1 buffered) Redis answered: try now
}

// Purge implements broker.SharedCache: a compare-and-delete by
// fingerprint, then an announcement to every node. No version up to the
// purged token's is accepted afterwards, on this node (even when Redis
// failed) and on those that hear the announcement (version.go). A delete
// that Redis refuses as a write (writeRefusal: a read-only replica, an
// ACL) is still announced: Redis takes the announcement, and the nodes
// that hear it drop the token and refuse it when they read it back. A
// purge whose announcement Redis did not take is sent again once Redis
// answers (unsentPurges).
func (c *Cache) Purge(ctx context.Context, key, fingerprint string) error {
	announced, until, err := c.purge(ctx, key, fingerprint)
	c.keepUnsent(unsentPurge{key, fingerprint}, announced, until)
	return err
}

// keepUnsent keeps p, tried at Options.Now, to be sent again until until
// (unix ns; 0: unsentTTL from now) unless it was announced.
func (c *Cache) keepUnsent(p unsentPurge, announced bool, until int64) {
	u := &c.unsent
	u.mu.Lock()
	defer u.mu.Unlock()
	defer func() { u.n.Store(int64(len(u.m))) }()
	if announced {
		delete(u.m, p)
		return
	}
	now := c.opts.Now()
	u.tried = now
	if until == 0 {
		until = now.Add(unsentTTL).UnixNano()
	}
	if _, kept := u.m[p]; !kept && len(u.m) >= maxUnsent {
		var first unsentPurge
		firstUntil := int64(math.MaxInt64)
		for q, t := range u.m {
			if t < firstUntil {
				first, firstUntil = q, t
			}
		}
		delete(u.m, first)
		c.opts.Logger.Warn("a purge that Redis has not taken is dropped: too many wait to be sent again", zap.Int("kept", maxUnsent))
	}
	u.m[p] = until
	if !u.running {
		u.running = true
		go c.resendLoop()
	}
}

// redisAnswered wakes resendLoop, if purges wait for Redis.
func (c *Cache) redisAnswered() {
	if c.unsent.n.Load() > 0 {
		select {
		case c.unsent.wake <- struct{}{}:
		default:
		}
	}
}

// resendLoop sends the kept purges again when Redis answers, and every
// BreakerCooldown, until none is kept or the Cache is closed.
func (c *Cache) resendLoop() {
	tick := time.NewTicker(BreakerCooldown)
	defer tick.Stop()
	for {
		select {
		case <-c.done:
			return
		case <-c.unsent.wake:
		case <-tick.C:
		}
		if !c.resend() {
			return
		}
	}
}

// resend tries each kept purge once, unless one was tried less than
// resendEvery ago, dropping those whose token has expired; it reports
// whether some are still kept (false: resendLoop ends).
func (c *Cache) resend() bool {
	u := &c.unsent
	now := c.opts.Now()
	u.mu.Lock()
	maps.DeleteFunc(u.m, func(_ unsentPurge, until int64) bool { return until < now.UnixNano() })
	u.n.Store(int64(len(u.m)))
	running := len(u.m) > 0
	u.running = running
	if !running || now.Sub(u.tried) < resendEvery {
		u.mu.Unlock()
		return running
	}
	u.tried = now
	due := slices.Collect(maps.Keys(u.m))
	u.mu.Unlock()
	c.begin()
	defer c.end()
	sent := 0
	for _, p := range due {
		announced, until, _ := c.purge(context.Background(), p.key, p.fingerprint)
		c.keepUnsent(p, announced, until)
		if announced {
			sent++
		}
	}
	if sent > 0 {
		c.opts.Logger.Info("purges that Redis had not taken are announced to the fleet", zap.Int("purges", sent))
	}
	return true
}
