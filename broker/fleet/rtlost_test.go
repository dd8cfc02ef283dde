package fleet

import (
	"errors"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// TestRefreshTokenLostByRedisIsPutBack: Redis restarted without its data
// (no persistence, or a failover that lost the writes) no longer holds a
// merchant's refresh token; a node that has loaded or saved it still has
// it, sealed: its Load returns it and puts it back, so that a node that
// has seen none loads it too, rather than the merchant being asked for
// consent again.
func TestRefreshTokenLostByRedisIsPutBack(t *testing.T) {
	for _, tt := range []struct {
		name string
		seen func(a, b *node) error // how node a comes to know the refresh token
	}{
		{"saved", func(a, b *node) error { return a.Store().Save(testCtx(t), "bank/m1", "rt-1") }},
		{"loaded", func(a, b *node) error {
			if err := b.Store().Save(testCtx(t), "bank/m1", "rt-1"); err != nil {
				return err
			}
			_, err := a.Store().Load(testCtx(t), "bank/m1")
			return err
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := startRedis(t)
			keys := testKeys(t, 1)
			a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
			if err := tt.seen(a, b); err != nil {
				t.Fatal(err)
			}
			r.Kill()
			r.Restart()
			ctx := testCtx(t)
			// The pool's connections to the old server fail once: load
			// until Redis answers.
			var err error
			for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
				var rt broker.Secret
				rt, err = a.Store().Load(ctx, "bank/m1")
				if err == nil {
					if rt.Reveal() != "rt-1" {
						t.Fatalf("Load after Redis lost the refresh token = %q; want rt-1", rt.Reveal())
					}
					break
				}
				if errors.Is(err, oauth.ErrNoRefreshToken) {
					t.Fatalf("Load after Redis lost the refresh token: %v; want the one this node has seen", err)
				}
			}
			if err != nil {
				t.Fatalf("Load after the restart: %v", err)
			}
			fresh := newNode(t, r, keys, nil)
			if rt, err := fresh.Store().Load(ctx, "bank/m1"); err != nil || rt.Reveal() != "rt-1" {
				t.Fatalf("a node that has seen none loads %q, %v; want rt-1 put back", rt.Reveal(), err)
			}
		})
	}
}
