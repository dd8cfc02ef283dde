package config

import (
	"reflect"
	"strings"
)

// The decoder's strings are slices of the whole file's text: a registry
// that kept one of them would keep the whole file (about 90 bytes a
// merchant). compact copies what a File keeps into memory of its own, in
// few blocks with few pointers for the garbage collector to follow, and
// shares equal values (measured with BenchmarkRegistryMemory).

// compact gives the file's merchants, wildcard and providers strings of
// their own: the merchants' ids, organisations and audiences in one block;
// their provider names and scope lists shared by the merchants with
// equal ones (a scope list is never modified: Wildcard.For copies it).
func (f *File) compact() {
	n := 0
	for i := range f.merchants {
		m := &f.merchants[i]
		n += len(m.ID) + len(m.Organisation) + len(m.Audience)
	}
	var b strings.Builder
	b.Grow(n)
	for i := range f.merchants {
		m := &f.merchants[i]
		b.WriteString(m.ID)
		b.WriteString(m.Organisation)
		b.WriteString(m.Audience)
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
	for i := range f.merchants {
		m := &f.merchants[i]
		m.ID, m.Organisation, m.Audience = take(m.ID), take(m.Organisation), take(m.Audience)
		m.Provider = in.string(m.Provider)
		m.Scopes = in.scopes(m.Scopes)
	}
	if w := f.wildcard; w != nil {
		cloneStrings(reflect.ValueOf(w).Elem())
	}
	for _, rp := range f.providers {
		cloneStrings(reflect.ValueOf(rp).Elem())
	}
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

// cloneStrings replaces every string reachable from v (structs, pointers,
// slices, maps; exported fields or not) by a copy.
func cloneStrings(v reflect.Value) {
	switch v.Kind() {
	case reflect.String:
		if v.CanSet() {
			v.SetString(strings.Clone(v.String()))
		}
	case reflect.Pointer, reflect.Interface:
		if !v.IsNil() {
			cloneStrings(v.Elem())
		}
	case reflect.Struct:
		for i := range v.NumField() {
			f := v.Field(i)
			if !f.CanSet() {
				f = reflect.NewAt(f.Type(), f.Addr().UnsafePointer()).Elem()
			}
			cloneStrings(f)
		}
	case reflect.Slice, reflect.Array:
		for i := range v.Len() {
			cloneStrings(v.Index(i))
		}
	case reflect.Map:
		if v.IsNil() {
			return
		}
		c := reflect.MakeMapWithSize(v.Type(), v.Len())
		for it := v.MapRange(); it.Next(); {
			k, e := reflect.New(v.Type().Key()).Elem(), reflect.New(v.Type().Elem()).Elem()
			k.Set(it.Key())
			e.Set(it.Value())
			cloneStrings(k)
			cloneStrings(e)
			c.SetMapIndex(k, e)
		}
		v.Set(c)
	}
}
