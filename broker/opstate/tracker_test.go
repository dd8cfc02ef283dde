package opstate

import (
	"context"
	"errors"
	"fmt"
	"maps"
	"net"
	"os"
	"slices"
	"syscall"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"go.uber.org/zap"
)

// Errors as the sources return them.
var (
	errRefused  = &broker.APIError{Provider: "nuapay", StatusCode: 403, Code: "forbidden"}
	errBadKey   = &broker.APIError{Provider: "nuapay", StatusCode: 401}
	errUnknown  = &broker.APIError{Provider: "nuapay", StatusCode: 404, Err: broker.ErrUnknownOrganisation}
	errDown     = &broker.APIError{Provider: "nuapay", StatusCode: 503}
	errThrottle = &broker.APIError{Provider: "nuapay", StatusCode: 429}
	errConsent  = &oauth.ConsentRequiredError{Provider: "bank", Merchant: "m", Err: oauth.ErrNoRefreshToken}
)

func TestFailureState(t *testing.T) {
	for _, tt := range []struct {
		name string
		err  error
		want string
	}{
		{"a permanent refusal", errRefused, StateRefused},
		{"a refused API key", errBadKey, StateRefused},
		{"a request that cannot succeed", &broker.RequestError{Merchant: "m", Field: "scopes", Reason: "none"}, StateRefused},
		{"an unknown organisation", errUnknown, StateUnknownOrganisation},
		{"a 404 the source did not recognise", &broker.APIError{Provider: "oauth2", StatusCode: 404}, StateRefused},
		{"consent required", fmt.Errorf("wrapped: %w", errConsent), StateNeedsConsent},
		{"provider down", errDown, StateBackingOff},
		{"rate limited", errThrottle, StateBackingOff},
		{"a timeout", context.DeadlineExceeded, StateBackingOff},
		{"a breaker open", &broker.UnavailableError{SourceID: "nuapay#1", Err: errDown}, StateBackingOff},
	} {
		t.Run(tt.name, func(t *testing.T) {
			if got := failureState(tt.err, errcode.Classify(tt.err)); got != tt.want {
				t.Errorf("failureState(%v) = %q, want %q", tt.err, got, tt.want)
			}
		})
	}
}

// emitted records the events a Tracker emits.
type emitted struct{ events []string }

func (e *emitted) emit(event string, data map[string]any) {
	s := event
	for _, k := range []string{"merchant", "provider", "error", "state"} {
		if v, ok := data[k]; ok {
			s += fmt.Sprintf(" %s=%v", k, v)
		}
	}
	e.events = append(e.events, s)
}

// errRedisRefused is a refused connection to Redis, as a dial returns it.
var errRedisRefused = &net.OpError{Op: "dial", Net: "tcp", Err: os.NewSyscallError("connect", syscall.ECONNREFUSED)}

// TestFleetErrorClass: a fleet tier failure's event names its kind, not
// its text.
func TestFleetErrorClass(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{errRedisRefused, "refused"},
		{fmt.Errorf("redis: %w", context.DeadlineExceeded), "timeout"},
		{&net.OpError{Op: "read", Net: "tcp", Err: os.ErrDeadlineExceeded}, "timeout"},
		{errors.New("NOAUTH Authentication required. redis://u:secret@10.0.0.1"), "error"},
		{nil, "error"},
	} {
		if got := fleetErrorClass(tt.err); got != tt.want {
			t.Errorf("%v: %q, want %q", tt.err, got, tt.want)
		}
	}
}

// bind returns a binding of merchant: its cache key is its merchant's
// and scopes' (none given: the merchant's only key).
func bind(merchant string, scopes ...string) *broker.Binding {
	return brokertest.NewBinding("nuapay#1", nil, broker.Request{Merchant: merchant, Organisation: merchant, Scopes: scopes})
}

// take returns the events emitted since the last call.
func (e *emitted) take() []string {
	out := e.events
	e.events = nil
	return out
}

