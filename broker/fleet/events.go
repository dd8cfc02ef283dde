package fleet

import (
	"context"
	"encoding/binary"
	"encoding/json"

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

// publish announces e to every node, this one included. A failure is only
// counted: the others then wake at the lock's expiry.
func (c *Cache) publish(ctx context.Context, e event) error {
	e.Node = c.node
	b, err := json.Marshal(e)
	if err != nil {
		return err
	}
	return c.do(context.WithoutCancel(ctx), "publish", func(ctx context.Context) error {
		return c.rdb.Publish(ctx, c.channel, b).Err()
	})
}

// listen handles the channel's messages until the subscription is closed.
func (c *Cache) listen(ch <-chan *redis.Message) {
	defer close(c.done)
	for m := range ch {
		var e event
		if err := json.Unmarshal([]byte(m.Payload), &e); err != nil {
			continue
		}
		c.notify(e.Subject)
		if e.Kind != "purge" || e.Node == c.node {
			continue
		}
		c.obs.InvalidationReceived()
		const prefix = "tok:"
		if len(e.Subject) <= len(prefix) || e.Subject[:len(prefix)] != prefix {
			continue
		}
		key, err := c.keys.Open(e.Key, purgeAD(e.Subject[len(prefix):]))
		if err != nil {
			c.obs.Undecryptable()
			c.log.Warn("ignoring a purge announcement that does not open (another encryption key?)", zap.Error(err))
			continue
		}
		name := e.Subject[len(prefix):]
		if len(e.Floor) > 0 {
			if fl, err := c.keys.Open(e.Floor, floorAD(name)); err == nil && len(fl) == 16 {
				c.vers.raise(string(key), int64(binary.BigEndian.Uint64(fl)), int64(binary.BigEndian.Uint64(fl[8:])), c.opts.Now())
			}
		}
		// The floor is raised before the callbacks drop the token, so
		// that a lookup that misses memory afterwards does not adopt the
		// token back if it is written back to Redis.
		c.mu.Lock()
		fns := append([]func(string, string){}, c.onPurge...)
		c.mu.Unlock()
		for _, fn := range fns {
			fn(string(key), e.Fingerprint)
		}
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
		if len(set) == 0 && c.waiters[subject] != nil && len(c.waiters[subject]) == 0 {
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
