package slab

import (
	"fmt"
	"runtime"
	"strings"
	"sync"
	"testing"
	"unsafe"
	"weak"
)

func TestConcat(t *testing.T) {
	var s Strings
	for _, tt := range []struct {
		name  string
		parts []string
	}{
		{"none", nil},
		{"empty", []string{"", ""}},
		{"one", []string{"merchant-000001"}},
		{"three", []string{"Bearer ", "eyJhbGciOi.x.y", "7d2c-id"}},
		{"quarter chunk", []string{strings.Repeat("a", MaxString)}},
		{"large", []string{strings.Repeat("b", MaxString), "c"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			want := strings.Join(tt.parts, "")
			if got := s.Concat(tt.parts...); got != want {
				t.Errorf("Concat = %.20q (len %d), want %.20q (len %d)", got, len(got), want, len(want))
			}
		})
	}
}

// chunkOf returns the chunk a string of s was cut from, or nil.
func (s *Strings) chunkOf(x string) *chunk {
	c := s.cur.Load()
	p := uintptr(unsafe.Pointer(unsafe.StringData(x)))
	if c == nil || p < uintptr(unsafe.Pointer(&c.buf[0])) || p >= uintptr(unsafe.Pointer(&c.buf[0]))+ChunkSize {
		return nil
	}
	return c
}

func TestStringsShareChunks(t *testing.T) {
	var s Strings
	a, b := s.Clone("first"), s.Clone("second")
	if s.chunkOf(a) == nil || s.chunkOf(a) != s.chunkOf(b) {
		t.Fatal("two small strings are not in the current chunk")
	}
	if unsafe.StringData(b) != (*byte)(unsafe.Add(unsafe.Pointer(unsafe.StringData(a)), len(a))) {
		t.Error("the second string does not follow the first")
	}
	if !s.Current(b) {
		t.Error("Current(last string) = false")
	}
	if large := s.Clone(strings.Repeat("x", MaxString+1)); s.chunkOf(large) != nil || s.Current(large) {
		t.Error("a string larger than MaxString is in a chunk")
	}
	// A chunk that cannot hold a string is left for a new one.
	for range ChunkSize / MaxString {
		s.Clone(strings.Repeat("y", MaxString))
	}
	if c := s.cur.Load(); c == s.chunkOf(a) {
		t.Error("no new chunk after a full one")
	}
	if a != "first" || b != "second" {
		t.Errorf("strings changed: %q %q", a, b)
	}
}

func TestConcatNoAlloc(t *testing.T) {
	var s Strings
	s.Clone("warm") // the first chunk
	value, id := strings.Repeat("t", 40), "0000-1111"
	if n := testing.AllocsPerRun(200, func() { s.Concat("Bearer ", value, id) }); n != 0 {
		t.Errorf("Concat allocated %v times per string, want 0", n)
	}
	var o Of[[4]*int]
	o.New()
	if n := testing.AllocsPerRun(100, func() { o.New() }); n != 0 {
		t.Errorf("Of.New allocated %v times per value, want 0", n)
	}
}

// TestConcurrent: strings and values cut concurrently never overlap.
func TestConcurrent(t *testing.T) {
	var s Strings
	o := Of[[2]string]{PerChunk: 16}
	const workers, each = 8, 2000
	got := make([][]string, workers)
	vals := make([][]*[2]string, workers)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			for i := range each {
				x := fmt.Sprintf("w%d-%d-%s", w, i, strings.Repeat("z", i%300))
				got[w] = append(got[w], s.Concat(x[:3], x[3:]))
				v := o.New()
				v[0], v[1] = x, x
				vals[w] = append(vals[w], v)
			}
		})
	}
	wg.Wait()
	seen := map[*[2]string]bool{}
	for w := range workers {
		for i := range each {
			x := fmt.Sprintf("w%d-%d-%s", w, i, strings.Repeat("z", i%300))
			if got[w][i] != x {
				t.Fatalf("string %d of worker %d = %.30q, want %.30q", i, w, got[w][i], x)
			}
			v := vals[w][i]
			if seen[v] || v[0] != x || v[1] != x {
				t.Fatalf("value %d of worker %d shared or overwritten: %.30q", i, w, v[0])
			}
			seen[v] = true
		}
	}
}

// TestChunksCollected: once nothing refers to any string (value) of a
// chunk, and the slab has moved on to another chunk, the GC frees it.
func TestChunksCollected(t *testing.T) {
	t.Run("strings", func(t *testing.T) {
		var s Strings
		strs := []string{s.Clone("a"), s.Clone("b")}
		wp := weak.Make(&s.cur.Load().buf[0])
		s.cur.Store(nil) // as if the chunk were full
		runtime.GC()
		runtime.GC()
		if wp.Value() == nil {
			t.Fatal("chunk freed while its strings are referenced")
		}
		runtime.KeepAlive(strs)
		strs = nil
		runtime.GC()
		runtime.GC()
		if wp.Value() != nil {
			t.Error("chunk not freed after its strings were dropped")
		}
	})
	t.Run("values", func(t *testing.T) {
		var o Of[[3]int]
		v := o.New()
		wp := weak.Make(&o.cur.Load().s[0])
		for range DefaultPerChunk {
			o.New()
		}
		if &o.cur.Load().s[0] == v || o.Current(v) {
			t.Fatal("no new chunk after a full one")
		}
		if !o.Current(o.New()) {
			t.Error("Current(last value) = false")
		}
		runtime.GC()
		runtime.GC()
		if wp.Value() == nil {
			t.Fatal("chunk freed while one of its values is referenced")
		}
		runtime.KeepAlive(v)
		v = nil
		runtime.GC()
		runtime.GC()
		if wp.Value() != nil {
			t.Error("chunk not freed after its values were dropped")
		}
	})
}
