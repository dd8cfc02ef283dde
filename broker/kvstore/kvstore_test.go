package kvstore

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
)

// TestStorageLocksAreBounded: the unlock of the refresh-token storage
// releases its in-process lock too (keylock.Map then holds only the keys
// being refreshed).
func TestStorageLocksAreBounded(t *testing.T) {
	var locks keylock.Map
	st := Refresh{S: &certmagic.FileStorage{Path: t.TempDir()}, Locks: &locks}
	ctx := context.Background()
	for i := range 50 {
		key := fmt.Sprintf("bank/0123456789ab/m%d", i)
		unlock, err := st.Lock(ctx, key)
		if err != nil {
			t.Fatal(err)
		}
		unlock()
		// Free at once after the unlock; the bound only ends a failing test.
		lockCtx, cancel := context.WithTimeout(ctx, 10*time.Second)
		unlockLocal, err := locks.Lock(lockCtx, key)
		cancel()
		if err != nil {
			t.Fatalf("the in-process lock of %s was kept after the unlock: %v", key, err)
		}
		unlockLocal()
	}
}
