package integration

import (
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
