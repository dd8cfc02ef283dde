package fleet

import (
	"hash/maphash"
	"sync"
	"time"
)

// A value sealed in Redis carries a version, which the seal authenticates:
// the writer's clock (unix nanoseconds) when it was written, raised above
// every version the writer had seen for the key, so that the versions of
// one key grow across nodes whose clocks differ.
//
// Each node remembers, per key, the newest version it has seen (read,
// written, or announced by a purge) and refuses an older value: a rollback
// (a purged token, a spent refresh token, or a failover that lost the
// newest write, written back). A purge raises the floor above the purged
// value on every node that hears it. What a node has not seen it cannot
// refuse: a node that started after the purge, or never read the key,
// accepts what Redis stores.

// versions is what a node remembers of the token versions it has seen,
// each record while the newest token it describes is valid (older ones
// have expired too): about one per token the node has. Keys are 64-bit
// hashes and records hold no pointer, so the garbage collector does not
// scan the map.
type versions struct {
	mu      sync.Mutex
	seed    maphash.Seed
	m       map[uint64]seen
	sweepAt int // len(m) at which expired records are swept
}

// seen is a key's record.
type seen struct {
	newest int64       // the newest version seen
	floor  int64       // the oldest version accepted
	until  int64       // unix ns after which the record is dropped
	fp     [fpLen]byte // the newest version's fingerprint
}

// minSweep is the size below which the map is not swept.
const minSweep = 1024

func newVersions() *versions {
	return &versions{seed: maphash.MakeSeed(), m: map[uint64]seen{}, sweepAt: minSweep}
}

func (v *versions) hash(key string) uint64 { return maphash.String(v.seed, key) }

// get returns key's record, if one is still kept at now.
func (v *versions) get(h uint64, now time.Time) (seen, bool) {
	s, ok := v.m[h]
	if ok && s.until < now.UnixNano() {
		delete(v.m, h)
		return seen{}, false
	}
	return s, ok
}

// accept reports whether version ver of key is at least the oldest version
// the node accepts for it.
func (v *versions) accept(key string, ver int64, now time.Time) bool {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, ok := v.get(v.hash(key), now)
	return !ok || ver >= s.floor
}

// saw records version ver of key, with fingerprint fp and expiry, as seen:
// if it is the newest, older versions are no longer accepted.
func (v *versions) saw(key string, ver int64, fp string, expiry, now time.Time) {
	v.mu.Lock()
	defer v.mu.Unlock()
	h := v.hash(key)
	s, ok := v.get(h, now)
	if ok && ver < s.newest {
		return
	}
	s.newest, s.floor = ver, max(s.floor, ver)
	copy(s.fp[:], fp)
	s.until = max(s.until, expiry.UnixNano())
	v.put(h, s, now)
}

// purge records that the token of key with fingerprint fp ("" for any) was
// purged: if it is the newest the node has seen, no version up to it is
// accepted any more. It returns the floor and until when to keep it, for
// the other nodes, and that token's fingerprint; ok is false when the node
// has not seen that token.
func (v *versions) purge(key, fp string, now time.Time) (floor, until int64, newest string, ok bool) {
	v.mu.Lock()
	defer v.mu.Unlock()
	h := v.hash(key)
	s, found := v.get(h, now)
	if !found || (fp != "" && string(s.fp[:]) != fp) {
		return 0, 0, "", false
	}
	s.floor = max(s.floor, s.newest+1)
	v.put(h, s, now)
	return s.floor, s.until, string(s.fp[:]), true
}

// raise accepts no version of key below floor until until (a purge another
// node announced).
func (v *versions) raise(key string, floor, until int64, now time.Time) {
	if until < now.UnixNano() {
		return
	}
	v.mu.Lock()
	defer v.mu.Unlock()
	h := v.hash(key)
	s, _ := v.get(h, now)
	s.floor, s.until = max(s.floor, floor), max(s.until, until)
	v.put(h, s, now)
}

// next returns the version of a value of key written at now: above every
// version the node has seen or refused for it.
func (v *versions) next(key string, now time.Time) int64 {
	v.mu.Lock()
	defer v.mu.Unlock()
	s, _ := v.get(v.hash(key), now)
	return max(now.UnixNano(), s.newest+1, s.floor)
}

// put stores a record, sweeping the expired ones when the map has doubled
// since the last sweep.
func (v *versions) put(h uint64, s seen, now time.Time) {
	v.m[h] = s
	if len(v.m) < v.sweepAt {
		return
	}
	t := now.UnixNano()
	for k, r := range v.m {
		if r.until < t {
			delete(v.m, k)
		}
	}
	v.sweepAt = max(2*len(v.m), minSweep)
}