// TestTrackerEmitsTransitionsOnly drives a tracker through failures,
// successes, consents, source backoffs, breakers and the fleet tier, and
// checks the events after each step: one per transition, none for a
// repeated failure.
func TestTrackerEmitsTransitionsOnly(t *testing.T) {
	type step struct {
		name string
		do   func(tr *Tracker)
		want []string
	}
	fetched := func(provider, merchant string, err error) func(*Tracker) {
		return func(tr *Tracker) { tr.Fetched(provider, bind(merchant), nil, err) }
	}
	repeat := func(n int, f func(*Tracker)) func(*Tracker) {
		return func(tr *Tracker) {
			for range n {
				f(tr)
			}
		}
	}
	for _, tt := range []struct {
		name  string
		steps []step
	}{
		{"refusal", []step{
			{"first refusal", fetched("nuapay", "acme", errRefused), []string{"merchant_token_refused merchant=acme provider=nuapay error=token_refused state=refused"}},
			{"refused 1000 times more", repeat(1000, fetched("nuapay", "acme", errRefused)), nil},
			{"another merchant", fetched("nuapay", "globex", errRefused), []string{"merchant_token_refused merchant=globex provider=nuapay error=token_refused state=refused"}},
			{"a success", fetched("nuapay", "acme", nil), nil},
			{"refused again after the success", fetched("nuapay", "acme", errRefused), []string{"merchant_token_refused merchant=acme provider=nuapay error=token_refused state=refused"}},
		}},
		{"unknown organisation", []step{
			{"404", fetched("nuapay", "acme", errUnknown), []string{"merchant_token_refused merchant=acme provider=nuapay error=token_refused state=unknown_organisation"}},
			{"404 again", fetched("nuapay", "acme", errUnknown), nil},
			{"then refused: still refused", fetched("nuapay", "acme", errRefused), nil},
		}},
		{"temporary failures are not refusals", []step{
			{"503", repeat(10, fetched("nuapay", "acme", errDown)), nil},
			{"cancelled", fetched("nuapay", "acme", context.Canceled), nil},
		}},
		{"consent", []step{
			{"consent required", fetched("bank", "acme", errConsent), []string{"merchant_consent_needed merchant=acme provider=bank error=consent_required state=needs_consent"}},
			{"still required", repeat(5, fetched("bank", "acme", errConsent)), nil},
			{"consent completed", func(tr *Tracker) { tr.ConsentGranted("bank", "acme") }, []string{"merchant_consent_granted merchant=acme provider=bank"}},
			{"the success after it", fetched("bank", "acme", nil), nil},
			{"lost again", fetched("bank", "acme", errConsent), []string{"merchant_consent_needed merchant=acme provider=bank error=consent_required state=needs_consent"}},
			{"granted elsewhere: a success", fetched("bank", "acme", nil), []string{"merchant_consent_granted merchant=acme provider=bank"}},
			{"a success again", fetched("bank", "acme", nil), nil},
		}},
		{"fleet", []step{
			{"configured, up", func(tr *Tracker) { tr.SetFleet(true, true) }, nil},
			{"up again", func(tr *Tracker) { tr.FleetChanged(true, nil) }, nil},
			{"down", func(tr *Tracker) { tr.FleetChanged(false, errRedisRefused) }, []string{"fleet_tier_down error=refused"}},
			{"down again", func(tr *Tracker) { tr.FleetChanged(false, errors.New("i/o timeout")) }, nil},
			{"back", func(tr *Tracker) { tr.FleetChanged(true, nil) }, []string{"fleet_tier_recovered"}},
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var e emitted
			clk := clocktest.New(time.Unix(1_700_000_000, 0))
			tr := NewTracker(TrackerOptions{Now: clk.Now, Emit: e.emit})
			for _, s := range tt.steps {
				s.do(tr)
				if got := e.take(); !slices.Equal(got, s.want) {
					t.Fatalf("%s: events %q, want %q", s.name, got, s.want)
				}
				clk.Add(time.Second)
			}
		})
	}
}

// TestSetFleetKeepsAChange: a change of the tier's availability told
// (FleetChanged) between the registration for it and the read of the
// availability is newer than that read: SetFleet leaves it.
func TestSetFleetKeepsAChange(t *testing.T) {
	tr := NewTracker(TrackerOptions{})
	tr.FleetChanged(false, errRedisRefused)
	tr.SetFleet(true, true) // read before the tier went down
	if configured, up := tr.Fleet(); !configured || up {
		t.Fatalf("Fleet() = configured %v, up %v; want configured and down", configured, up)
	}
	tr.SetFleet(false, false)
	if configured, _ := tr.Fleet(); configured {
		t.Fatal("still configured after SetFleet(false, false)")
	}
}

