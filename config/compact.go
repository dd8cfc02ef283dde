package config

import (
	"strings"
	"time"
)

// The decoder's strings are slices of the text it decoded (about 90
// bytes a merchant). A compactor copies what a File keeps of its
// merchants into memory of its own, in few blocks with few pointers for
// the garbage collector, and shares equal values (BenchmarkRegistryMemory).
// The providers' and the wildcard entry's strings keep their text (a
// chunk, or the whole file) alive.

// compactor compacts the merchants of one file, chunk after chunk.
type compactor struct {
	terms map[termsKey]*Terms
	strs  map[string]string
	lists map[string][]string
}

// compact gives merchants strings of their own: their ids and
// organisations in one block; their Terms (provider, scopes, lifetime,
// audience, display name) shared by the merchants of the file with equal
// ones (a Terms is never modified: Wildcard.resolve copies it).
func (c *compactor) compact(merchants []Merchant) {
	n := 0
	for i := range merchants {
		m := &merchants[i]
		n += len(m.ID) + len(m.Organisation)
	}
	var b strings.Builder
	b.Grow(n)
	for i := range merchants {
		m := &merchants[i]
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
	if c.terms == nil {
		c.terms = map[termsKey]*Terms{}
	}
	for i := range merchants {
		m := &merchants[i]
		m.ID, m.Organisation = take(m.ID), take(m.Organisation)
		k := m.Terms.key()
		t := c.terms[k]
		if t == nil {
			t = &Terms{Provider: c.string(m.Provider), Scopes: c.scopes(m.Scopes), Lifetime: m.Lifetime, Audience: c.string(m.Audience), DisplayName: strings.Clone(m.DisplayName)}
			c.terms[k] = t
		}
		m.Terms = t
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

// string returns s, shared with the equal strings before.
func (c *compactor) string(s string) string {
	if v, ok := c.strs[s]; ok {
		return v
	}
	if c.strs == nil {
		c.strs = map[string]string{}
	}
	v := strings.Clone(s)
	c.strs[v] = v
	return v
}

// scopes returns sc, shared with the equal scope lists before.
func (c *compactor) scopes(sc []string) []string {
	key := strings.Join(sc, " ") // scopes hold no space
	if v, ok := c.lists[key]; ok {
		return v
	}
	if c.lists == nil {
		c.lists = map[string][]string{}
	}
	v := make([]string, len(sc))
	for i, s := range sc {
		v[i] = c.string(s)
	}
	c.lists[strings.Clone(key)] = v
	return v
}
