// Package outbox hands events to a consumer that may be slow (Caddy's
// events app runs its handlers synchronously, and a handler may run a
// command or call a web hook) without making their producers wait: the
// events queue up to a bound and one goroutine delivers them in order.
package outbox

import (
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/internal/lograte"
)

// Event is one event: its name and its data.
type Event struct {
	// Name is the event's name.
	Name string
	// Data is the event's data; it is not copied, so the producer must
	// not change it after Put.
	Data map[string]any
}

// Outbox queues events for one delivering goroutine. Put never blocks:
// when the queue is full the event is dropped and counted. Events put
// before Start wait in the queue for it. It is safe for concurrent use.
type Outbox struct {
	deliver func(Event)
	dropped func(e Event, total uint64)

	queue     chan Event
	startOnce sync.Once
	stopOnce  sync.Once
	stop      chan struct{}

	drops atomic.Uint64
	full  atomic.Bool // a drop was reported and no event was queued since

	logger *zap.Logger              // logs the consumer's panics (LogPanics); nil: not logged
	panics *lograte.Limiter[string] // limits those lines, by event name
}

// New returns an Outbox that queues up to size events for deliver. dropped,
// if not nil, is called on the producer's goroutine with the first event
// of each run of dropped events (a run ends when an event is queued again)
// and the count of events dropped so far: enough to log a consumer that
// falls behind without logging every event lost. An event deliver panics
// on is lost too, without counting it as dropped: the delivering goroutine
// goes on with the next event (a panic there would end the process: no
// HTTP server recovers it), and the panic is logged if LogPanics was
// called.
func New(size int, deliver func(Event), dropped func(e Event, total uint64)) *Outbox {
	return &Outbox{deliver: deliver, dropped: dropped, queue: make(chan Event, size),
		stop: make(chan struct{})}
}

// PanicLogInterval is how often an Outbox logs its consumer's panics on
// events of one name (LogPanics).
const PanicLogInterval = time.Minute

// LogPanics makes o log, on logger at Error, an event its consumer
// panicked on, with the panic's value and stack: for events of one name,
// the first panic, then at most one per PanicLogInterval on the clock now
// (time.Now when nil), telling how many were left out ("suppressed",
// "suppressed_since"), so that a consumer that panics on every event does
// not log every event. Call it before Start.
func (o *Outbox) LogPanics(logger *zap.Logger, now func() time.Time) {
	if now == nil {
		now = time.Now
	}
	o.logger = logger
	o.panics = &lograte.Limiter[string]{Every: PanicLogInterval, Now: now}
}

// Put queues e for delivery and reports whether it was queued: false when
// the queue is full (the event is dropped and counted) or the Outbox is
// stopped.
func (o *Outbox) Put(e Event) bool {
	select {
	case <-o.stop:
		return false
	default:
	}
	select {
	case o.queue <- e:
		if o.full.Load() {
			o.full.Store(false)
		}
		return true
	default:
	}
	total := o.drops.Add(1)
	if o.full.CompareAndSwap(false, true) && o.dropped != nil {
		o.dropped(e, total)
	}
	return false
}

// Start starts delivering, in the order they were put, on one goroutine.
// Calls after the first, and calls after Stop, do nothing.
func (o *Outbox) Start() {
	o.startOnce.Do(func() {
		select {
		case <-o.stop:
		default:
			go o.run()
		}
	})
}

// Stop stops delivering: the event being delivered ends, the queued ones
// are dropped (not counted) and Put refuses new ones. It does not wait for
// the delivery in hand, so a consumer that hangs does not hang the caller.
// Calls after the first do nothing.
func (o *Outbox) Stop() {
	o.stopOnce.Do(func() { close(o.stop) })
}

func (o *Outbox) run() {
	for {
		select {
		case <-o.stop:
			return
		case e := <-o.queue:
			select {
			case <-o.stop: // stopped while both were ready: stop wins
				return
			default:
			}
			o.deliverOne(e)
		}
	}
}

// deliverOne delivers e, and recovers and logs (LogPanics) a panic of
// deliver on it.
func (o *Outbox) deliverOne(e Event) {
	defer func() {
		v := recover()
		if v == nil || o.logger == nil {
			return
		}
		ok, left := o.panics.Allow(e.Name)
		if !ok {
			return
		}
		fields := []zap.Field{zap.String("event", e.Name), zap.Any("panic", v), zap.Stack("stack")}
		if left.Count > 0 {
			fields = append(fields, zap.Int("suppressed", left.Count), zap.Time("suppressed_since", left.Since))
		}
		o.logger.Error("event lost: an events app handler panicked on it; fix or remove the handler", fields...)
	}()
	o.deliver(e)
}
