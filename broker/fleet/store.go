package fleet

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"slices"
	"sync"

	"github.com/bsm/redislock"
	"github.com/redis/go-redis/v9"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// ErrRefreshTokenSealed is returned (wrapped) by Store.Load when the stored
// refresh token does not open with the configured encryption keys.
var ErrRefreshTokenSealed = errors.New("the stored refresh token does not open with the configured encryption keys (was the key changed without listing the old one in encryption_keys_old?)")

// Store keeps merchants' refresh tokens in Redis, sealed, and serialises
// the refreshes of one merchant across the fleet with a fleet lock. It
// implements oauth.Store; get it from Cache.Store.
//
// A refresh token cannot be minted again, so when Redis is unavailable
// Load and Lock fail rather than risk two nodes spending one rotating
// refresh token.
//
// Each saved refresh token carries a version (version.go), and the node
// keeps the newest sealed value it has loaded or saved per key (one per
// merchant with a refresh token). A value in Redis older than that one (a
// spent refresh token written back, or a failover that lost the newest
// write) is never handed out: Load returns the newer one and writes it
// back.
type Store struct {
	c *Cache
}

// rtVersions is the newest refresh token a node has seen per key.
type rtVersions struct {
	mu sync.Mutex
	m  map[string]rtSeen
}

// rtSeen is a key's newest refresh token: its version and its sealed value.
type rtSeen struct {
	ver    int64
	sealed []byte
}

// rtMarker starts a versioned refresh token's sealed plaintext, before its
// version (8 bytes, big-endian) and the token; a value without it (a
// refresh token has no control character) is a bare token of version 0.
const rtMarker = 0x01

// rtOpen opens a sealed refresh token of key: the token and its version.
func (s *Store) rtOpen(key string, sealed []byte) (broker.Secret, int64, error) {
	pt, err := s.c.opts.Keys.Open(sealed, rtAD(key))
	if err != nil {
		return "", 0, err
	}
	if len(pt) > 9 && pt[0] == rtMarker {
		return broker.Secret(pt[9:]), int64(binary.BigEndian.Uint64(pt[1:9])), nil
	}
	return broker.Secret(pt), 0, nil
}

// newer records sealed (version ver) as key's newest refresh token if it
// is not older than the one recorded, and returns the newest.
func (r *rtVersions) newer(key string, ver int64, sealed []byte) rtSeen {
	r.mu.Lock()
	defer r.mu.Unlock()
	cur, ok := r.m[key]
	if ok && ver < cur.ver {
		return cur
	}
	cur = rtSeen{ver: ver, sealed: sealed}
	r.m[key] = cur
	return cur
}

func (r *rtVersions) get(key string) rtSeen {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.m[key]
}

// Store returns the refresh token store that shares this Cache's client,
// keys, breaker and announcements.
func (c *Cache) Store() *Store { return &Store{c: c} }

func rtAD(key string) []byte { return []byte("rt\x00" + key) }

// redisKey is where key's refresh token lives, named with nameKey.
func (s *Store) redisKey(nameKey []byte, key string) string {
	return s.c.opts.KeyPrefix + "rt:" + s.c.nameWith(nameKey, key)
}

// Load implements oauth.Store. The refresh token may be stored under the
// name of each of this node's keys (during a key rotation a node on the
// old key saves under its name, one on the new key under its own, and a
// Save's delete of the other copy may fail): every name is read and the
// newest version is used, so that an older copy left under another name
// is never spent. A value that does not open fails the Load: it may be
// the newest.
func (s *Store) Load(ctx context.Context, key string) (broker.Secret, error) {
	rt, _, err := s.load(ctx, key)
	return rt, err
}

// LoadLocked implements oauth.LockedLoader: Load, called with Lock held
// for key. A refresh token found under an old key's name, or sealed with
// an old key, is then saved again (Save): sealed with the current key
// under its name, the copies under the old names deleted, so that it
// still opens once the old key is dropped, even if the provider never
// rotates it (oauth.Resave): when that fails, the refresh token is still
// returned, and the next LoadLocked tries again.
func (s *Store) LoadLocked(ctx context.Context, key string) (broker.Secret, error) {
	rt, current, err := s.load(ctx, key)
	if err != nil || current {
		return rt, err
	}
	oauth.Resave(ctx, s, key, rt)
	return rt, nil
}

// load is Load; current reports whether the refresh token is stored under
// the current key's name, sealed with the current key.
func (s *Store) load(ctx context.Context, key string) (rt broker.Secret, current bool, err error) {
	var (
		found bool
		name  string // where the newest value is
		b     []byte // the newest value, sealed
		ver   int64
	)
	for _, nk := range s.c.nameKeys {
		n := s.redisKey(nk, key)
		v, err := s.c.get(ctx, n)
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			return "", false, fmt.Errorf("fleet: loading the refresh token of %s from redis: %w", key, err)
		}
		t, tv, err := s.rtOpen(key, v)
		if err != nil {
			s.c.metrics.undecryptable.Inc()
			s.c.opts.Logger.Warn("a refresh token in redis does not open", zap.String("redis_key", n), zap.Error(err))
			return "", false, fmt.Errorf("fleet: refresh token of %s (%s): %w", key, n, ErrRefreshTokenSealed)
		}
		if !found || tv > ver {
			found, name, b, rt, ver = true, n, v, t, tv
		}
	}
	if !found {
		return "", false, fmt.Errorf("fleet: %w under %s", oauth.ErrNoRefreshToken, key)
	}
	if newest := s.c.rts.newer(key, ver, b); newest.ver > ver {
		// An older value than this node has seen: never spend it;
		// use the newer one and put it back.
		s.c.rolledBack(name)
		var err error
		if rt, _, err = s.rtOpen(key, newest.sealed); err != nil {
			return "", false, fmt.Errorf("fleet: refresh token of %s: %w", key, ErrRefreshTokenSealed)
		}
		// Put back unless it changed meanwhile (a Save elsewhere).
		_ = s.c.do(context.WithoutCancel(ctx), "set", func(ctx context.Context) error {
			return restoreScript.Run(ctx, s.c.opts.Client, []string{name}, b, newest.sealed).Err()
		})
		b = newest.sealed
	}
	return rt, name == s.redisKey(s.c.nameKeys[0], key) && s.c.opts.Keys.IsCurrent(b), nil
}