// TestTrackerRecords: a merchant's last error and time are kept after a
// success, its failure state is not; a provider's window slides.
func TestTrackerRecords(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	tr := NewTracker(TrackerOptions{Now: clk.Now})
	failedAt := clk.Now()
	tr.Fetched("nuapay", bind("acme"), nil, errDown)
	clk.Add(time.Minute)
	tr.Fetched("nuapay", bind("acme"), nil, nil)
	tr.Fetched("nuapay", bind("globex"), nil, nil)
	s := tr.snapshot(clk.Now())
	m := records(tr)["acme"]
	if m.lastErr.String() != "token_unavailable" || !m.lastErrAt.Equal(failedAt) || m.failure() != "" {
		t.Errorf("acme after a success: %+v; want the last error kept, no failure", m)
	}
	if _, ok := records(tr)["globex"]; ok {
		t.Error("a merchant that never failed has a record")
	}
	if p := s.providers["nuapay"]; p.calls != 3 || p.failures != 1 || p.lastCallFailed || p.lastErr.String() != "token_unavailable" {
		t.Errorf("provider: %+v; want 3 calls, 1 failure, the last call a success", p)
	}
	for _, tt := range []struct {
		after           time.Duration
		calls, failures int
	}{
		{3*time.Minute + 50*time.Second, 3, 1}, // 4m50s after the failure: still in the window
		{20 * time.Second, 2, 0},               // 5m10s: the failure slid out
		{time.Minute, 0, 0},                    // every call slid out
	} {
		clk.Add(tt.after)
		if p := tr.snapshot(clk.Now()).providers["nuapay"]; p.calls != tt.calls || p.failures != tt.failures {
			t.Errorf("at %s: %+v; want %d calls, %d failures", clk.Now().Sub(failedAt), p, tt.calls, tt.failures)
		}
	}
}

// holder is a binding table holding merchants: merchant -> whether a
// wildcard merchant (absent: not held).
type holder map[string]bool

func (h holder) HoldsMerchant(merchant string) (held, wild bool) {
	wild, held = h[merchant]
	return held, wild
}

// TestTrackerBounded: Forget drops a wildcard merchant; beyond
// MaxMerchants a new merchant replaces another.
func TestTrackerBounded(t *testing.T) {
	tr := NewTracker(TrackerOptions{MaxMerchants: 10})
	for i := range 100 {
		id := fmt.Sprintf("m%d", i)
		tr.Fetched("nuapay", bind(id), holder{id: true}, errDown)
	}
	if n := len(records(tr)); n != 10 {
		t.Fatalf("%d merchants remembered, want at most 10", n)
	}
	if _, ok := records(tr)["m99"]; !ok {
		t.Fatal("the newest merchant was dropped")
	}
	tr.Forget("m99")
	if _, ok := records(tr)["m99"]; ok {
		t.Fatal("Forget kept the merchant")
	}
}

// TestTrackerForget: Forget (a table evicted a wildcard merchant) drops
// the record of a merchant that only wildcard bindings failed for; the
// record of a merchant that an explicit binding failed for stays, the
// merchant being wildcard in another table sharing the tracker or not. A
// failure without a table (an operator's check of a merchant no table
// holds) makes a wildcard merchant's record, and leaves a record's class
// as it is.
func TestTrackerForget(t *testing.T) {
	wildcard, explicit := holder{"acme": true}, holder{"acme": false}
	for _, tt := range []struct {
		name   string
		tables []telemetry.Holder // the tables of acme's failures, in order (nil: none)
		kept   bool
	}{
		{"wildcard", []telemetry.Holder{wildcard}, false},
		{"wildcard twice", []telemetry.Holder{wildcard, wildcard}, false},
		{"explicit", []telemetry.Holder{explicit}, true},
		{"wildcard, then explicit in another table", []telemetry.Holder{wildcard, explicit}, true},
		{"explicit, then wildcard in another table", []telemetry.Holder{explicit, wildcard}, true},
		{"no table", []telemetry.Holder{nil}, false},
		{"wildcard, then no table", []telemetry.Holder{wildcard, nil}, false},
		{"explicit, then no table", []telemetry.Holder{explicit, nil}, true},
		{"no table, then explicit", []telemetry.Holder{nil, explicit}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tr := NewTracker(TrackerOptions{})
			for _, h := range tt.tables {
				tr.Fetched("nuapay", bind("acme"), h, errRefused)
			}
			tr.Forget("acme")
			if _, kept := records(tr)["acme"]; kept != tt.kept {
				t.Errorf("acme remembered: %v, want %v", kept, tt.kept)
			}
		})
	}
}

