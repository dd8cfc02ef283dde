package fleet

import (
	"sync"
	"time"
)

// breaker stops calls to Redis for a cooldown after threshold consecutive
// failures; after the cooldown calls go through again, and the first
// failures count anew. Its clock is injectable.
type breaker struct {
	threshold int
	cooldown  time.Duration
	now       func() time.Time
	onChange  func(open bool)

	mu        sync.Mutex
	fails     int
	openUntil time.Time
	open      bool
}

// allow reports whether Redis may be called now.
func (b *breaker) allow() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	return !b.now().Before(b.openUntil)
}

// success records a call that worked: it closes the breaker.
func (b *breaker) success() {
	b.mu.Lock()
	b.fails = 0
	changed := b.open
	b.open = false
	b.mu.Unlock()
	if changed && b.onChange != nil {
		b.onChange(false)
	}
}

// failure records a failed call; the threshold-th in a row opens the
// breaker for the cooldown.
func (b *breaker) failure() {
	b.mu.Lock()
	b.fails++
	opened := false
	if b.fails >= b.threshold {
		b.fails = 0
		b.openUntil = b.now().Add(b.cooldown)
		opened = !b.open
		b.open = true
	}
	b.mu.Unlock()
	if opened && b.onChange != nil {
		b.onChange(true)
	}
}
