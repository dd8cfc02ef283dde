package integration

import (
	"context"
	"net/http"
	"slices"
	"testing"
	"time"
)

// TestFleetPurgedTokenWrittenBack: someone with write access to Redis (and
// not the encryption key) copies a merchant's sealed token, and after an
// admin purge writes it back to its key. Neither the sidecar that purged
// nor the one that held the token serves it again (it used to come back
// with "origin": "shared"): each mints anew instead.
func TestFleetPurgedTokenWrittenBack(t *testing.T) {
	f := newFleetEnv(t, "1h")
	nodes := f.startFleet(2)
	var purged string
	for _, n := range nodes {
		purged = n.mustCall(t, "m00").Authorization.Fingerprint
	}
	rdb := f.redis.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	names, err := rdb.Keys(ctx, "token_broker:tok:*").Result()
	if err != nil || len(names) != 1 {
		t.Fatalf("token keys in redis: %q, %v; want the merchant's one", names, err)
	}
	copied, err := rdb.Get(ctx, names[0]).Bytes()
	if err != nil {
		t.Fatal(err)
	}
	resp, err := http.Post(nodes[0].admin+"/token_broker/merchants/m00/purge", "application/json", nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin purge: %v %v", err, resp)
	}
	resp.Body.Close()
	deadline := time.Now().Add(10 * time.Second)
	for len(nodes[1].tokens(t, "m00")) != 0 {
		if time.Now().After(deadline) {
			t.Fatal("node 1 did not drop the purged token")
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i, n := range nodes {
		if err := rdb.Set(ctx, names[0], copied, time.Hour).Err(); err != nil {
			t.Fatal(err)
		}
		before := f.sb.TokenRequests()
		if got := n.mustCall(t, "m00").Authorization.Fingerprint; got == purged {
			t.Fatalf("node %d served the purged token %s written back to redis", i, purged)
		}
		if got := f.sb.TokenRequests() - before; got != 1 {
			t.Errorf("node %d: %d token requests; want 1 (a new token)", i, got)
		}
		for _, tok := range n.tokens(t, "m00") {
			if tok["fingerprint"] == purged {
				t.Errorf("node %d lists the purged token (origin %v)", i, tok["origin"])
			}
		}
	}
}

// TestFleetSpentRefreshTokenWrittenBack: a merchant's bank rotates its
// refresh token at every use. Someone with write access to Redis copies
// the sealed refresh token, and after the next rotation writes the spent
// one back. The sidecar that rotated it never sends the spent token to the
// bank (which would answer invalid_grant, or revoke the whole grant): it
// refreshes with the newer one it holds and puts it back, so the other
// sidecar refreshes with it too.
func TestFleetSpentRefreshTokenWrittenBack(t *testing.T) {
	f, nodes, bank := startRotatingFleet(t)
	purge := func(n *fleetNode) {
		t.Helper()
		resp, err := http.Post(n.admin+"/token_broker/merchants/m00/purge", "application/json", nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("admin purge: %v %v", err, resp)
		}
		resp.Body.Close()
	}
	nodes[0].mustCall(t, "m00") // rt-initial -> rt-1
	rdb := f.redis.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	names, err := rdb.Keys(ctx, "token_broker:rt:*").Result()
	if err != nil || len(names) != 1 {
		t.Fatalf("refresh token keys in redis: %q, %v; want the merchant's one", names, err)
	}
	spent, err := rdb.Get(ctx, names[0]).Bytes() // rt-1, spent at the next refresh
	if err != nil {
		t.Fatal(err)
	}
	purge(nodes[0])
	nodes[1].mustCall(t, "m00") // rt-1 -> rt-2, on node 1
	if err := rdb.Set(ctx, names[0], spent, 0).Err(); err != nil {
		t.Fatal(err)
	}
	purge(nodes[1])
	nodes[1].mustCall(t, "m00") // with rt-2, not the spent rt-1
	purge(nodes[1])
	nodes[0].mustCall(t, "m00") // with rt-3, put back by node 1
	bank.mu.Lock()
	defer bank.mu.Unlock()
	if want := []string{"rt-initial", "rt-1", "rt-2", "rt-3"}; !slices.Equal(bank.used, want) {
		t.Errorf("refresh tokens sent to the bank: %q; want %q (each once, never the spent one)", bank.used, want)
	}
}
