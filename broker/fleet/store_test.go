package fleet

import (
	"context"
	"fmt"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// A stored token keeps every field, the minting node's planned refresh
// included; a value stored without one (by an older broker) opens with
// none.
func TestTokenEncodingRoundTrip(t *testing.T) {
	c := &Cache{opts: Options{Keys: testKeys(t, 1), Logger: zap.NewNop()}, metrics: newMetrics()}
	issued := time.Date(2030, 1, 1, 10, 0, 0, 123, time.UTC)
	full := broker.Token{Value: "secret-token-abcdef", Type: "Bearer", Expiry: issued.Add(time.Hour), ID: "t-1",
		Scopes: []string{"payments", "accounts"}, IssuedAt: issued, RefreshAt: issued.Add(50*time.Minute + 7*time.Second)}
	bare := broker.Token{Value: "secret-token-abcdef", Expiry: issued.Add(time.Hour)}
	for _, tok := range []broker.Token{full, bare} {
		b, err := c.encode(testKey, tok, 42)
		if err != nil {
			t.Fatal(err)
		}
		got, ver, ok := c.decode(testKey, b)
		if !ok || ver != 42 || got.Value != tok.Value || got.Type != tok.Type || !got.Expiry.Equal(tok.Expiry) || got.ID != tok.ID ||
			fmt.Sprint(got.Scopes) != fmt.Sprint(tok.Scopes) || !got.IssuedAt.Equal(tok.IssuedAt) || !got.RefreshAt.Equal(tok.RefreshAt) {
			t.Fatalf("decode(encode(%+v)) = %+v, version %d, ok %v", tok, got, ver, ok)
		}
	}

	// What a broker without planned refreshes stored.
	old := fmt.Sprintf(`{"v":"secret-token-abcdef","t":"Bearer","e":%d,"i":%d,"w":7}`, full.Expiry.UnixNano(), issued.UnixNano())
	fp := full.Fingerprint()
	sealed, err := c.opts.Keys.Seal([]byte(old), tokenAD(testKey, fp))
	if err != nil {
		t.Fatal(err)
	}
	got, ver, ok := c.decode(testKey, append([]byte(fp), sealed...))
	if !ok || ver != 7 || got.Value != full.Value || !got.Expiry.Equal(full.Expiry) || !got.IssuedAt.Equal(issued) || !got.RefreshAt.IsZero() {
		t.Fatalf("an old value decodes as %+v, version %d, ok %v; want the token without a planned refresh", got, ver, ok)
	}
}

// A node adopting a token from Redis keeps the refresh the minting node
// planned.
func TestAdoptedTokenKeepsItsPlan(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	ctx := testCtx(t)
	plan := time.Now().Add(47 * time.Minute).Truncate(time.Second)
	mint := func(ctx2 context.Context) (broker.Token, error) {
		var m minter
		tok, err := m.mint(ctx2)
		tok.RefreshAt = plan
		return tok, err
	}
	minted, adopted, err := a.Fetch(ctx, testKey, usable, mint)
	if err != nil || adopted {
		t.Fatalf("mint: adopted %v, err %v", adopted, err)
	}
	got, adopted, err := b.Fetch(ctx, testKey, usable, mint)
	if err != nil || !adopted || got.Value != minted.Value || !got.RefreshAt.Equal(plan) {
		t.Fatalf("adopted %v, err %v, refresh at %s; want the minted token with its plan %s", adopted, err, got.RefreshAt, plan)
	}
}
