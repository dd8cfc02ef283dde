package integration

import (
	"context"
	"net/http"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestFleetPurgeUnderLoad: three sidecars serve one merchant under steady
// load while the merchant's token is purged over and over through the
// admin API of each node in turn, each purge right after the node got the
// fleet's new token, when the other nodes are adopting it. After every
// purge, no node holds the purged token 1 s later (measured from the
// purge's start to the admin list's request) and no request fails. Before,
// a node adopting the token when the purge was announced cached it after
// the announcement and served it until it expired.
func TestFleetPurgeUnderLoad(t *testing.T) {
	f := newFleetEnv(t, "1h")
	nodes := f.startFleet(3)
	for _, n := range nodes {
		n.mustCall(t, "m00")
	}
	var (
		stop     = make(chan struct{})
		wg       sync.WaitGroup
		calls    atomic.Int64
		failures atomic.Int64
	)
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				calls.Add(1)
				if status, e, err := nodes[(w+i)%3].call("m00"); err != nil || status != http.StatusOK || !e.Authorization.Valid {
					failures.Add(1)
					t.Errorf("under load: %d %v", status, err)
				}
			}
		}()
	}
	defer func() {
		close(stop)
		wg.Wait()
	}()
	const rounds = 15
	for round := range rounds {
		purger := nodes[round%3]
		fp := purger.mustCall(t, "m00").Authorization.Fingerprint
		start := time.Now()
		resp, err := http.Post(purger.admin+"/token_broker/merchants/m00/purge", "application/json", nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("round %d: admin purge: %v %v", round, err, resp)
		}
		resp.Body.Close()
		for i, n := range nodes {
			for d := 5 * time.Millisecond; ; d = min(2*d, 100*time.Millisecond) {
				asked := time.Now()
				held := false
				for _, tok := range n.tokens(t, "m00") {
					held = held || tok["fingerprint"] == fp
				}
				if !held {
					break
				}
				if asked.Sub(start) > time.Second {
					t.Fatalf("round %d: node %d still holds the token %s purged on node %d more than 1 s before", round, i, fp, round%3)
				}
				time.Sleep(d)
			}
		}
	}
	if failures.Load() != 0 {
		t.Fatalf("%d of %d requests failed", failures.Load(), calls.Load())
	}
	t.Logf("%d purges, %d requests, %d token requests", rounds, calls.Load(), f.sb.TokenRequests())
}

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
