package opstate

import "time"

// DefaultWindow is the span a provider's token request counts cover.
const DefaultWindow = 5 * time.Minute

// windowBuckets is how many buckets a window is cut into: its counts
// move by Window/windowBuckets.
const windowBuckets = 30

// bucket counts the token API calls of one slice of a window.
type bucket struct {
	slot      int64 // which slice of time (unix ns / bucket width) it counts
	calls     int32
	failures  int32
	temporary int32 // failures of the provider (not of one merchant)
}

// window counts token API calls over a sliding span of time, in
// buckets: no allocation per call.
type window struct {
	width   int64 // ns per bucket
	buckets [windowBuckets]bucket
}

func newWindow(span time.Duration) window {
	return window{width: max(int64(span/windowBuckets), 1)}
}

// add counts one call at now.
func (w *window) add(now time.Time, failed, temporary bool) {
	slot := now.UnixNano() / w.width
	b := &w.buckets[slot%windowBuckets]
	if b.slot != slot {
		*b = bucket{slot: slot}
	}
	b.calls++
	if failed {
		b.failures++
	}
	if temporary {
		b.temporary++
	}
}

// sum returns the calls, failures and temporary failures counted over
// the window ending at now.
func (w *window) sum(now time.Time) (calls, failures, temporary int) {
	slot := now.UnixNano() / w.width
	for i := range w.buckets {
		b := &w.buckets[i]
		if b.slot > slot-windowBuckets && b.slot <= slot {
			calls, failures, temporary = calls+int(b.calls), failures+int(b.failures), temporary+int(b.temporary)
		}
	}
	return calls, failures, temporary
}
