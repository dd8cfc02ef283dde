package bindings

import (
	"slices"
	"testing"
)

// TestSeries: a wildcard merchant's series are removed when its last
// user releases them, never while another uses them, never when an
// explicit binding pinned them (Pin); a release without a Use removes
// nothing. A sweep removes them unless a user uses them or Pin pinned
// them.
func TestSeries(t *testing.T) {
	for _, tt := range []struct {
		name    string
		steps   []string // "hold ID", "keep ID", "release ID", "sweep ID"
		removed []string // merchants whose series were removed, in order
		used    int      // merchants with users at the end
	}{
		{"hold then release", []string{"hold A", "release A"}, []string{"A"}, 0},
		{"two users", []string{"hold A", "hold A", "release A"}, nil, 1},
		{"both release", []string{"hold A", "hold A", "release A", "release A"}, []string{"A"}, 0},
		{"pinned by an explicit binding", []string{"keep A", "hold A", "release A"}, nil, 0},
		{"release without hold", []string{"release A"}, nil, 0},
		{"counted again after release", []string{"hold A", "release A", "hold A"}, []string{"A"}, 1},
		{"merchants apart", []string{"hold A", "hold B", "release B"}, []string{"B"}, 1},
		{"swept without users", []string{"sweep A"}, []string{"A"}, 0},
		{"swept after release", []string{"hold A", "release A", "sweep A"}, []string{"A", "A"}, 0},
		{"sweep while used", []string{"hold A", "sweep A"}, nil, 1},
		{"sweep of pinned series", []string{"keep A", "sweep A", "hold A", "release A", "sweep A"}, nil, 0},
		{"sweep of another merchant", []string{"hold A", "sweep B"}, []string{"B"}, 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var removed []string
			resolved := 0
			s := NewSeries(func(_, merchant string) int { resolved++; return resolved },
				func(provider, merchant string) {
					if provider != "p" {
						t.Errorf("removed provider %q, want p", provider)
					}
					removed = append(removed, merchant)
				})
			for _, step := range tt.steps {
				op, id := step[:len(step)-2], step[len(step)-1:]
				switch op {
				case "hold":
					s.Use("p", id)
				case "keep":
					s.Pin("p", id)
				case "release":
					s.Release("p", id)
				case "sweep":
					s.Sweep("p", id)
				default:
					t.Fatalf("step %q", step)
				}
			}
			if !slices.Equal(removed, tt.removed) {
				t.Errorf("removed %v, want %v", removed, tt.removed)
			}
			if len(s.wild) != tt.used {
				t.Errorf("%d merchants with users (%v), want %d", len(s.wild), s.wild, tt.used)
			}
		})
	}
}
