package fleet

import (
	"cmp"
	"context"
	"errors"
	"maps"
	"math"
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

// unsentPurge names a purge: the key, and the fingerprint of the token
// purged (for a purge of any token, "", the one this node had seen newest
// for the key).
type unsentPurge struct{ key, fingerprint string }

// unsentFloor is what a purge announces besides its name, set once when
// it is made (Cache.purged) and announced the same when it is sent again:
// the floor (0: none) and until when the purged token lives (unix ns; 0:
// not seen, then how long it is kept).
type unsentFloor struct {
	floor, until int64
	newest       string // the fingerprint of the newest token of the key seen, "" none
	set          bool
}

// unsentPurges are the purges a node keeps to send again.
type unsentPurges struct {
	mu    sync.Mutex
	m     map[unsentPurge]unsentFloor
	tried time.Time // the last try (Options.Now)
	// running is set under mu while resendLoop runs (or ran until the
	// Cache closed); read without mu.
	running atomic.Bool
	wake    chan struct{} // (1 buffered) Redis answered: try now
}

// Purge implements broker.SharedCache: a compare-and-delete by
// fingerprint, then an announcement to every node. No version up to the
// purged token's is accepted afterwards, on this node (even when Redis
// failed) and on those that hear the announcement (version.go). A delete
// that Redis refuses as a write (writeRefusal: a read-only replica, an
// ACL) is still announced: Redis takes the announcement, and the nodes
// that hear it drop the token and refuse it when they read it back. A
// purge whose announcement Redis did not take is sent again once Redis
// answers (unsentPurges), with the floor of its first try; a purge of any
// token ("") as the purge of the token this node had seen newest, and not
// at all when it had seen none: what Redis stores by then may be newer.
func (c *Cache) Purge(ctx context.Context, key, fingerprint string) error {
	var f unsentFloor
	announced, err := c.purge(ctx, unsentPurge{key, fingerprint}, &f)
	c.keepUnsent(unsentPurge{key, cmp.Or(fingerprint, f.newest)}, f, announced, err)
	return err
}

// purged has this node refuse the token of p from now on (versions.purge),
// and sets f, unless it is set already (a purge sent again).
func (c *Cache) purged(p unsentPurge, f *unsentFloor) {
	if !f.set {
		f.floor, f.until, f.newest, _ = c.vers.purge(p.key, p.fingerprint, c.opts.Now())
		f.set = true
	}
}

// keepUnsent keeps p, tried at Options.Now with the outcome announced and
// err, to be sent again until f.until (0: unsentTTL from now), unless it
// was announced, or names no token, or failed in a way a try again would
// too (errSeal).
func (c *Cache) keepUnsent(p unsentPurge, f unsentFloor, announced bool, err error) {
	u := &c.unsent
	u.mu.Lock()
	defer u.mu.Unlock()
	switch {
	case announced || p.fingerprint == "":
		delete(u.m, p)
		return
	case errors.Is(err, errSeal):
		delete(u.m, p)
		c.opts.Logger.Warn("a purge whose announcement does not seal is not sent again", zap.Error(err))
		return
	}
	now := c.opts.Now()
	u.tried = now
	if f.until == 0 {
		f.until = now.Add(unsentTTL).UnixNano()
	}
	if _, kept := u.m[p]; !kept && len(u.m) >= maxUnsent {
		var first unsentPurge
		firstUntil := int64(math.MaxInt64)
		for q, g := range u.m {
			if g.until < firstUntil {
				first, firstUntil = q, g.until
			}
		}
		delete(u.m, first)
		c.opts.Logger.Warn("a purge that Redis has not taken is dropped: too many wait to be sent again", zap.Int("kept", maxUnsent))
	}
	u.m[p] = f
	if !u.running.Swap(true) {
		go c.resendLoop()
	}
}

// redisAnswered wakes resendLoop, if it runs.
func (c *Cache) redisAnswered() {
	if c.unsent.running.Load() {
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
// whether some are still kept and the Cache is open (false: resendLoop
// ends).
func (c *Cache) resend() bool {
	u := &c.unsent
	now := c.opts.Now()
	u.mu.Lock()
	maps.DeleteFunc(u.m, func(_ unsentPurge, f unsentFloor) bool { return f.until < now.UnixNano() })
	running := len(u.m) > 0
	u.running.Store(running)
	if !running || now.Sub(u.tried) < resendEvery {
		u.mu.Unlock()
		return running
	}
	u.tried = now
	due := maps.Clone(u.m)
	u.mu.Unlock()
	c.begin()
	defer c.end()
	sent := 0
	for p, f := range due {
		select {
		case <-c.done:
			return false
		default:
		}
		announced, err := c.purge(context.Background(), p, &f)
		c.keepUnsent(p, f, announced, err)
		if announced {
			sent++
		}
	}
	if sent > 0 {
		c.opts.Logger.Info("purges that Redis had not taken are announced to the fleet", zap.Int("purges", sent))
	}
	return true
}
