package redisstore

import (
	"context"
	"encoding/base64"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// TestDestructDuringMint: a reload that replaces the tier (its Redis
// settings changed) while a lookup mints under the key's fleet lock. The
// lookup still stores its token and releases the lock when its mint ends:
// the fleet adopts that token instead of waiting lock_ttl for a lock
// nobody holds, then minting again.
func TestDestructDuringMint(t *testing.T) {
	r := redistest.Start(t)
	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	open := func(timeout time.Duration) *Tier {
		t.Helper()
		p, err := Prepare(Settings{Address: []string{r.Addr()}, EncryptionKey: key, Timeout: timeout})
		if err != nil {
			t.Fatal(err)
		}
		tier, err := p.Open(zap.NewNop())
		if err != nil {
			t.Fatal(err)
		}
		return tier
	}
	old := open(time.Second)
	minting, destructed, done := make(chan struct{}), make(chan struct{}), make(chan struct{})
	go func() {
		defer close(done)
		_, _, err := old.Cache.Fetch(context.Background(), "k", func(broker.Token) bool { return true }, func(context.Context) (broker.Token, error) {
			close(minting)
			<-destructed // the token API answers after the reload replaced the tier
			return broker.Token{Value: "minted-before-the-reload", Expiry: time.Now().Add(time.Hour)}, nil
		})
		if err != nil {
			t.Error(err)
		}
	}()
	<-minting
	err := old.Destruct()
	close(destructed)
	if err != nil {
		t.Fatal(err)
	}
	<-done

	next := open(2 * time.Second)
	t.Cleanup(func() { _ = next.Destruct() })
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	tok, adopted, err := next.Cache.Fetch(ctx, "k", func(broker.Token) bool { return true }, func(context.Context) (broker.Token, error) {
		return broker.Token{Value: "minted-again", Expiry: time.Now().Add(time.Hour)}, nil
	})
	if err != nil || !adopted || tok.Value != "minted-before-the-reload" {
		t.Fatalf("after the reload: %q adopted=%v err=%v; want the token minted during it adopted", tok.Value.Reveal(), adopted, err)
	}
}
