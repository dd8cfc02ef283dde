// Package slab allocates many small, long-lived values inside a few large
// heap objects ("chunks"), so that the garbage collector, which marks
// every cycle each object reachable from the roots, follows pointers that
// nearly all land in a handful of large objects rather than one pointer
// per small object scattered over the heap (at 100 000 warm
// merchants a cache miss per pointer to a distinct small object was most
// of the GC's mark CPU).
//
// Allocation is append-only and safe for concurrent use: a value is cut
// from the current chunk with one atomic add, and memory is never reused.
// A chunk is an ordinary Go object: the GC frees it once nothing refers to
// any of its strings or values any more, and not before.
//
// Memory bound: a chunk lives as long as its longest-lived value. Use a
// slab only for values that are all replaced or dropped within a bounded
// time, and give values of very different lifetimes slabs of their own (a
// cached token within its lifetime: the broker keeps one slab per
// lifetime class, within a factor of two, so that a class's chunks turn
// over within about two of its lifetimes and hold two to three times its
// live bytes; one long-lived value in a chunk of short-lived ones would
// keep the whole chunk) or that live as long as their configuration (a registry
// merchant's binding). Do not use one for values evicted one at a time at
// random moments (a wildcard merchant's binding): a chunk with one live
// value among many dead would be kept whole.
package slab

import (
	"strings"
	"sync"
	"sync/atomic"
	"unsafe"
)

// ChunkSize is the size in bytes of a chunk of strings.
const ChunkSize = 64 << 10

// MaxString is the largest string put in a chunk; a longer one is
// allocated on its own (a quarter of a chunk: at most a quarter is wasted
// at the end of a chunk).
const MaxString = ChunkSize / 4

// Strings allocates immutable strings in chunks of ChunkSize bytes. The
// zero value is ready to use; a Strings must not be copied after first
// use. It is safe for concurrent use.
type Strings struct {
	mu  sync.Mutex // serialises the creation of chunks
	cur atomic.Pointer[chunk]
}

// chunk is the chunk strings are cut from; off is the end of its used
// part (it may go past len(buf) when a string did not fit).
type chunk struct {
	buf []byte
	off atomic.Int64
}

// Concat returns the concatenation of parts as a string in a chunk: its
// bytes are copied in once and never written again. An empty result is
// "" (no memory); a result longer than MaxString is allocated on its own.
// It does not allocate except when a new chunk is needed.
func (s *Strings) Concat(parts ...string) string {
	n := 0
	for _, p := range parts {
		n += len(p)
	}
	if n == 0 {
		return ""
	}
	if n > MaxString {
		return strings.Join(parts, "")
	}
	b := s.alloc(n)
	off := 0
	for _, p := range parts {
		off += copy(b[off:], p)
	}
	return unsafe.String(&b[0], n)
}

// Clone returns a copy of x in a chunk (as Concat(x)).
func (s *Strings) Clone(x string) string { return s.Concat(x) }

// alloc returns n fresh bytes (0 < n <= MaxString) of a chunk.
func (s *Strings) alloc(n int) []byte {
	for {
		c := s.cur.Load()
		if c != nil {
			if end := c.off.Add(int64(n)); end <= int64(len(c.buf)) {
				return c.buf[end-int64(n) : end : end]
			}
		}
		s.mu.Lock()
		if s.cur.Load() == c {
			s.cur.Store(&chunk{buf: make([]byte, ChunkSize)})
		}
		s.mu.Unlock()
	}
}

// DefaultPerChunk is the number of values of a chunk of an Of whose
// PerChunk is 0.
const DefaultPerChunk = 128

// Of allocates values of type T in chunks of PerChunk values (one []T
// each). The zero value is ready to use; an Of must not be copied after
// first use. It is safe for concurrent use.
//
// The values it hands out are used through their pointers: a pointer to
// any of them keeps its whole chunk alive (and, through the chunk, what
// every value of the chunk points to).
type Of[T any] struct {
	// PerChunk is the number of values of a chunk. 0 means
	// DefaultPerChunk. Set it before first use.
	PerChunk int

	mu  sync.Mutex // serialises the creation of chunks
	cur atomic.Pointer[items[T]]
}

// items is one chunk of an Of; next is the index of its next free value
// (it may go past len(s)).
type items[T any] struct {
	s    []T
	next atomic.Int64
}

// New returns a pointer to a new zero T in a chunk, never handed out
// before. It does not allocate except when a new chunk is needed.
func (o *Of[T]) New() *T {
	for {
		c := o.cur.Load()
		if c != nil {
			if i := c.next.Add(1) - 1; i < int64(len(c.s)) {
				return &c.s[i]
			}
		}
		o.mu.Lock()
		if o.cur.Load() == c {
			n := o.PerChunk
			if n <= 0 {
				n = DefaultPerChunk
			}
			o.cur.Store(&items[T]{s: make([]T, n)})
		}
		o.mu.Unlock()
	}
}

// Current reports whether x is a string of the chunk strings are being
// cut from now (for tests: the last string made is, unless it was
// larger than MaxString or made of empty parts).
func (s *Strings) Current(x string) bool {
	c := s.cur.Load()
	if c == nil || len(x) == 0 {
		return false
	}
	p, start := uintptr(unsafe.Pointer(unsafe.StringData(x))), uintptr(unsafe.Pointer(unsafe.SliceData(c.buf)))
	return start <= p && p < start+uintptr(len(c.buf))
}

// Current reports whether p is a value of the chunk values are being
// handed out from now (for tests: the last value made is).
func (o *Of[T]) Current(p *T) bool {
	c := o.cur.Load()
	if c == nil || len(c.s) == 0 {
		return false
	}
	start, q := uintptr(unsafe.Pointer(&c.s[0])), uintptr(unsafe.Pointer(p))
	return start <= q && q < start+uintptr(len(c.s))*unsafe.Sizeof(c.s[0])
}
