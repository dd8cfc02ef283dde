package opstate

import "time"

// RequestsWindow is the span a provider's token request counts
// (Provider.Requests and Failures) cover.
const RequestsWindow = 5 * time.Minute

// windowBuckets is how many buckets a window is cut into: its counts
// move by bucketWidth.
const windowBuckets = 30

// bucketWidth is the span of time a bucket counts, in nanoseconds.
const bucketWidth = int64(RequestsWindow / windowBuckets)

// bucket counts the token API calls of one slice of a window.
type bucket struct {
	slot     int64 // which slice of time (unix ns / bucketWidth) it counts
	calls    int32
	failures int32
}

// window counts token API calls over the last RequestsWindow, in
// buckets: no allocation per call.
type window struct {
	buckets [windowBuckets]bucket
}

// add counts one call at now.
func (w *window) add(now time.Time, failed bool) {
	slot := now.UnixNano() / bucketWidth
	b := &w.buckets[slot%windowBuckets]
	if b.slot != slot {
		*b = bucket{slot: slot}
	}
	b.calls++
	if failed {
		b.failures++
	}
}

// sum returns the calls and failures counted over the window ending at
// now.
func (w *window) sum(now time.Time) (calls, failures int) {
	slot := now.UnixNano() / bucketWidth
	for i := range w.buckets {
		b := &w.buckets[i]
		if b.slot > slot-windowBuckets && b.slot <= slot {
			calls, failures = calls+int(b.calls), failures+int(b.failures)
		}
	}
	return calls, failures
}