// TestTrackerFullNoTable: with its records full of explicit merchants'
// records, a failure without a table (an operator's check) drops none of
// them; with a wildcard merchant's among them, that one goes for it.
// MaxMerchants is 2.
func TestTrackerFullNoTable(t *testing.T) {
	tables := holder{"w": true, "x1": false, "x2": false}
	for _, tt := range []struct {
		name   string
		before []string // merchants failing through tables, in order
		want   []string // the merchants remembered after a check of "checked" failed
	}{
		{"full of explicit merchants", []string{"x1", "x2"}, []string{"x1", "x2"}},
		{"a wildcard merchant's record among them", []string{"x1", "w"}, []string{"checked", "x1"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tr := NewTracker(TrackerOptions{MaxMerchants: 2})
			for _, id := range tt.before {
				tr.Fetched("nuapay", bind(id), tables, errRefused)
			}
			tr.Fetched("nuapay", bind("checked"), nil, errRefused)
			if got := slices.Sorted(maps.Keys(records(tr))); !slices.Equal(got, tt.want) {
				t.Errorf("remembered %q, want %q", got, tt.want)
			}
		})
	}
}

// records copies the merchants a tracker remembers.
func records(tr *Tracker) map[string]merchantRecord {
	out := map[string]merchantRecord{}
	tr.eachMerchant(func(id string, rec *merchantRecord) { out[id] = *rec })
	return out
}

// TestTrackerFailuresByKey: a merchant's failure state is the worst of
// its keys' (a success of one key does not clear another's refusal; a
// success proves consent for all), and a provider's last call failed for
// the window after the provider's failure, whatever refusals of
// merchants follow.
func TestTrackerFailuresByKey(t *testing.T) {
	a, b := bind("acme", "a"), bind("acme", "b")
	for _, tt := range []struct {
		name          string
		calls         []func(tr *Tracker, clk *clocktest.Clock)
		failure       string
		failing       bool // the provider's last call failed, within the window
		wantLastError string
	}{
		{"refused on a key, a success on another", []func(*Tracker, *clocktest.Clock){
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", a, nil, errRefused) },
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", b, nil, nil) },
		}, StateRefused, false, "token_refused"},
		{"refused on a key, then its success", []func(*Tracker, *clocktest.Clock){
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", a, nil, errRefused) },
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", b, nil, errDown) },
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", a, nil, nil) },
		}, StateBackingOff, false, "token_unavailable"},
		{"consent lost on a key, a success on another", []func(*Tracker, *clocktest.Clock){
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", a, nil, errConsent) },
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", b, nil, nil) },
		}, "", false, "consent_required"},
		{"more keys than remembered: the oldest goes", []func(*Tracker, *clocktest.Clock){
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", a, nil, errRefused) },
			func(tr *Tracker, _ *clocktest.Clock) {
				for i := range maxKeyFailures {
					tr.Fetched("nuapay", bind("acme", fmt.Sprint(i)), nil, errDown)
				}
			},
		}, StateBackingOff, true, "token_unavailable"},
		{"the provider failed, then hours of refusals", []func(*Tracker, *clocktest.Clock){
			func(tr *Tracker, _ *clocktest.Clock) { tr.Fetched("nuapay", b, nil, errDown) },
			func(tr *Tracker, clk *clocktest.Clock) {
				for range 120 {
					tr.Fetched("nuapay", a, nil, errRefused)
					clk.Add(time.Minute)
				}
			},
		}, StateRefused, false, "token_refused"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clk := clocktest.New(time.Unix(1_700_000_000, 0))
			tr := NewTracker(TrackerOptions{Now: clk.Now})
			for _, call := range tt.calls {
				call(tr, clk)
				clk.Add(time.Minute)
			}
			m := records(tr)["acme"]
			if m.failure() != tt.failure || m.lastErr.String() != tt.wantLastError || len(m.failures) > maxKeyFailures {
				t.Errorf("failure %q, last error %s, %d keys; want %q, %s", m.failure(), m.lastErr, len(m.failures), tt.failure, tt.wantLastError)
			}
			if p := tr.snapshot(clk.Now()).providers["nuapay"]; p.lastCallFailed != tt.failing {
				t.Errorf("the provider's last call failed: %v, want %v", p.lastCallFailed, tt.failing)
			}
		})
	}
}

