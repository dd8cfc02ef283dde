package broker

import "slices"

// A purge must also reach the fetches of its key in flight, or a fetch
// that got the token just before the purge would cache it just after. So
// each fetch is registered while it runs; a purge of its key records the
// purged fingerprint in it (under Broker.mu); the fetch neither adopts nor
// caches a token so named, and fetches once more. A purge made here is
// also recorded until the shared tier has purged the token, for the
// fetches that start meanwhile.

// flight is a fetch in progress: the fingerprints of its key's tokens
// purged while it ran ("" for any). Guarded by Broker.mu.
type flight struct {
	purged []string
	// giveUp ends the wait for budget of a lookup's fetch, once no lookup
	// waits for it.
	giveUp func()
}

// maxFlightPurges bounds flight.purged; beyond it, any token counts as
// purged.
const maxFlightPurges = 8

// beginFlight registers the fetch of key; end it with endFlight. giveUp is
// nil for a fetch no lookup waits for.
func (br *Broker) beginFlight(key string, giveUp func()) *flight {
	f := &flight{giveUp: giveUp}
	br.mu.Lock()
	f.purged = append(f.purged, br.purging[key]...)
	br.flights[key] = f
	if giveUp != nil && br.waiting[key] == 0 {
		giveUp() // its lookups left before it started
	}
	br.mu.Unlock()
	return f
}

// waitFor counts a lookup waiting for the fetch of key; call the returned
// func when it stops waiting. When the last one leaves, the fetch gives up
// its place in the budget's queue.
func (br *Broker) waitFor(key string) (done func()) {
	br.mu.Lock()
	br.waiting[key]++
	br.mu.Unlock()
	return func() {
		br.mu.Lock()
		defer br.mu.Unlock()
		if br.waiting[key]--; br.waiting[key] > 0 {
			return
		}
		delete(br.waiting, key)
		if f := br.flights[key]; f != nil && f.giveUp != nil {
			f.giveUp()
		}
	}
}

// endFlight unregisters the fetch f of key.
func (br *Broker) endFlight(key string, f *flight) {
	br.mu.Lock()
	if br.flights[key] == f {
		delete(br.flights, key)
	}
	br.mu.Unlock()
}

// purgedLocked tells the fetch of key in flight, if any, that the token
// with fingerprint fp ("" for any) was purged. Call it with br.mu held.
func (br *Broker) purgedLocked(key, fp string) {
	f := br.flights[key]
	if f == nil {
		return
	}
	if len(f.purged) >= maxFlightPurges {
		f.purged, fp = f.purged[:0], ""
	}
	f.purged = append(f.purged, fp)
}

// namesLocked reports whether a purge named the token with fingerprint fp
// while f ran. Call it with br.mu held; f may be nil (nothing purged).
func (f *flight) namesLocked(fp string) bool {
	if f == nil {
		return false
	}
	for _, p := range f.purged {
		if p == "" || p == fp {
			return true
		}
	}
	return false
}

// purgedDuring reports whether a purge named the token with fingerprint fp
// while f ran.
func (br *Broker) purgedDuring(f *flight, fp string) bool {
	br.mu.Lock()
	defer br.mu.Unlock()
	return f.namesLocked(fp)
}

// purgingLocked records that this broker purges the token of key with
// fingerprint fp, until the shared tier has too (purgedShared). Call it
// with br.mu held.
func (br *Broker) purgingLocked(key, fp string) {
	br.purgedLocked(key, fp)
	if br.opts.Shared == nil {
		return
	}
	br.purging[key] = append(br.purging[key], fp)
}

// purgedShared ends what purgingLocked began.
func (br *Broker) purgedShared(key, fp string) {
	br.mu.Lock()
	defer br.mu.Unlock()
	fps := br.purging[key]
	if i := slices.Index(fps, fp); i >= 0 {
		fps = slices.Delete(fps, i, i+1)
	}
	if len(fps) == 0 {
		delete(br.purging, key)
	} else {
		br.purging[key] = fps
	}
}
