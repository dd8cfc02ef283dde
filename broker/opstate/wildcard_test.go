package opstate

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

// TestWildcardRecordFollowsBinding: the tracker remembers a wildcard
// merchant while the table holds a binding of it. A request holding a
// binding that the table evicts before its token request ends (a flood of
// ids takes the unserved slots) leaves no record behind, whatever the
// number of such ids; the merchant back with a binding of its own is
// recorded, also when its new binding's request joins the fetch that the
// evicted binding's request started (the fetch is told with the evicted
// binding): its view shows the failure, and its event is emitted.
//
// The stateTOML wildcard has max_active 2; its w-unknown… ids fail (404).
// Steps: brokertest.InFlight's ("hold ID" a request takes ID's binding,
// no token request yet; "fetch ID" that request's token request; "flood
// N"), "get ID" a whole request, "start ID" a request takes ID's binding
// and its token request starts, held in the token API until "end", "join
// ID" a whole request of ID in the background (its token request joins
// the one started, of the same key), "+3h" the clock.
func TestWildcardRecordFollowsBinding(t *testing.T) {
	for _, tt := range []struct {
		name   string
		steps  []string
		want   []string // the merchants the tracker remembers
		states []string // among the merchants of the view, "ID state"
		events []string // among the events emitted
	}{
		{"held: its failure is kept", []string{"hold w-unknown1", "fetch w-unknown1"}, []string{"w-unknown1"}, nil, nil},
		{"evicted after its failure", []string{"hold w-unknown1", "fetch w-unknown1", "get w-unknown2", "get w-unknown3"},
			[]string{"w-unknown2", "w-unknown3"}, nil, nil},
		{"evicted while in flight", []string{"hold w-unknown1", "get w-unknown2", "get w-unknown3", "fetch w-unknown1"},
			[]string{"w-unknown2", "w-unknown3"}, nil, nil},
		{"evicted while in flight, back with a new binding", []string{"hold w-unknown1", "get w-unknown2", "get w-unknown3",
			"get w-unknown1", "fetch w-unknown1"}, []string{"w-unknown1", "w-unknown3"}, nil, nil},
		{"evicted while in flight, back with a new binding joining the fetch", []string{"start w-unknown1", "get w-unknown2",
			"get w-unknown3", "join w-unknown1", "end"}, []string{"w-unknown1", "w-unknown3"},
			[]string{"w-unknown1 unknown_organisation"},
			[]string{"merchant_token_refused merchant=w-unknown1 provider=nuapay error=token_refused state=unknown_organisation"}},
		{"evicted while in flight, then idle evictions", []string{"hold w-unknown1", "get w-unknown2", "get w-unknown3",
			"fetch w-unknown1", "+3h", "get w-fresh1", "get w-fresh2"}, nil, nil, nil},
		{"a flood of ids in flight", []string{"flood 500"}, []string{"w-unknown-498", "w-unknown-499"}, nil, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newStateFixture(t)
			d := brokertest.InFlight{Broker: f.br, Flood: "w-unknown-", Bind: func(id string) (*broker.Binding, error) {
				b, err := f.table.Get(id, hooks{f})
				if err != nil {
					return nil, err
				}
				return &b.Binding, nil
			}}
			// The token request "start" holds, and the requests in the
			// background.
			var (
				started    atomic.Bool
				entered    = make(chan struct{})
				release    = make(chan struct{})
				background sync.WaitGroup
			)
			f.gate = func(org string) {
				if strings.HasPrefix(org, "w-unknown") && started.CompareAndSwap(true, false) {
					close(entered)
					<-release
				}
			}
			failsInBackground := func(b *broker.Binding) {
				background.Go(func() {
					if err := d.Failed(b); err != nil {
						t.Error(err)
					}
				})
			}
			for _, step := range tt.steps {
				if d.Step(t, step) {
					continue
				}
				verb, arg, _ := strings.Cut(step, " ")
				switch verb {
				case "get":
					_ = f.get(t, arg)
				case "start":
					b := d.Hold(t, arg)
					started.Store(true)
					failsInBackground(b)
					<-entered
				case "join":
					failsInBackground(d.Hold(t, arg))
				case "end":
					close(release)
					background.Wait()
				default:
					dur, err := time.ParseDuration(step)
					if err != nil {
						t.Fatalf("step %q", step)
					}
					f.clk.Add(dur)
				}
			}
			if got := slices.Sorted(maps.Keys(records(f.tracker))); !slices.Equal(got, tt.want) {
				if len(got) > 10 {
					got = append(got[:10], fmt.Sprintf("… (%d)", len(got)))
				}
				t.Errorf("the tracker remembers %q, want %q", got, tt.want)
			}
			view := page(Build(f.sources(), Query{}, f.clk.Now()))
			for _, s := range tt.states {
				if !slices.Contains(view, s) {
					t.Errorf("the view has no %q: %q", s, view)
				}
			}
			for _, e := range tt.events {
				if !slices.Contains(f.events.events, e) {
					t.Errorf("no event %q: %q", e, f.events.events)
				}
			}
		})
	}
}

