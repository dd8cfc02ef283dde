package kvstore

import (
	"context"
	"fmt"
	"testing"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/internal/keylock"
)

// TestStorageLocksAreBounded: the in-process locks of the refresh-token
// storage hold only the keys being refreshed; one key is locked by one
// caller at a time.
func TestStorageLocksAreBounded(t *testing.T) {
	var locks keylock.Map
	st := Refresh{S: &certmagic.FileStorage{Path: t.TempDir()}, Locks: &locks}
	ctx := context.Background()
	for i := range 50 {
		unlock, err := st.Lock(ctx, fmt.Sprintf("bank/0123456789ab/m%d", i))
		if err != nil {
			t.Fatal(err)
		}
		unlock()
	}
	if n := locks.Len(); n != 0 {
		t.Fatalf("%d in-process locks left after every lock was released", n)
	}
}
