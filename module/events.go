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
// has one; without it emit does nothing. Caddy's Emit runs the handlers
// synchronously and they may be slow, while events come from the token
// path: emit only queues them (outbox.Outbox, at most eventQueueSize,
// then dropped, counted and logged), and one goroutine hands them to Emit
// in order, from Caddy's "started" event (the events app has built its
// subscriptions) until the app stops. {event.module} is "token_broker".
func (a *App) provisionEvents(ctx caddy.Context) error {
	appIface, err := ctx.AppIfConfigured("events")
	if errors.Is(err, caddy.ErrNotConfigured) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("token_broker: getting the events app: %w", err)
	}
	events := appIface.(*caddyevents.App)
	a.events = outbox.New(eventQueueSize, func(e outbox.Event) {
		events.Emit(ctx, e.Name, e.Data)
	}, func(e outbox.Event, total uint64) {
		a.logger.Warn("event dropped: the events app's handlers fall behind; the admin state (GET /token_broker/state) has the merchants' and providers' states",
			zap.String("event", e.Name), zap.Uint64("dropped_so_far", total), zap.Int("queue", eventQueueSize))
	})
	a.events.LogPanics(a.logger, nil)
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