// Save implements oauth.Store: the refresh token is sealed and stored
// without expiry, as a version above the stored one and any this node has
// seen; a copy under an old key's name is then deleted.
func (s *Store) Save(ctx context.Context, key string, rt broker.Secret) error {
	name := s.redisKey(s.c.nameKeys[0], key)
	ctx = context.WithoutCancel(ctx)
	ver := max(s.c.opts.Now().UnixNano(), s.c.rts.get(key).ver+1)
	stored, err := s.c.get(ctx, name)
	if err != nil && !errors.Is(err, redis.Nil) {
		return fmt.Errorf("fleet: saving the refresh token of %s to redis: %w", key, err)
	}
	if len(stored) > 0 {
		if _, v, err := s.rtOpen(key, stored); err == nil {
			ver = max(ver, v+1)
		}
	}
	pt := append(binary.BigEndian.AppendUint64([]byte{rtMarker}, uint64(ver)), rt.Reveal()...)
	sealed, err := s.c.opts.Keys.Seal(pt, rtAD(key))
	if err != nil {
		return err
	}
	if err := s.c.do(ctx, "set", func(ctx context.Context) error {
		return s.c.opts.Client.Set(ctx, name, sealed, 0).Err()
	}); err != nil {
		return fmt.Errorf("fleet: saving the refresh token of %s to redis: %w", key, err)
	}
	s.c.rts.newer(key, ver, sealed)
	for _, nk := range s.c.nameKeys[1:] {
		old := s.redisKey(nk, key)
		_ = s.c.do(ctx, "del", func(ctx context.Context) error { return s.c.opts.Client.Del(ctx, old).Err() })
	}
	return nil
}

// Lock implements oauth.Store with the fleet locks of key: one under the
// name each of this node's keys gives it (lockSubjects), taken in order,
// so that during a rolling key rotation nodes one step apart (README,
// "Rotating the encryption key") share a lock. It waits for each lock
// (woken by the holder's announcement, or at the lock's expiry) until
// this node holds them all, or ctx is done.
func (s *Store) Lock(ctx context.Context, key string) (func(), error) {
	var unlocks []func()
	unlockAll := func() {
		for i := len(unlocks) - 1; i >= 0; i-- {
			unlocks[i]()
		}
	}
	for _, subject := range s.lockSubjects(key) {
		unlock, err := s.lock(ctx, key, subject)
		if err != nil {
			unlockAll()
			return nil, err
		}
		unlocks = append(unlocks, unlock)
	}
	return sync.OnceFunc(unlockAll), nil
}

// lockSubjects returns the subjects of key's refresh-token locks, one per
// name key (one with plain names), sorted: every node takes the locks it
// shares with another in the same order, so two nodes never wait for each
// other.
func (s *Store) lockSubjects(key string) []string {
	subjects := make([]string, 0, len(s.c.nameKeys))
	for _, nk := range s.c.nameKeys {
		subjects = append(subjects, "rt:"+s.c.nameWith(nk, key))
	}
	slices.Sort(subjects)
	return slices.Compact(subjects)
}

// lock takes one fleet lock of key's refresh token, waiting for it.
func (s *Store) lock(ctx context.Context, key, subject string) (func(), error) {
	c := s.c
	wake, stop := c.watch(subject)
	defer stop()
	for {
		c.begin()
		h, err := c.obtain(ctx, subject)
		if err == nil {
			return func() {
				defer c.end()
				h.release()
				_ = c.publish(context.Background(), event{Kind: "unlock", Subject: subject})
			}, nil
		}
		c.end()
		if errors.Is(err, redislock.ErrNotObtained) {
			err = c.waitLock(ctx, subject, wake)
		} else if ctx.Err() == nil {
			return nil, fmt.Errorf("fleet: locking the refresh token of %s: %w", key, err)
		}
		if err != nil {
			if ctxErr := ctx.Err(); ctxErr != nil {
				// A Redis call cut by ctx's end fails with a network
				// error (i/o timeout): the wait ended with ctx.
				err = ctxErr
			}
			return nil, fmt.Errorf("fleet: waiting for the refresh token lock of %s: %w", key, err)
		}
	}
}

// restoreScript sets KEYS[1] to ARGV[2] if it still stores ARGV[1].
var restoreScript = redis.NewScript(`
if redis.call("GET", KEYS[1]) == ARGV[1] then
	return redis.call("SET", KEYS[1], ARGV[2])
end
return false
`)

var (
	_ oauth.Store        = (*Store)(nil)
	_ oauth.LockedLoader = (*Store)(nil)
)
