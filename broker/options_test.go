package broker

import (
	"strings"
	"testing"
	"time"
)

func TestParseFraction(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want float64
		ok   bool
	}{
		{"0.25", 0.25, true},
		{"25%", 0.25, true},
		{"0.999", 0.999, true},
		{"0", 0, false},
		{"1", 0, false},
		{"100%", 0, false},
		{"-0.1", 0, false},
		{"a quarter", 0, false},
		{"%", 0, false},
	} {
		got, err := ParseFraction(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("ParseFraction(%q) = %v, %v; want %v, ok %t", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

// TestOptionsCheck: the first option out of range is named by its setting,
// in the order refresh_window, leeway, fetch_timeout, budget_wait; the zero
// value (the defaults) passes.
func TestOptionsCheck(t *testing.T) {
	for _, tt := range []struct {
		opts Options
		want string // "" passes
	}{
		{Options{}, ""},
		{Options{RefreshWindow: 0.5, Leeway: time.Second}, ""},
		{Options{RefreshWindow: 1}, "refresh_window 1 must be at least 0 and below 1"},
		{Options{RefreshWindow: -0.5, Leeway: -time.Second}, "refresh_window -0.5"},
		{Options{Leeway: -time.Second, FetchTimeout: -2 * time.Second, BudgetWait: -3 * time.Second}, "leeway -1s must not be negative"},
		{Options{FetchTimeout: -2 * time.Second, BudgetWait: -3 * time.Second}, "fetch_timeout -2s must not be negative"},
		{Options{BudgetWait: -3 * time.Second}, "budget_wait -3s must not be negative"},
	} {
		err := tt.opts.Check()
		if (tt.want == "") != (err == nil) || err != nil && !strings.Contains(err.Error(), tt.want) {
			t.Errorf("%+v: Check() = %v, want %q", tt.opts, err, tt.want)
		}
	}
}
