package breaker

import (
	"errors"
	"testing"
	"time"
)

// step is one call against the breaker: the clock moves by advance, then
// Allow is asked; when it lets the call through, outcome is recorded.
type step struct {
	advance time.Duration
	outcome Outcome
	allowed bool  // what Allow must answer
	state   State // the state after the step
}

func TestBreaker(t *testing.T) {
	const cooldown = 10 * time.Second
	fail := func(s State) step { return step{outcome: Failed, allowed: true, state: s} }
	refused := func(s State) step { return step{allowed: false, state: s} }
	tests := []struct {
		name  string
		steps []step
	}{
		{"opens after the threshold", []step{fail(Closed), fail(Closed), fail(Open), refused(Open)}},
		{"a success resets the count", []step{fail(Closed), fail(Closed), {outcome: Healthy, allowed: true}, fail(Closed), fail(Closed), fail(Open)}},
		{"an answer keeps the count", []step{fail(Closed), fail(Closed), {outcome: Answered, allowed: true}, fail(Open)}},
		{"one probe after the cooldown, its success closes", []step{fail(Closed), fail(Closed), fail(Open),
			{advance: cooldown, outcome: Healthy, allowed: true, state: Closed}, fail(Closed)}},
		{"the probe's failure opens again", []step{fail(Closed), fail(Closed), fail(Open),
			{advance: cooldown, outcome: Failed, allowed: true, state: Open}, {advance: cooldown - time.Second, state: Open}}},
		{"an answer to the probe closes", []step{fail(Closed), fail(Closed), fail(Open),
			{advance: cooldown, outcome: Answered, allowed: true, state: Closed}}},
		{"a caller giving up releases the probe", []step{fail(Closed), fail(Closed), fail(Open),
			{advance: cooldown, outcome: Unknown, allowed: true, state: HalfOpen}, {outcome: Healthy, allowed: true, state: Closed}}},
		{"a clock gone back does not extend the cooldown", []step{fail(Closed), fail(Closed), fail(Open),
			{advance: -time.Hour, outcome: Healthy, allowed: true, state: Closed}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			run(t, &Breaker{Threshold: 3, Cooldown: cooldown}, tt.steps)
		})
	}
}

// run takes b through steps, from a fixed time, and fails t at the first
// step whose Allow answer, refusal wait or state is not the step's.
func run(t *testing.T, b *Breaker, steps []step) {
	t.Helper()
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	for i, s := range steps {
		now = now.Add(s.advance)
		ok, wait, _, _ := b.Allow(now)
		if ok != s.allowed {
			t.Fatalf("step %d: allowed %v, want %v", i, ok, s.allowed)
		}
		if ok {
			b.Record(now, s.outcome, errors.New("down"))
		} else if wait <= 0 || wait > b.Cooldown {
			t.Fatalf("step %d: wait %s", i, wait)
		}
		if got := b.State(); got != s.state {
			t.Fatalf("step %d: state %s, want %s", i, got, s.state)
		}
	}
}

// In half-open only one call at a time probes; one never reported stops
// blocking after a cooldown.
func TestBreakerOneProbe(t *testing.T) {
	b := &Breaker{Threshold: 1, Cooldown: time.Minute}
	now := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	b.Allow(now)
	b.Record(now, Failed, errors.New("down"))
	now = now.Add(time.Minute)
	if ok, _, changed, _ := b.Allow(now); !ok || !changed {
		t.Fatalf("probe: allowed %v changed %v, want both", ok, changed)
	}
	if ok, _, _, cause := b.Allow(now); ok || cause == nil {
		t.Fatalf("a second call during the probe: allowed %v, cause %v", ok, cause)
	}
	if b.Idle(now.Add(time.Minute - time.Second)) {
		t.Fatal("idle with a probe out")
	}
	now = now.Add(time.Minute)
	if ok, _, _, _ := b.Allow(now); !ok {
		t.Fatal("a lost probe still blocks after a cooldown")
	}
	if from, to := b.Record(now, Healthy, nil); from != HalfOpen || to != Closed {
		t.Fatalf("Record: %s -> %s", from, to)
	}
	if !b.Idle(now.Add(time.Second)) {
		t.Fatal("a closed, unused breaker is not idle")
	}
}

