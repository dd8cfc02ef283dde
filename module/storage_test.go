package module

import (
	"context"
	"fmt"
	"testing"

	"github.com/caddyserver/certmagic"
)

// TestStorageLocksAreBounded: the in-process locks of the refresh-token
// storage hold only the keys being refreshed; one key is locked by one
// caller at a time.
func TestStorageLocksAreBounded(t *testing.T) {
	st := storageStore{s: &certmagic.FileStorage{Path: t.TempDir()}}
	ctx := context.Background()
	for i := range 50 {
		unlock, err := st.Lock(ctx, fmt.Sprintf("bank/0123456789ab/m%d", i))
		if err != nil {
			t.Fatal(err)
		}
		unlock()
	}
	if n := localLocks.Len(); n != 0 {
		t.Fatalf("%d in-process locks left after every lock was released", n)
	}
}