// TestTrackerFullKeepsListedMerchants: with its records full, the
// tracker drops a wildcard merchant's record for a new one, never records
// a new wildcard merchant in place of an explicit one, replaces an
// explicit one for another explicit one when none is a wildcard
// merchant's; the report counts the records lost. MaxMerchants is 2.
func TestTrackerFullKeepsListedMerchants(t *testing.T) {
	for _, tt := range []struct {
		name    string
		gets    []string // requests, in order (w-unknown…: wildcard merchants)
		kept    []string // among the merchants remembered
		dropped uint64
	}{
		{"not full", []string{"w-unknown1", "b-refused"}, []string{"b-refused", "w-unknown1"}, 0},
		{"a wildcard merchant's record goes for an explicit one", []string{"w-unknown1", "w-unknown2", "b-refused"}, []string{"b-refused"}, 1},
		{"and for another wildcard merchant's", []string{"w-unknown1", "b-refused", "w-unknown2"}, []string{"b-refused", "w-unknown2"}, 1},
		{"no explicit merchant's goes for a wildcard one", []string{"b-refused", "c-unknown", "w-unknown1", "w-unknown2"},
			[]string{"b-refused", "c-unknown"}, 2},
		{"an explicit merchant's goes for another", []string{"b-refused", "c-unknown", "g-consent"}, []string{"g-consent"}, 1},
		{"wildcard merchants evicted, then explicit ones", []string{"w-unknown1", "w-unknown2", "w-unknown3", "b-refused", "c-unknown", "g-consent"},
			[]string{"g-consent"}, 3},
		{"a remembered merchant failing again drops none", []string{"w-unknown1", "b-refused", "w-unknown1"}, []string{"b-refused", "w-unknown1"}, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newStateFixture(t)
			f.tracker = NewTracker(TrackerOptions{Now: f.clk.Now, MaxMerchants: 2})
			f.rec = telemetry.ForRegistry(nil, f.tracker, zap.NewNop(), f.table, f.reg, f.br)
			for _, id := range tt.gets {
				_ = f.get(t, id)
			}
			got := records(f.tracker)
			for _, id := range tt.kept {
				if _, ok := got[id]; !ok {
					t.Errorf("%s not remembered (remembered: %v)", id, slices.Sorted(maps.Keys(got)))
				}
			}
			if len(got) > 2 {
				t.Errorf("%d merchants remembered, want at most 2", len(got))
			}
			if r := Build(f.sources(), Query{}, f.clk.Now()); r.RecordsDropped != tt.dropped {
				t.Errorf("records_dropped %d, want %d", r.RecordsDropped, tt.dropped)
			}
		})
	}
}
