package main

import (
	"flag"
	"strings"
	"testing"
	"time"
)

// TestBudgetValidate: the budget mode's defaults fit the budget (the keys'
// refreshes within three quarters of the rate); a shape whose refreshes
// the budget cannot carry is refused, saying what fits.
func TestBudgetValidate(t *testing.T) {
	defaults := func() budgetOptions {
		var b budgetOptions
		fs := flag.NewFlagSet("bench", flag.ContinueOnError)
		budgetFlags(fs, &b)
		b.on = true
		return b
	}
	for _, tt := range []struct {
		name string
		edit func(*budgetOptions)
		want string // "" when valid
	}{
		{"defaults", func(*budgetOptions) {}, ""},
		{"1000 keys of 60s tokens at 20/s", func(b *budgetOptions) { b.orgs = 1000 }, "lower -budget-orgs to at most 900"},
		{"longer tokens carry them", func(b *budgetOptions) { b.orgs, b.lifetime = 1000, 2*time.Minute }, ""},
		{"at three quarters exactly", func(b *budgetOptions) { b.orgs = 900 }, ""},
	} {
		t.Run(tt.name, func(t *testing.T) {
			b := defaults()
			tt.edit(&b)
			err := b.validate()
			if tt.want == "" && err != nil || tt.want != "" && (err == nil || !strings.Contains(err.Error(), tt.want)) {
				t.Errorf("validate: %v, want %q", err, tt.want)
			}
		})
	}
}
