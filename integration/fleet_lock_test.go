package integration

import (
	"context"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// TestFleetLockWithoutExpiry: a merchant's fleet lock left in Redis
// without expiry (set by hand, a bug, a failover that lost it) does not
// stall the merchant: with fetch_timeout and lock_ttl of 4 s, the next
// cold request is answered with a token, after one token request, where it
// used to wait the 4 s and fail with 504 token_timeout (and so did every
// request after it).
func TestFleetLockWithoutExpiry(t *testing.T) {
	f := newFleetEnv(t, "1h")
	src := readFile(t, filepath.Join(repoRoot(t), "examples", "fleet-redis", "Caddyfile"))
	for _, r := range [][2]string{
		{"\ttoken_broker {\n", "\ttoken_broker {\n\t\tfetch_timeout 4s\n"},
		{"\t\t\ttimeout {$REDIS_TIMEOUT:50ms}\n", "\t\t\ttimeout {$REDIS_TIMEOUT:50ms}\n\t\t\tlock_ttl 4s\n"},
	} {
		if !strings.Contains(src, r[0]) {
			t.Fatalf("examples/fleet-redis/Caddyfile has no %q to set the test's timeouts after", r[0])
		}
		src = strings.Replace(src, r[0], r[1], 1)
	}
	f.caddyfile = filepath.Join(t.TempDir(), "Caddyfile")
	if err := os.WriteFile(f.caddyfile, []byte(src), 0o600); err != nil {
		t.Fatal(err)
	}
	n := f.startNode()
	n.mustCall(t, "m00")
	rdb := f.redis.Client()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	names, err := rdb.Keys(ctx, "token_broker:tok:*").Result()
	if err != nil || len(names) != 1 {
		t.Fatalf("token keys in redis: %q, %v; want the merchant's one", names, err)
	}
	lock := "token_broker:lock:" + strings.TrimPrefix(names[0], "token_broker:")
	resp, err := http.Post(n.admin+"/token_broker/merchants/m00/purge", "application/json", nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin purge: %v %v", err, resp)
	}
	resp.Body.Close()
	if err := rdb.Set(ctx, lock, "left-without-expiry", 0).Err(); err != nil {
		t.Fatal(err)
	}
	before := f.sb.TokenRequests()
	for i := range 2 {
		status, e, err := n.call("m00")
		if err != nil || status != http.StatusOK || !e.Authorization.Valid {
			t.Fatalf("request %d with a lock without expiry: %d %v; want a token", i, status, err)
		}
	}
	if got := f.sb.TokenRequests() - before; got != 1 {
		t.Errorf("token requests = %d; want 1", got)
	}
}
