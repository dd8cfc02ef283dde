package lograte

import (
	"testing"
	"time"
)

func TestLimiter(t *testing.T) {
	t0 := time.Unix(1_700_000_000, 0)
	type step struct {
		at    time.Duration // after t0
		key   string
		ok    bool
		count int           // suppressed count told by a logged line
		since time.Duration // its Since, after t0
	}
	for _, tt := range []struct {
		name    string
		maxKeys int
		steps   []step
	}{
		{"first line logged", 0, []step{{0, "a", true, 0, 0}}},
		{"repeats within the interval left out, counted on the next line", 0, []step{
			{0, "a", true, 0, 0},
			{time.Second, "a", false, 0, 0},
			{2 * time.Second, "a", false, 0, 0},
			{59 * time.Second, "a", false, 0, 0},
			{time.Minute, "a", true, 3, time.Second},
			{time.Minute + time.Second, "a", false, 0, 0},
			{3 * time.Minute, "a", true, 1, time.Minute + time.Second},
		}},
		{"keys are limited apart", 0, []step{
			{0, "a", true, 0, 0},
			{time.Second, "b", true, 0, 0},
			{2 * time.Second, "a", false, 0, 0},
			{3 * time.Second, "b", false, 0, 0},
		}},
		{"a line after a quiet interval tells nothing", 0, []step{
			{0, "a", true, 0, 0},
			{time.Hour, "a", true, 0, 0},
		}},
		{"a clock that went back logs", 0, []step{
			{time.Hour, "a", true, 0, 0},
			{0, "a", true, 0, 0},
		}},
		{"beyond MaxKeys a new key is not limited", 2, []step{
			{0, "a", true, 0, 0},
			{0, "b", true, 0, 0},
			{time.Second, "c", true, 0, 0},
			{2 * time.Second, "c", true, 0, 0},
			{3 * time.Second, "a", false, 0, 0},
		}},
		{"a sweep makes room for new keys", 2, []step{
			{0, "a", true, 0, 0},
			{0, "b", true, 0, 0},
			{time.Second, "b", false, 0, 0},
			{2 * time.Minute, "c", true, 0, 0}, // sweeps a (nothing owed) and b (owed, at the bound)
			{2*time.Minute + time.Second, "c", false, 0, 0},
			{2*time.Minute + time.Second, "b", true, 0, 0},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			now := t0
			l := &Limiter[string]{Every: time.Minute, MaxKeys: tt.maxKeys, Now: func() time.Time { return now }}
			for i, s := range tt.steps {
				now = t0.Add(s.at)
				ok, sup := l.Allow(s.key)
				want := Suppressed{Count: s.count}
				if s.count > 0 {
					want.Since = t0.Add(s.since)
				}
				if ok != s.ok || sup != want {
					t.Fatalf("step %d (%s at %v): Allow = %v, %+v; want %v, %+v", i, s.key, s.at, ok, sup, s.ok, want)
				}
			}
			if max := l.maxKeys(); len(l.keys) > max {
				t.Fatalf("%d keys tracked, bound %d", len(l.keys), max)
			}
		})
	}
}

func TestNilLimiterAllows(t *testing.T) {
	var l *Limiter[string]
	if ok, s := l.Allow("a"); !ok || s.Count != 0 {
		t.Fatalf("nil limiter: %v %+v", ok, s)
	}
}
