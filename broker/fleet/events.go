package fleet

import (
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"
)

// event is one announcement on the fleet's channel.
type event struct {
	// Node is the id of the announcing Cache.
	Node string `json:"n"`
	// Kind is "set" (a token was stored), "unlock" (a lock was released
	// without storing) or "purge".
	Kind string `json:"k"`
	// Subject names what changed: "tok:<name>" or "rt:<name>".
	Subject string `json:"s"`
	// Fingerprint is the purged token's, "" for any (purge only).
	Fingerprint string `json:"f,omitempty"`
	// Key is the purged cache key, sealed (purge only), so that nodes can
	// drop it from memory while Redis shows no merchant id.
	Key []byte `json:"key,omitempty"`
	// Floor is the oldest version of the key's token still accepted and
	// until when to remember it (two big-endian unix nanoseconds), sealed
	// (purge only, when the purging node had seen the token).
	Floor []byte `json:"fl,omitempty"`
}

// publish announces e to every node, this one included; a purge is
// written to the purge log first. A failed announcement of a lock's end
// is only counted: the others then wake at the lock's expiry.
func (c *Cache) publish(ctx context.Context, e event) error {
	e.Node = c.node
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	ctx = context.WithoutCancel(ctx)
	var logErr error
	if e.Kind == "purge" {
		logErr = c.do(ctx, "publish", func(ctx context.Context) error {
			return c.opts.Client.XAdd(ctx, &redis.XAddArgs{Stream: c.purgeLog(), MaxLen: purgeLogLen, Approx: true, Values: []any{"e", b}}).Err()
		})
	}
	return errors.Join(logErr, c.do(ctx, "publish", func(ctx context.Context) error {
		return c.opts.Client.Publish(ctx, c.channel, b).Err()
	}))
}

// listen handles the channel's messages until the subscription is closed.
// A subscription confirmed again (the connection was lost and go-redis
// subscribed anew) may have missed announcements: the purges are then
// read back from the purge log (catchUp).
func (c *Cache) listen(ch <-chan any) {
	defer close(c.done)
	for m := range ch {
		switch m := m.(type) {
		case *redis.Subscription:
			if m.Kind == "subscribe" {
				c.catchUp(true)
				c.redisAnswered()
			}
		case *redis.Message:
			var e event
			if err := json.Unmarshal([]byte(m.Payload), &e); err != nil {
				continue
			}
			c.notify(e.Subject)
			c.heard(e, true)
		}
	}
}

// heard handles another node's purge announcement: the floor of the key's
// versions is raised, then the OnPurge callbacks drop the token. count
// says whether it is counted as received.
func (c *Cache) heard(e event, count bool) {
	if e.Kind != "purge" || e.Node == c.node {
		return
	}
	if count {
		c.metrics.invalidations.Inc()
	}
	name, ok := strings.CutPrefix(e.Subject, "tok:")
	if !ok || name == "" {
		return
	}
	key, err := c.opts.Keys.Open(e.Key, purgeAD(name))
	if err != nil {
		c.metrics.undecryptable.Inc()
		c.opts.Logger.Warn("ignoring a purge announcement that does not open (another encryption key?)", zap.Error(err))
		return
	}
	if len(e.Floor) > 0 {
		if fl, err := c.opts.Keys.Open(e.Floor, floorAD(name)); err == nil && len(fl) == 16 {
			c.vers.raise(string(key), int64(binary.BigEndian.Uint64(fl)), int64(binary.BigEndian.Uint64(fl[8:])), c.opts.Now())
		}
	}
	// The floor is raised before the callbacks drop the token, so that a
	// lookup that misses memory afterwards does not adopt the token back
	// if it is written back to Redis.
	c.mu.Lock()
	hooks := slices.Clone(c.onPurge)
	c.mu.Unlock()
	for _, fn := range hooks {
		(*fn)(string(key), e.Fingerprint)
	}
}

// purgeLogLen is about how many purges the purge log keeps.
const purgeLogLen = 1000

// purgeLog is the Redis stream that keeps the last purge announcements,
// for the nodes whose subscription was down when they were made.
func (c *Cache) purgeLog() string { return c.opts.KeyPrefix + "purges" }

// catchUp applies the purges logged since the last catch-up (at New: the
// whole log, so that a new node refuses the recently purged tokens if they
// are written back; those are not counted as received). A purge heard
// twice is harmless: it drops the token it names, if still cached.
func (c *Cache) catchUp(count bool) {
	ctx, cancel := context.WithTimeout(context.Background(), max(c.opts.Timeout, time.Second))
	defer cancel()
	// Not through the breaker: the subscription was just confirmed, so
	// Redis answers, and the breaker may still be open from the outage.
	entries, err := c.opts.Client.XRange(ctx, c.purgeLog(), nextEntryID(c.logged), "+").Result()
	if err != nil {
		c.opts.Logger.Warn("reading the purge log after the announcement channel reconnected; purges announced meanwhile may be missed until the tokens expire",
			zap.Error(err))
		return
	}
	for _, m := range entries {
		c.logged = m.ID
		var e event
		if s, ok := m.Values["e"].(string); ok && json.Unmarshal([]byte(s), &e) == nil {
			c.heard(e, count)
		}
	}
}

// nextEntryID is the smallest stream entry ID after id ("<ms>-<seq>"),
// the start of an XRANGE that leaves id out in every Redis (the
// exclusive "(id" needs Redis 6.2). An ID it cannot read is returned as
// it is: the range then includes that entry again, which is harmless.
func nextEntryID(id string) string {
	msText, seqText, _ := strings.Cut(id, "-")
	ms, err1 := strconv.ParseUint(msText, 10, 64)
	seq, err2 := strconv.ParseUint(seqText, 10, 64)
	switch {
	case err1 != nil || err2 != nil:
		return id
	case seq < math.MaxUint64:
		return fmt.Sprintf("%d-%d", ms, seq+1)
	default:
		return fmt.Sprintf("%d-0", ms+1)
	}
}

// watch registers interest in announcements about subject: wake receives
// (at most one pending signal) on each. Call stop when done.
func (c *Cache) watch(subject string) (wake <-chan struct{}, stop func()) {
	ch := make(chan struct{}, 1)
	c.mu.Lock()
	set := c.waiters[subject]
	if set == nil {
		set = map[chan struct{}]struct{}{}
		c.waiters[subject] = set
	}
	set[ch] = struct{}{}
	c.mu.Unlock()
	return ch, func() {
		c.mu.Lock()
		delete(set, ch)
		if len(set) == 0 { // set is c.waiters[subject] while ch is in it
			delete(c.waiters, subject)
		}
		c.mu.Unlock()
	}
}

// notify wakes the watchers of subject.
func (c *Cache) notify(subject string) {
	c.mu.Lock()
	defer c.mu.Unlock()
	for ch := range c.waiters[subject] {
		select {
		case ch <- struct{}{}:
		default:
		}
	}
}
