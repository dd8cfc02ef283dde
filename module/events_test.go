package module

import (
	"maps"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/outbox"
)

// TestEmitKeepsTheContractsData: emit passes the event's name and only
// the data keys merchant, provider and error with non-empty string
// values, whatever its caller adds.
func TestEmitKeepsTheContractsData(t *testing.T) {
	got := make(chan outbox.Event, 10)
	a := &App{events: outbox.New(10, func(e outbox.Event) { got <- e }, nil)}
	t.Cleanup(a.events.Stop)
	a.events.Start()
	for _, tt := range []struct {
		name string
		data map[string]any
		want map[string]any
	}{
		{"the contract's keys", map[string]any{"merchant": "acme", "provider": "np", "error": "token_refused"},
			map[string]any{"merchant": "acme", "provider": "np", "error": "token_refused"}},
		{"other keys are left out", map[string]any{"provider": "np", "token": "tok-secret", "refresh_token": "rt-secret", "api_key": "key"},
			map[string]any{"provider": "np"}},
		{"only strings, not empty", map[string]any{"merchant": "", "provider": []byte("np"), "error": 7},
			map[string]any{}},
		{"no data", nil, map[string]any{}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			a.emit(opstate.EventTokenRefused, tt.data)
			select {
			case e := <-got:
				if e.Name != opstate.EventTokenRefused || !maps.Equal(e.Data, tt.want) {
					t.Errorf("emitted %s %v, want %s %v", e.Name, e.Data, opstate.EventTokenRefused, tt.want)
				}
			case <-time.After(10 * time.Second):
				t.Fatal("nothing emitted")
			}
		})
	}
}

// TestEmitWithoutEvents: an app without an events app (none configured)
// emits nothing, without failing.
func TestEmitWithoutEvents(t *testing.T) {
	(&App{}).emit(opstate.EventProviderRecovered, map[string]any{"provider": "np"})
}
