package opstate

import (
	"fmt"
	"slices"
	"strings"
	"testing"
)

func TestCut(t *testing.T) {
	// Items are "merchant/n": a merchant may have several.
	items := []string{"a/1", "b/1", "b/2", "b/3", "c/1", "d/1", "d/2"}
	for _, tt := range []struct {
		name  string
		page  Page
		items []string
		want  []string
		next  string
	}{
		{"none", Page{Limit: 2}, nil, nil, ""},
		{"first page", Page{Limit: 2}, items, []string{"a/1", "b/1", "b/2", "b/3"}, "b"},
		{"next page", Page{After: "b", Limit: 2}, items, []string{"c/1", "d/1", "d/2"}, ""},
		{"a merchant's items on one page", Page{After: "a", Limit: 1}, items, []string{"b/1", "b/2", "b/3"}, "b"},
		{"exactly the rest", Page{After: "c", Limit: 1}, items, []string{"d/1", "d/2"}, ""},
		{"after a merchant that is not listed", Page{After: "bb", Limit: 1}, items, []string{"c/1"}, "c"},
		{"after the last", Page{After: "d", Limit: 5}, items, []string{}, ""},
		{"every merchant", Page{Limit: 4}, items, items, ""},
		{"zero limit takes the default", Page{}, items, items, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			got, next := Cut(tt.page, tt.items, func(s string) string { m, _, _ := strings.Cut(s, "/"); return m })
			if !slices.Equal(got, tt.want) || next != tt.next {
				t.Fatalf("Cut(%+v) = %v, next %q; want %v, next %q", tt.page, got, next, tt.want, tt.next)
			}
		})
	}
}

func TestCutDefaultLimit(t *testing.T) {
	var ids []string
	for i := range DefaultLimit + 1 {
		ids = append(ids, fmt.Sprintf("m-%04d", i))
	}
	got, next := Cut(Page{}, ids, func(s string) string { return s })
	if len(got) != DefaultLimit || next != ids[DefaultLimit-1] {
		t.Fatalf("%d merchants, next %q; want %d, next %q", len(got), next, DefaultLimit, ids[DefaultLimit-1])
	}
}
