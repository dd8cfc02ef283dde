package opstate

import (
	"maps"
	"testing"
)

// TestEventData: an event keeps only the data keys merchant, provider,
// error and state with non-empty string values, whatever its caller
// adds.
func TestEventData(t *testing.T) {
	for _, tt := range []struct {
		name string
		data map[string]any
		want map[string]any
	}{
		{"the contract's keys", map[string]any{"merchant": "acme", "provider": "np", "error": "token_refused", "state": StateUnknownOrganisation},
			map[string]any{"merchant": "acme", "provider": "np", "error": "token_refused", "state": StateUnknownOrganisation}},
		{"other keys are left out", map[string]any{"provider": "np", "token": "tok-secret", "refresh_token": "rt-secret", "api_key": "key"},
			map[string]any{"provider": "np"}},
		{"only strings, not empty", map[string]any{"merchant": "", "provider": []byte("np"), "error": 7, "state": nil},
			map[string]any{}},
		{"no data", nil, map[string]any{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := EventData(tt.data); !maps.Equal(got, tt.want) {
				t.Errorf("%v, want %v", got, tt.want)
			}
		})
	}
}

// TestRankConstantsFollowStates: each rank constant is its state's index
// in States, so that merchants are ranked worst first.
func TestRankConstantsFollowStates(t *testing.T) {
	for _, tc := range []struct {
		state string
		want  rank
	}{
		{StateRefused, rankRefused},
		{StateUnknownOrganisation, rankUnknownOrganisation},
		{StateNeedsConsent, rankNeedsConsent},
		{StateBackingOff, rankBackingOff},
		{StateRefreshing, rankRefreshing},
		{StateFresh, rankFresh},
		{StateIdle, rankIdle},
		{"", rankIdle},
		{"no such state", rankIdle},
	} {
		if got := rankOf(tc.state); got != tc.want {
			t.Errorf("rankOf(%q) = %d, want %d", tc.state, got, tc.want)
		}
	}
	if n := len(States()); n != int(rankIdle)+1 {
		t.Errorf("%d states, %d ranks", n, rankIdle+1)
	}
}
