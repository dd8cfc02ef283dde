package noalloc

import (
	"fmt"
	"reflect"
	"runtime"
	"strings"
	"testing"
)

// holder puts name at an offset other than 0 of its object.
type holder struct {
	_    [3]int64
	name string
}

func TestString(t *testing.T) {
	for _, s := range []string{"", "acme", strings.Repeat("x", 300)} {
		h := &holder{name: strings.Clone(s)}
		v := String(&h.name)
		h = nil
		runtime.GC() // v alone keeps the holder alive
		runtime.GC()
		got, ok := v.(string)
		if !ok || got != s {
			t.Fatalf("String(%q).(string) = %q, %t", s, got, ok)
		}
		if v != any(s) || fmt.Sprint(v) != s || reflect.ValueOf(v).String() != s {
			t.Errorf("String(%q) does not behave as any(%q)", s, s)
		}
		switch x := v.(type) {
		case fmt.Stringer:
			t.Errorf("String(%q) is a %T", s, x)
		case string:
		default:
			t.Errorf("String(%q) is a %T", s, x)
		}
	}
}

func TestStringDoesNotAllocate(t *testing.T) {
	h := &holder{name: "acme"}
	var sink any
	if n := testing.AllocsPerRun(100, func() { sink = String(&h.name) }); n != 0 {
		t.Errorf("String allocates %.0f times, want 0", n)
	}
	_ = sink
}