// providerFixture is a tracker fed by the observer of a binding of
// provider nuapay (source nuapay#1) whose token API answers err, on a
// broker whose breaker opens after 2 failures.
type providerFixture struct {
	clk    *clocktest.Clock
	br     *broker.Broker
	tr     *Tracker
	b      *broker.Binding
	err    error
	events emitted
}

func newProviderFixture(t *testing.T) *providerFixture {
	f := &providerFixture{clk: clocktest.New(time.Unix(1_700_000_000, 0))}
	f.br = broker.New(broker.Options{Now: f.clk.Now, MaxAttempts: 1, BreakerThreshold: 2, FailureTTL: time.Millisecond,
		Sleep: func(context.Context, time.Duration) error { return nil }})
	t.Cleanup(f.br.Close)
	f.tr = NewTracker(TrackerOptions{Now: f.clk.Now, Emit: f.events.emit})
	src := sourceFunc(func(context.Context, broker.Request) (broker.Token, error) {
		if f.err != nil {
			return broker.Token{}, f.err
		}
		return broker.Token{Value: "secret-token", IssuedAt: f.clk.Now(), Expiry: f.clk.Now().Add(time.Hour)}, nil
	})
	f.b = brokertest.NewBinding("nuapay#1", src, broker.Request{Merchant: "acme", Organisation: "acme"})
	f.b.Observer = telemetry.ForRegistry(nil, f.tr, zap.NewNop(), nil, nil, f.br).Observer()
	return f
}

// get asks for the binding's token after dropping the cached one.
func (f *providerFixture) get() {
	f.br.Drop(f.b)
	_, _, _ = f.br.Get(context.Background(), f.b)
}

// TestTrackerProviderEvents: a provider fails while a source of its
// backs off or has a breaker not closed, as the broker says: it is
// announced once, with the failure that caused it, and its recovery
// once, also when the broker drops the source's state without telling
// (Reconcile).
func TestTrackerProviderEvents(t *testing.T) {
	f := newProviderFixture(t)
	reg := &config.Registry{Providers: map[string]*config.Provider{"nuapay": {Name: "nuapay", ID: "nuapay#1"}}}
	throttle := &broker.APIError{Provider: "nuapay", StatusCode: 429, RetryAfter: 30 * time.Second}
	for _, s := range []struct {
		name string
		do   func()
		want []string
	}{
		{"a failure", func() { f.err = errDown; f.get() }, nil},
		{"the failure that opens the breaker", f.get, []string{"provider_failing provider=nuapay error=token_unavailable"}},
		{"half-open, the probe fails: still failing", func() { f.clk.Add(broker.DefaultBreakerCooldown); f.get() }, nil},
		{"the probe succeeds", func() { f.clk.Add(broker.DefaultBreakerCooldown); f.err = nil; f.get() }, []string{"provider_recovered provider=nuapay"}},
		{"a success again", f.get, nil},
		{"a throttle", func() { f.err = throttle; f.get() }, []string{"provider_failing provider=nuapay error=token_rate_limited"}},
		{"a success after its backoff", func() { f.clk.Add(31 * time.Second); f.err = nil; f.get() }, []string{"provider_recovered provider=nuapay"}},
		{"the breaker opens again", func() { f.err = errDown; f.get(); f.clk.Add(time.Second); f.get() }, []string{"provider_failing provider=nuapay error=token_unavailable"}},
		{"the broker forgot the source (a rotated secret)", func() {
			f.br.ForgetSource("nuapay#1")
			Reconcile(Sources{Registry: reg, Broker: f.br, Tracker: f.tr})
		}, []string{"provider_recovered provider=nuapay"}},
		{"held and released before its failure was told", func() {
			unobserved := brokertest.NewBinding("nuapay#1", f.b.Source, broker.Request{Merchant: "acme", Organisation: "acme"})
			f.err = throttle
			_, _, _ = f.br.Get(context.Background(), unobserved)
			f.tr.SourceChanged(f.br, "nuapay", "nuapay#1")
			f.br.ForgetSource("nuapay#1")
			f.tr.SourceChanged(f.br, "nuapay", "nuapay#1")
		}, nil},
		{"a failure after that", func() { f.err = errDown; f.get() }, nil},
	} {
		f.do(t, s.name, s.do, s.want)
	}
}

