package fleet

import (
	"context"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestAdoptedTokenOnTheAdoptersClock: a token's times (expiry, issue,
// planned refresh) are the minting node's clock's; a node whose clock is
// behind the minting one adopts the token with its times moved onto its
// own clock (Redis expires the token's key when the token expires), so
// that it does not serve the token after it has expired. A node whose
// clock is ahead keeps the times as they are: it refreshes the token
// early, never serves it late.
func TestAdoptedTokenOnTheAdoptersClock(t *testing.T) {
	const life = time.Hour
	for _, tt := range []struct {
		name  string
		skew  time.Duration // of the minting node's clock
		moved bool          // the times are moved onto the adopting node's clock
	}{
		{"minting clock ahead", 10 * time.Minute, true},
		{"minting clock behind", -10 * time.Minute, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := startRedis(t)
			keys := testKeys(t, 1)
			minting, adopting := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
			minting.clock.Add(tt.skew)
			mint := func(context.Context) (broker.Token, error) {
				now := minting.clock.Now()
				return broker.Token{Value: "skewed-token-abcdef", Type: "Bearer", Expiry: now.Add(life), IssuedAt: now,
					RefreshAt: now.Add(life * 3 / 4)}, nil
			}
			ctx := testCtx(t)
			if _, _, err := minting.Fetch(ctx, testKey, usable, mint); err != nil {
				t.Fatal(err)
			}
			now := adopting.clock.Now()
			valid := func(tok broker.Token) bool { return tok.ValidAt(now, time.Second) }
			got, adopted, err := adopting.Fetch(ctx, testKey, valid, mint)
			if err != nil || !adopted {
				t.Fatalf("adopting node: adopted=%v err=%v; want the token adopted", adopted, err)
			}
			// The adopting node's clock and Redis's run together here;
			// the calls take well under the margin.
			const margin = 5 * time.Second
			minted := now // the times on the adopting node's clock
			if !tt.moved {
				minted = now.Add(tt.skew) // as the minting node stated them
			}
			for _, c := range []struct {
				what      string
				got, want time.Time
			}{
				{"expiry", got.Expiry, minted.Add(life)},
				{"issued at", got.IssuedAt, minted},
				{"planned refresh", got.RefreshAt, minted.Add(life * 3 / 4)},
			} {
				if d := c.got.Sub(c.want); d > time.Second || d < -margin {
					t.Errorf("%s = %s on the adopting node's clock; want about %s (the minting clock is %s off, moved %v)", c.what, c.got, c.want, tt.skew, tt.moved)
				}
			}
		})
	}
}
