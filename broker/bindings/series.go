package bindings

import (
	"strings"
	"sync"
)

// Series keeps track of which merchants' per-merchant metrics series
// exist, so that those of wildcard merchants follow the wildcard's active
// set. A wildcard binding counts among its merchant's series users (Use)
// until it is evicted or its table discarded (Release): the last release
// deletes them, unless an explicit merchant's binding pinned them (Pin).
// T is what a binding counts into (its resolved counters).
//
// A Series is safe for concurrent use. Make it with NewSeries.
type Series[T any] struct {
	resolve func(provider, merchant string) T
	remove  func(provider, merchant string)

	mu       sync.Mutex
	wild     map[seriesKey]int      // wildcard bindings using a merchant's series
	explicit map[seriesKey]struct{} // merchants whose series are never deleted
}

// seriesKey names the series of a merchant: its provider and id.
type seriesKey struct{ provider, merchant string }

// NewSeries returns a Series that resolves a merchant's series with
// resolve and deletes them with remove. Both are called under the
// Series' lock: series resolved by Use are never deleted while a
// binding counted by Use uses them, nor ever once resolved by Pin.
func NewSeries[T any](resolve func(provider, merchant string) T, remove func(provider, merchant string)) *Series[T] {
	return &Series[T]{resolve: resolve, remove: remove,
		wild: map[seriesKey]int{}, explicit: map[seriesKey]struct{}{}}
}

// Use resolves the series of a new wildcard binding's merchant and
// counts the binding among their users.
func (s *Series[T]) Use(provider, merchant string) T {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.wild[seriesKey{provider, merchant}]++
	return s.resolve(provider, merchant)
}

// Pin resolves the series of an explicit merchant's binding and pins
// them for good (another config may serve the merchant through a
// wildcard, whose release must not delete them). The ids are copied: they
// may point into a registry's file.
func (s *Series[T]) Pin(provider, merchant string) T {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.explicit[seriesKey{provider, merchant}]; !ok {
		s.explicit[seriesKey{strings.Clone(provider), strings.Clone(merchant)}] = struct{}{}
	}
	return s.resolve(provider, merchant)
}

// Sweep deletes the merchant's series when no wildcard binding uses them
// and Pin did not pin them: a request still using an evicted binding may
// count into them after its Release made them go, which makes them again.
func (s *Series[T]) Sweep(provider, merchant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if k := (seriesKey{provider, merchant}); s.wild[k] == 0 {
		s.removeUnpinned(k)
	}
}

// Release is the end of a wildcard binding that Use counted (evicted, or
// its table discarded): the last one deletes the merchant's series,
// unless Pin pinned them. A request still using a binding of a discarded
// table may count into them once more, making them again until the next
// release.
func (s *Series[T]) Release(provider, merchant string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	k := seriesKey{provider, merchant}
	switch n := s.wild[k]; n {
	case 0:
	case 1:
		delete(s.wild, k)
		s.removeUnpinned(k)
	default:
		s.wild[k] = n - 1
	}
}

// removeUnpinned deletes the series of k unless Pin pinned them. Called
// with s.mu held.
func (s *Series[T]) removeUnpinned(k seriesKey) {
	if _, ok := s.explicit[k]; !ok {
		s.remove(k.provider, k.merchant)
	}
}