// do runs a step and checks the events it emitted.
func (f *providerFixture) do(t *testing.T, name string, step func(), want []string) {
	t.Helper()
	step()
	if got := f.events.take(); !slices.Equal(got, want) {
		t.Fatalf("%s: events %q, want %q", name, got, want)
	}
	f.clk.Add(time.Second)
}

// TestReconcileUnknownProvider: reconciling a provider nothing was told of
// keeps no record of it.
func TestReconcileUnknownProvider(t *testing.T) {
	f := newProviderFixture(t)
	reg := &config.Registry{Providers: map[string]*config.Provider{"idle": {Name: "idle", ID: "idle#1"}}}
	Reconcile(Sources{Registry: reg, Broker: f.br, Tracker: f.tr})
	f.tr.mu.Lock()
	defer f.tr.mu.Unlock()
	if _, ok := f.tr.providers["idle"]; ok {
		t.Error("reconcile made a record for a provider nothing was told of")
	}
}

// TestTrackerBreakerClosesDuringBackoff: the half-open breaker's probe is
// throttled (a 429 with Retry-After): the breaker closes and the source
// backs off; the provider recovers only when the backoff ends too.
func TestTrackerBreakerClosesDuringBackoff(t *testing.T) {
	f := newProviderFixture(t)
	throttle := &broker.APIError{Provider: "nuapay", StatusCode: 429, RetryAfter: time.Minute}
	for _, s := range []struct {
		name string
		do   func()
		want []string
	}{
		{"the breaker opens", func() { f.err = errDown; f.get(); f.clk.Add(time.Second); f.get() }, []string{"provider_failing provider=nuapay error=token_unavailable"}},
		{"the probe is throttled: the breaker closes, the source backs off", func() {
			f.clk.Add(broker.DefaultBreakerCooldown)
			f.err = throttle
			f.get()
			if h := f.br.SourceHealth("nuapay#1"); h.Breaker != broker.BreakerClosed || h.BackoffUntil.IsZero() {
				t.Fatalf("source health %+v; want the breaker closed and a backoff", h)
			}
		}, nil},
		{"the backoff ends: a success", func() { f.clk.Add(time.Minute); f.err = nil; f.get() }, []string{"provider_recovered provider=nuapay"}},
	} {
		f.do(t, s.name, s.do, s.want)
	}
}

// TestReconcileSources: Reconcile reads a provider's sources from every
// registry that names it (Registry and Others), and from those only: a
// source an old configuration left behind no longer makes it fail.
func TestReconcileSources(t *testing.T) {
	// The breaker of nuapay#1 is open; nuapay#2 is healthy.
	nuapay := func(id string) *config.Registry {
		return &config.Registry{Providers: map[string]*config.Provider{"nuapay": {Name: "nuapay", ID: id}}}
	}
	for _, tt := range []struct {
		name     string
		registry *config.Registry
		others   []*config.Registry
		want     []string
	}{
		{"another registry names the failing source", nuapay("nuapay#2"), []*config.Registry{nuapay("nuapay#1")}, nil},
		{"the registry names the failing source, another a healthy one", nuapay("nuapay#1"), []*config.Registry{nuapay("nuapay#2")}, nil},
		{"no registry names the failing source (an old configuration's)", nuapay("nuapay#2"), nil, []string{"provider_recovered provider=nuapay"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newProviderFixture(t)
			f.do(t, "the breaker of nuapay#1 opens", func() { f.err = errDown; f.get(); f.clk.Add(time.Second); f.get() },
				[]string{"provider_failing provider=nuapay error=token_unavailable"})
			f.do(t, "reconciled", func() { Reconcile(Sources{Registry: tt.registry, Others: tt.others, Broker: f.br, Tracker: f.tr}) }, tt.want)
		})
	}
}
