package config

import (
	"strings"
	"time"
)

// The decoder's strings are slices of the text it decoded: a registry
// that kept one of them would keep that text (about 90 bytes a
// merchant). compact copies what a File keeps of its merchants into
// memory of its own, in few blocks with few pointers for the garbage
// collector to follow, and shares equal values (measured with
// BenchmarkRegistryMemory). The providers' and the wildcard entry's
// strings keep the text they were decoded from alive: a chunk of about
// chunkBytes (see chunk.go), or the whole file when it is not cut.

// compact gives the file's merchants strings of their own: their ids and
// organisations in one block; their Terms (provider, scopes, lifetime,
// audience) shared by the merchants with equal ones (a Terms is never
// modified: Wildcard.For copies it).
func (f *File) compact() {
	n := 0
	for i := range f.merchants {
		m := &f.merchants[i]
		n += len(m.ID) + len(m.Organisation)
	}
	var b strings.Builder
	b.Grow(n)
	for i := range f.merchants {
		m := &f.merchants[i]
		b.WriteString(m.ID)
		b.WriteString(m.Organisation)
	}
	block, off := b.String(), 0
	take := func(s string) string {
		if s == "" {
			return ""
		}
		s = block[off : off+len(s)]
		off += len(s)
		return s
	}
	in := interner{}
	terms := map[termsKey]*Terms{}
	for i := range f.merchants {
		m := &f.merchants[i]
		m.ID, m.Organisation = take(m.ID), take(m.Organisation)
		k := m.Terms.key()
		t := terms[k]
		if t == nil {
			t = &Terms{Provider: in.string(m.Provider), Scopes: in.scopes(m.Scopes), Lifetime: m.Lifetime, Audience: in.string(m.Audience), DisplayName: m.DisplayName}
			terms[k] = t
		}
		m.Terms = t
	}
}

// shareTerms makes the merchants with equal Terms share one (the
// merchants of a file parsed in pieces: each piece has its own).
func shareTerms(ms []Merchant) {
	terms := map[termsKey]*Terms{}
	for i := range ms {
		m := &ms[i]
		k := m.Terms.key()
		if t := terms[k]; t != nil {
			m.Terms = t
		} else {
			terms[k] = m.Terms
		}
	}
}

// key returns the termsKey of t.
func (t *Terms) key() termsKey {
	k := keyOf(t.Provider, t.Scopes, t.Lifetime, t.Audience)
	k.displayName = t.DisplayName
	return k
}

// keyOf returns the termsKey of a provider name, scope set, lifetime and
// audience.
func keyOf(provider string, scopes []string, lifetime time.Duration, audience string) termsKey {
	return termsKey{provider: provider, scopes: strings.Join(scopes, "\x00"), lifetime: lifetime, audience: audience}
}

// termsKey identifies a merchant's Terms (scopes joined with NUL), and a
// registry's binding profile (profiles).
type termsKey struct {
	provider, scopes string
	lifetime         time.Duration
	audience         string
	displayName      string // Terms only, not profiles
}

// interner shares equal strings and scope lists.
type interner struct {
	strs  map[string]string
	lists map[string][]string
}

func (in *interner) string(s string) string {
	if v, ok := in.strs[s]; ok {
		return v
	}
	if in.strs == nil {
		in.strs = map[string]string{}
	}
	v := strings.Clone(s)
	in.strs[v] = v
	return v
}

func (in *interner) scopes(sc []string) []string {
	var key string
	if len(sc) == 1 {
		key = sc[0]
	} else {
		key = strings.Join(sc, " ") // scopes hold no space
	}
	if v, ok := in.lists[key]; ok {
		return v
	}
	if in.lists == nil {
		in.lists = map[string][]string{}
	}
	v := make([]string, len(sc))
	for i, s := range sc {
		v[i] = in.string(s)
	}
	in.lists[strings.Clone(key)] = v
	return v
}
