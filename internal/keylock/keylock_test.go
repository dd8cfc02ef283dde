package keylock

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// TestMapHoldsOnlyKeysInUse: after many keys were locked, waited on,
// cancelled and unlocked, nothing is left; meanwhile one key is held by
// one caller at a time.
func TestMapHoldsOnlyKeysInUse(t *testing.T) {
	var m Map
	var wg sync.WaitGroup
	var inside [4]atomic.Int32
	for i := range 200 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			k := i % 4
			unlock, err := m.Lock(context.Background(), fmt.Sprint("k", k))
			if err != nil {
				t.Error(err)
				return
			}
			if n := inside[k].Add(1); n != 1 {
				t.Errorf("%d holders of key %d", n, k)
			}
			inside[k].Add(-1)
			unlock()
			unlock()
		}()
	}
	wg.Wait()
	for i := range 1000 {
		unlock, _ := m.Lock(context.Background(), fmt.Sprint("merchant-", i))
		unlock()
	}
	// A waiter that gives up leaves nothing behind either.
	unlock, _ := m.Lock(context.Background(), "held")
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Millisecond)
	defer cancel()
	if _, err := m.Lock(ctx, "held"); err == nil {
		t.Fatal("a second Lock of a held key succeeded")
	}
	unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if n := len(m.locks); n != 0 {
		t.Fatalf("%d keys left after every lock was released", n)
	}
}
