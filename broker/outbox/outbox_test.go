package outbox

import (
	"fmt"
	"strings"
	"sync"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"
)

// recvWithin is the deadline for a delivery the test waits for; a loaded
// machine may take a while to schedule the delivering goroutine.
const recvWithin = 10 * time.Second

func next(t *testing.T, ch <-chan Event) Event {
	t.Helper()
	select {
	case e := <-ch:
		return e
	case <-time.After(recvWithin):
		t.Fatal("no event delivered")
		return Event{}
	}
}

func ev(i int) Event { return Event{Name: fmt.Sprint("e", i), Data: map[string]any{"i": i}} }

// TestOutboxDeliversInOrderAfterStart: events put before Start wait for
// it; then they and the later ones arrive in the order they were put.
func TestOutboxDeliversInOrderAfterStart(t *testing.T) {
	got := make(chan Event, 10)
	o := New(10, func(e Event) { got <- e }, nil)
	t.Cleanup(o.Stop)
	for i := range 3 {
		if !o.Put(ev(i)) {
			t.Fatalf("Put(%d) before Start refused", i)
		}
	}
	select {
	case e := <-got:
		t.Fatalf("%s delivered before Start", e.Name)
	default:
	}
	o.Start()
	o.Start() // a second Start starts no second goroutine
	for i := 3; i < 6; i++ {
		o.Put(ev(i))
	}
	for i := range 6 {
		if e := next(t, got); e.Name != ev(i).Name || e.Data["i"] != i {
			t.Fatalf("delivery %d: %+v, want %+v", i, e, ev(i))
		}
	}
}

// TestOutboxNeverBlocksAndReportsRuns: with the consumer stuck, Put
// queues up to the size, then drops and counts without blocking, and
// reports the first drop of each run only.
func TestOutboxNeverBlocksAndReportsRuns(t *testing.T) {
	const size = 4
	got := make(chan Event, 100)
	// entered has room for every delivery: the consumer never waits on it.
	entered, release := make(chan struct{}, 100), make(chan struct{})
	type report struct {
		name  string
		total uint64
	}
	var reports []report // appended on the test's goroutine: Put calls dropped there
	o := New(size, func(e Event) {
		entered <- struct{}{}
		<-release
		got <- e
	}, func(e Event, total uint64) { reports = append(reports, report{e.Name, total}) })
	t.Cleanup(o.Stop)
	o.Start()
	o.Put(ev(0))
	<-entered // the consumer holds e0 and waits
	for i := 1; i <= size; i++ {
		if !o.Put(ev(i)) {
			t.Fatalf("Put(%d) refused with room in the queue", i)
		}
	}
	for i := size + 1; i <= size+3; i++ { // 3 dropped: one run
		if o.Put(ev(i)) {
			t.Fatalf("Put(%d) queued in a full queue", i)
		}
	}
	if want := []report{{"e5", 1}}; fmt.Sprint(reports) != fmt.Sprint(want) {
		t.Fatalf("drop reports %v, want %v (the first of the run)", reports, want)
	}

	release <- struct{}{} // e0 done; e1 taken
	<-entered
	if e := next(t, got); e.Name != "e0" {
		t.Fatalf("delivered %s, want e0", e.Name)
	}
	if !o.Put(ev(20)) { // room again: the run ends
		t.Fatal("Put refused with room in the queue")
	}
	if o.Put(ev(21)) {
		t.Fatal("Put queued in a full queue")
	}
	if want := []report{{"e5", 1}, {"e21", 4}}; fmt.Sprint(reports) != fmt.Sprint(want) {
		t.Fatalf("drop reports %v, want %v (a second run)", reports, want)
	}
	close(release)
	for _, want := range []string{"e1", "e2", "e3", "e4", "e20"} {
		if e := next(t, got); e.Name != want {
			t.Fatalf("delivered %s, want %s", e.Name, want)
		}
	}
}

