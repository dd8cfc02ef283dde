package module

import (
	"maps"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/outbox"
)

// TestEmitKeepsTheContractsData: emit passes the event's name and what
// opstate.EventData keeps of its data.
func TestEmitKeepsTheContractsData(t *testing.T) {
	got := make(chan outbox.Event, 1)
	a := &App{events: outbox.New(1, func(e outbox.Event) { got <- e }, nil)}
	t.Cleanup(a.events.Stop)
	a.events.Start()
	a.emit(opstate.EventTokenRefused, map[string]any{"merchant": "acme", "provider": "np", "error": "token_refused",
		"state": opstate.StateRefused, "token": "tok-secret"})
	want := map[string]any{"merchant": "acme", "provider": "np", "error": "token_refused", "state": opstate.StateRefused}
	select {
	case e := <-got:
		if e.Name != opstate.EventTokenRefused || !maps.Equal(e.Data, want) {
			t.Errorf("emitted %s %v, want %s %v", e.Name, e.Data, opstate.EventTokenRefused, want)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("nothing emitted")
	}
}

// TestEmitWithoutEvents: an app without an events app (none configured)
// emits nothing, without failing.
func TestEmitWithoutEvents(t *testing.T) {
	(&App{}).emit(opstate.EventProviderRecovered, map[string]any{"provider": "np"})
}