// A probe out keeps the breaker from being dropped while its time lasts;
// one never reported counts as none once its time ended by the cutoff, so
// that a lost probe does not keep a half-open breaker forever.
func TestBreakerIdleProbe(t *testing.T) {
	const cooldown = time.Minute
	start := time.Date(2030, 1, 1, 0, 0, 0, 0, time.UTC)
	probeAt := start.Add(cooldown)
	tests := []struct {
		name   string
		cutoff time.Time
		idle   bool
	}{
		{"probe out, cutoff just after its call", probeAt.Add(time.Second), false},
		{"probe out, cutoff before its time ends", probeAt.Add(cooldown - time.Second), false},
		{"lost probe, cutoff when its time ends", probeAt.Add(cooldown), true},
		{"lost probe, cutoff an hour later", probeAt.Add(time.Hour), true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			b := &Breaker{Threshold: 1, Cooldown: cooldown}
			b.Allow(start)
			b.Record(start, Failed, errors.New("down"))
			if ok, _, changed, _ := b.Allow(probeAt); !ok || !changed {
				t.Fatalf("probe: allowed %v changed %v, want both", ok, changed)
			}
			if got := b.Idle(tt.cutoff); got != tt.idle || b.State() != HalfOpen {
				t.Fatalf("Idle(%s) = %v in state %s, want %v in half-open", tt.cutoff.Sub(probeAt), got, b.State(), tt.idle)
			}
		})
	}
}

// Slow outcomes open the breaker only once they have lasted SlowSpan
// without a healthy answer; failures open it after Threshold as before.
func TestBreakerSlow(t *testing.T) {
	const span = 2 * time.Second
	slow := func(advance time.Duration, s State) step {
		return step{advance: advance, outcome: Slow, allowed: true, state: s}
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"a burst of slow answers keeps it closed", []step{slow(0, Closed), slow(0, Closed), slow(0, Closed),
			slow(0, Closed), slow(0, Closed), slow(time.Second, Closed), slow(time.Second/2, Closed)}},
		{"slow answers that last the span count as failures", []step{slow(0, Closed), slow(time.Second, Closed),
			slow(time.Second, Closed), slow(0, Closed), slow(0, Open)}},
		{"a healthy answer restarts the span", []step{slow(0, Closed), slow(1500*time.Millisecond, Closed),
			{outcome: Healthy, allowed: true, state: Closed}, slow(time.Second, Closed), slow(time.Second, Closed),
			slow(time.Second/2, Closed), slow(time.Second/2, Closed), slow(0, Closed), slow(0, Open)}},
		{"an answer restarts the span", []step{slow(0, Closed), slow(1500*time.Millisecond, Closed),
			{outcome: Answered, allowed: true, state: Closed}, slow(time.Second, Closed), slow(0, Closed), slow(0, Closed)}},
		{"failures still open at the threshold", []step{slow(0, Closed), {outcome: Failed, allowed: true, state: Closed},
			{outcome: Failed, allowed: true, state: Closed}, slow(0, Closed), {outcome: Failed, allowed: true, state: Open}}},
		{"a slow probe within the span is released", []step{{outcome: Failed, allowed: true}, {outcome: Failed, allowed: true},
			{outcome: Failed, allowed: true, state: Open}, slow(10*time.Second, HalfOpen), {outcome: Healthy, allowed: true, state: Closed}}},
		{"a slow probe after the span opens again", []step{slow(0, Closed), slow(span, Closed), slow(0, Closed), slow(0, Open),
			slow(10*time.Second, Open)}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			run(t, &Breaker{Threshold: 3, Cooldown: 10 * time.Second, SlowSpan: span}, tt.steps)
		})
	}
}

// Without SlowSpan, each slow outcome is a failure at once; a clock gone
// back restarts the span rather than ending it.
func TestBreakerSlowSpanEdges(t *testing.T) {
	slow := func(advance time.Duration, s State) step {
		return step{advance: advance, outcome: Slow, allowed: true, state: s}
	}
	t.Run("zero span", func(t *testing.T) {
		run(t, &Breaker{Threshold: 3, Cooldown: time.Second}, []step{slow(0, Closed), slow(0, Closed), slow(0, Open)})
	})
	t.Run("clock gone back", func(t *testing.T) {
		run(t, &Breaker{Threshold: 2, Cooldown: time.Second, SlowSpan: 2 * time.Second}, []step{
			slow(0, Closed), slow(-time.Hour, Closed), slow(time.Second, Closed), slow(time.Second, Closed), slow(0, Open)})
	})
}