// TestOutboxStop: a stopped Outbox refuses events without reporting drops,
// and a Start after Stop delivers nothing.
func TestOutboxStop(t *testing.T) {
	reported := false
	o := New(1, func(e Event) { t.Errorf("%s delivered after Stop", e.Name) },
		func(Event, uint64) { reported = true })
	o.Put(ev(0))
	o.Stop()
	o.Stop() // a second Stop is harmless
	o.Start()
	if o.Put(ev(1)) || o.Put(ev(2)) {
		t.Error("Put after Stop queued an event")
	}
	if reported {
		t.Error("events refused after Stop were reported as dropped")
	}
}

// TestOutboxConcurrentProducers: events put from several goroutines are
// all delivered, each producer's in its order.
func TestOutboxConcurrentProducers(t *testing.T) {
	const producers, each = 8, 100
	got := make(chan Event, producers*each)
	o := New(producers*each, func(e Event) { got <- e }, func(Event, uint64) { t.Error("an event was dropped with room in the queue") })
	t.Cleanup(o.Stop)
	o.Start()
	var wg sync.WaitGroup
	for p := range producers {
		wg.Go(func() {
			for i := range each {
				o.Put(Event{Name: fmt.Sprint("p", p), Data: map[string]any{"i": i}})
			}
		})
	}
	wg.Wait()
	last := map[string]int{}
	for range producers * each {
		e := next(t, got)
		i := e.Data["i"].(int)
		prev, seen := last[e.Name]
		if !seen {
			prev = -1
		}
		if i != prev+1 {
			t.Fatalf("%s: event %d after %d", e.Name, i, prev)
		}
		last[e.Name] = i
	}
}

// TestOutboxSurvivesAPanickingConsumer: a consumer that panics on an
// event loses that event, which is not reported as dropped; the
// delivering goroutine goes on with the next events (a panic there would
// end the whole process, which no HTTP server recovers). The panic is
// logged at Error with its value and stack, once per PanicLogInterval for
// events of one name, the next line telling how many were left out.
func TestOutboxSurvivesAPanickingConsumer(t *testing.T) {
	got := make(chan Event, 10)
	o := New(10, func(e Event) {
		if e.Name == "boom" {
			panic(fmt.Sprint("handler bug ", e.Data["i"]))
		}
		got <- e
	}, func(e Event, _ uint64) { t.Errorf("%s reported dropped", e.Name) })
	core, logs := observer.New(zap.ErrorLevel)
	t0 := time.Unix(1_700_000_000, 0)
	now := t0 // set between deliveries: Put and the delivery order the accesses
	o.LogPanics(zap.New(core), func() time.Time { return now })
	t.Cleanup(o.Stop)
	o.Start()
	boom := func(i int) Event { return Event{Name: "boom", Data: map[string]any{"i": i}} }
	deliver := func(events ...Event) { // then waits for an event after them, delivered once they were
		t.Helper()
		for _, e := range append(events, ev(0)) {
			o.Put(e)
		}
		if e := next(t, got); e.Name != ev(0).Name {
			t.Fatalf("delivered %s, want %s", e.Name, ev(0).Name)
		}
	}

	deliver(boom(1), boom(2), boom(3))
	now = t0.Add(PanicLogInterval - time.Second)
	deliver(boom(4))
	now = t0.Add(PanicLogInterval)
	deliver(boom(5), boom(6))

	lines := logs.All()
	if len(lines) != 2 {
		t.Fatalf("%d lines logged for 6 panics, want 2 (one per interval): %v", len(lines), lines)
	}
	for i, want := range []struct {
		panic      string
		suppressed int64
	}{{"handler bug 1", 0}, {"handler bug 5", 3}} {
		f := lines[i].ContextMap()
		if lines[i].Level != zap.ErrorLevel || f["event"] != "boom" || f["panic"] != want.panic {
			t.Errorf("line %d: %s %q %v, want error of event boom, panic %q", i, lines[i].Level, lines[i].Message, f, want.panic)
		}
		if stack, _ := f["stack"].(string); !strings.Contains(stack, "TestOutboxSurvivesAPanickingConsumer") {
			t.Errorf("line %d: stack %q, want the consumer's", i, stack)
		}
		if n, _ := f["suppressed"].(int64); n != want.suppressed {
			t.Errorf("line %d: suppressed %v, want %d", i, f["suppressed"], want.suppressed)
		}
	}
}
