// Package lograte limits a log line that repeats: at most one line per
// key per interval, the next line carrying how many were left out.
package lograte

import (
	"sync"
	"time"
)

// DefaultMaxKeys is the number of keys a Limiter tracks when MaxKeys is 0.
const DefaultMaxKeys = 10000

// Limiter lets one line per key through per Every. Its memory is bounded
// by MaxKeys: a new key while MaxKeys are tracked is not limited (its
// lines are logged) until a sweep, once per Every, makes room, so that
// nothing is left out without a count. The zero value is
// not usable: set Every and Now. A nil *Limiter lets every line through.
// It is safe for concurrent use.
type Limiter[K comparable] struct {
	// Every is the interval: after a line is logged for a key, the
	// key's lines are left out until Every has passed.
	Every time.Duration
	// MaxKeys bounds the keys tracked; default DefaultMaxKeys.
	MaxKeys int
	// Now is the clock.
	Now func() time.Time

	mu        sync.Mutex
	keys      map[K]window
	lastSweep time.Time
}

// window is a key's state: when its last line was logged, and the lines
// left out since (the first of them at since).
type window struct {
	logged     time.Time
	suppressed int
	since      time.Time
}

// Suppressed is what a logged line tells of the lines left out before
// it: how many, since when (the first of them). Count 0: none.
type Suppressed struct {
	// Count is the number of lines left out.
	Count int
	// Since is when the first of them was.
	Since time.Time
}

// Allow reports whether a line for key is logged now; when it is, s says
// how many lines for key were left out before it.
func (l *Limiter[K]) Allow(key K) (ok bool, s Suppressed) {
	if l == nil {
		return true, Suppressed{}
	}
	now := l.Now()
	l.mu.Lock()
	defer l.mu.Unlock()
	w, found := l.keys[key]
	if found && !now.Before(w.logged) && now.Before(w.logged.Add(l.Every)) {
		if w.suppressed == 0 {
			w.since = now
		}
		w.suppressed++
		l.keys[key] = w
		return false, Suppressed{}
	}
	if !found {
		l.sweep(now)
		if len(l.keys) >= l.maxKeys() {
			return true, Suppressed{}
		}
	}
	if l.keys == nil {
		l.keys = map[K]window{}
	}
	l.keys[key] = window{logged: now}
	return true, Suppressed{Count: w.suppressed, Since: w.since}
}

func (l *Limiter[K]) maxKeys() int {
	if l.MaxKeys > 0 {
		return l.MaxKeys
	}
	return DefaultMaxKeys
}

// sweep drops, at most once per Every (or at once when the clock went
// back), the keys whose interval ended with nothing left out; when the
// keys are at their bound, also those with lines left out (their count
// is lost; the key's next line is logged).
func (l *Limiter[K]) sweep(now time.Time) {
	if !now.Before(l.lastSweep) && now.Sub(l.lastSweep) < l.Every {
		return
	}
	full := len(l.keys) >= l.maxKeys()
	l.lastSweep = now
	for k, w := range l.keys {
		ended := now.Before(w.logged) || !now.Before(w.logged.Add(l.Every))
		if ended && (w.suppressed == 0 || full) {
			delete(l.keys, k)
		}
	}
}
