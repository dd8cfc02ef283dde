// Package noalloc turns a string held in a long-lived object into an
// interface value without copying its header to the heap.
//
// Storing a string in an interface (any) normally allocates a 16-byte box
// for its header. A value set on every request (a Caddy placeholder) must
// not allocate, and one box per long-lived object kept for that purpose
// is one more heap object for every GC cycle to mark (at 100 000
// warm merchants). String makes the interface point at the string header
// where it already lives.
package noalloc

import "unsafe"

// eface is the layout of an empty interface value (runtime.eface): the
// type word and the data word. For a string, the data word points at the
// string header.
type eface struct {
	typ  unsafe.Pointer
	data unsafe.Pointer
}

// String returns *p as an interface value holding a string, without
// allocating: the interface's data word is p. The result behaves as
// any(*p) does (type switches, assertions, reflect, fmt) as long as *p is
// never assigned again: p must point at a field that is set once, before
// String is called, in an object that outlives nothing it is read by
// (the interface keeps that object alive, as any pointer does).
func String(p *string) any {
	v := any("") // the type word of string; a constant needs no box
	(*eface)(unsafe.Pointer(&v)).data = unsafe.Pointer(p)
	return v
}
