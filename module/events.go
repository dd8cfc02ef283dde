package module

import (
	"context"
	"errors"
	"fmt"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyevents"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/outbox"
)

// eventQueueSize is how many events wait for the events app's handlers;
// beyond it events are dropped, counted and logged (outbox.Outbox).
const eventQueueSize = 1024

// provisionEvents connects the app to Caddy's events app when the config
// has one: the events global option (apps.events) holds the
// subscriptions, so without it nothing would handle the events and emit
// does nothing (an events app that another app loaded first, as caddytls
// does, is used all the same). The events are emitted with ctx, so their
// origin is the token_broker app (the {event.module} placeholder is
// "token_broker").
//
// Caddy's Emit runs the subscribed handlers synchronously, and a handler
// may be slow (an exec handler running a command in the foreground, a web
// hook). The events come from the token path and from background
// refreshes, which must not wait on them: emit only queues the event, and
// one goroutine of the app hands the events to Emit in order. That
// goroutine starts on Caddy's "started" event, once every app of the
// config has started: the events app builds its subscriptions in its
// Start, which Caddy runs in no fixed order with the others, and Emit
// reads them. Events emitted before then wait in the queue (TestEvents in
// integration/ shows they arrive). The goroutine stops with the app. When
// the handlers fall behind by eventQueueSize events, later ones are
// dropped and a warning says how many so far.
func (a *App) provisionEvents(ctx caddy.Context) error {
	appIface, err := ctx.AppIfConfigured("events")
	if errors.Is(err, caddy.ErrNotConfigured) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("token_broker: getting the events app: %w", err)
	}
	events := appIface.(*caddyevents.App)
	logger := a.logger
	a.events = outbox.New(eventQueueSize, func(e outbox.Event) {
		events.Emit(ctx, e.Name, e.Data)
	}, func(e outbox.Event, total uint64) {
		logger.Warn("event dropped: the events app's handlers fall behind; the admin state (GET /token_broker/state) has the merchants' and providers' states",
			zap.String("event", e.Name), zap.Uint64("dropped_so_far", total), zap.Int("queue", eventQueueSize))
	})
	return events.On("started", startDelivery{a.events})
}

// emit emits a token broker event (one of opstate.Event*) through Caddy's
// events app, without waiting for its handlers (see provisionEvents),
// with what opstate.EventData keeps of data. It does nothing without an
// events app.
func (a *App) emit(event string, data map[string]any) {
	if a.events == nil {
		return
	}
	a.events.Put(outbox.Event{Name: event, Data: opstate.EventData(data)})
}

// startDelivery is the events app handler of Caddy's "started" event that
// starts the delivery of the app's events.
type startDelivery struct{ events *outbox.Outbox }

// Handle starts the delivery.
func (s startDelivery) Handle(context.Context, caddy.Event) error {
	s.events.Start()
	return nil
}

// Interface guard.
var _ caddyevents.Handler = startDelivery{}
