// Package keylock is a set of mutexes by key that holds only the keys in
// use: an entry is removed when it is unlocked with no one waiting, so a
// long-running process that locks ever new keys (merchants, provider
// configurations) does not grow.
package keylock

import (
	"context"
	"sync"
)

// Map locks by key. The zero value is ready to use; it must not be copied.
type Map struct {
	mu    sync.Mutex
	locks map[string]*entry
}

type entry struct {
	ch    chan struct{} // holds one value while locked
	users int           // holders and waiters
}

// Lock waits until key is locked by the caller or ctx is done. unlock
// releases the lock; calling it more than once is harmless.
func (m *Map) Lock(ctx context.Context, key string) (unlock func(), err error) {
	m.mu.Lock()
	if m.locks == nil {
		m.locks = map[string]*entry{}
	}
	e := m.locks[key]
	if e == nil {
		e = &entry{ch: make(chan struct{}, 1)}
		m.locks[key] = e
	}
	e.users++
	m.mu.Unlock()
	select {
	case e.ch <- struct{}{}:
	case <-ctx.Done():
		m.release(key, e)
		return nil, ctx.Err()
	}
	return sync.OnceFunc(func() {
		<-e.ch
		m.release(key, e)
	}), nil
}

// release drops one user of e, and e itself when it was the last.
func (m *Map) release(key string, e *entry) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if e.users--; e.users == 0 {
		delete(m.locks, key)
	}
}
