package fleet

import (
	"context"
	"errors"
	"fmt"

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
// Unlike tokens, a refresh token cannot be minted again, so when Redis is
// unavailable Load and Lock fail (the broker reports the fetch as failed)
// rather than risk two nodes spending one rotating refresh token.
type Store struct {
	c *Cache
}

// Store returns the refresh token store that shares this Cache's client,
// keys, breaker and announcements.
func (c *Cache) Store() *Store { return &Store{c: c} }

func rtAD(key string) []byte { return []byte("rt\x00" + key) }

// redisKey is where key's refresh token lives, named with nameKey.
func (s *Store) redisKey(nameKey []byte, key string) string {
	return s.c.opts.KeyPrefix + "rt:" + s.c.nameWith(nameKey, key)
}

// Load implements oauth.Store.
func (s *Store) Load(ctx context.Context, key string) (broker.Secret, error) {
	for i, nk := range s.c.nameKeys {
		if i > 0 && s.c.opts.PlainKeys {
			break
		}
		name := s.redisKey(nk, key)
		var b []byte
		err := s.c.do(ctx, "get", func(ctx context.Context) error {
			var err error
			b, err = s.c.rdb.Get(ctx, name).Bytes()
			return err
		})
		if errors.Is(err, redis.Nil) {
			continue
		}
		if err != nil {
			return "", fmt.Errorf("fleet: loading the refresh token of %s from redis: %w", key, err)
		}
		pt, err := s.c.keys.Open(b, rtAD(key))
		if err != nil {
			s.c.obs.Undecryptable()
			s.c.log.Warn("a refresh token in redis does not open", zap.String("redis_key", name), zap.Error(err))
			return "", fmt.Errorf("fleet: refresh token of %s (%s): %w", key, name, ErrRefreshTokenSealed)
		}
		return broker.Secret(pt), nil
	}
	return "", fmt.Errorf("fleet: %w under %s", oauth.ErrNoRefreshToken, key)
}

// Save implements oauth.Store: the refresh token is sealed and stored
// without expiry; a copy under an old key's name is then deleted.
func (s *Store) Save(ctx context.Context, key string, rt broker.Secret) error {
	sealed, err := s.c.keys.Seal([]byte(rt.Reveal()), rtAD(key))
	if err != nil {
		return err
	}
	name := s.redisKey(s.c.nameKeys[0], key)
	ctx = context.WithoutCancel(ctx)
	if err := s.c.do(ctx, "set", func(ctx context.Context) error {
		return s.c.rdb.Set(ctx, name, sealed, 0).Err()
	}); err != nil {
		return fmt.Errorf("fleet: saving the refresh token of %s to redis: %w", key, err)
	}
	if !s.c.opts.PlainKeys {
		for _, nk := range s.c.nameKeys[1:] {
			old := s.redisKey(nk, key)
			_ = s.c.do(ctx, "del", func(ctx context.Context) error { return s.c.rdb.Del(ctx, old).Err() })
		}
	}
	return nil
}

// Lock implements oauth.Store with the fleet lock of key: it waits (woken
// by the holder's announcement, or at the lock's expiry if the holder
// died) until this node holds it, or ctx is done.
func (s *Store) Lock(ctx context.Context, key string) (func(), error) {
	c := s.c
	subject := "rt:" + c.name(key)
	wake, stop := c.watch(subject)
	defer stop()
	for {
		h, err := c.obtain(ctx, subject)
		if err == nil {
			return func() {
				h.release()
				_ = c.publish(context.Background(), event{Kind: "unlock", Subject: subject})
			}, nil
		}
		if !errors.Is(err, errNotObtained) {
			return nil, fmt.Errorf("fleet: locking the refresh token of %s: %w", key, err)
		}
		if err := c.waitLock(ctx, subject, wake); err != nil {
			return nil, fmt.Errorf("fleet: waiting for the refresh token lock of %s: %w", key, err)
		}
	}
}

var _ oauth.Store = (*Store)(nil)
