package opstate

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// sourceFunc is a provider's token API in a function.
type sourceFunc func(ctx context.Context, req broker.Request) (broker.Token, error)

func (f sourceFunc) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	return f(ctx, req)
}

// Classify says a 401 is the credential's, as the Nuapay source does.
func (f sourceFunc) Classify(err error) broker.Class {
	var ae *broker.APIError
	if errors.As(err, &ae) && ae.StatusCode == http.StatusUnauthorized {
		return broker.ClassCredential
	}
	return broker.DefaultClass(err)
}

// stateTOML has two Nuapay providers: merchants of nuapay whose
// organisation names what its token API answers, one of nuapay2, and a
// wildcard entry.
const stateTOML = `
[providers.nuapay]
type = "nuapay"
base_url = "http://127.0.0.1:1"
api_key = "{env.K}"

[providers.nuapay2]
type = "nuapay"
base_url = "http://127.0.0.1:2"
api_key = "{env.K}"

[merchants.a-fresh]
provider = "nuapay"
organisation = "ok"
scopes = ["s"]

[merchants.b-refused]
provider = "nuapay"
organisation = "refused"
scopes = ["s"]

[merchants.c-unknown]
provider = "nuapay"
organisation = "unknown"
scopes = ["s"]

[merchants.d-down]
provider = "nuapay"
organisation = "down"
scopes = ["s"]

[merchants.e-idle]
provider = "nuapay"
organisation = "idle"
scopes = ["s"]

[merchants.f-refreshing]
provider = "nuapay"
organisation = "early"
scopes = ["s"]

[merchants.g-consent]
provider = "nuapay"
organisation = "consent"
scopes = ["s"]

[merchants.h-other]
provider = "nuapay2"
organisation = "ok"
scopes = ["s"]

[merchants."*"]
provider = "nuapay"
organisation = "{merchant}"
scopes = ["s"]
max_active = 2
`

// stateFixture is a broker, a registry, a binding table and a tracker
// fed by the table's observers, on a clock.
type stateFixture struct {
	clk     *clocktest.Clock
	load    func([]byte, config.Options) (*config.Registry, error) // writes and loads the registry at its path
	br      *broker.Broker
	reg     *config.Registry
	table   *bindings.Table
	tracker *Tracker
	index   Index
	rec     *telemetry.Recorder
	events  emitted
	// gate, when set, is called by the token API first, with the
	// request's organisation.
	gate func(organisation string)
}

// hooks are the table's bindings.Hooks: the recorder's observers, the
// broker's Drop and the tracker's Forget.
type hooks struct{ f *stateFixture }

func (h hooks) Made(b *bindings.Binding, track bool) bool { return h.f.rec.Made(b, track) }
func (h hooks) Released(b *bindings.Binding)              { h.f.rec.Released(b) }
func (h hooks) Drop(b *broker.Binding)                    { h.f.br.Drop(b) }
func (h hooks) Evicted(b *bindings.Binding)               { h.f.tracker.Forget(b.Merchant) }

func newStateFixture(tb testing.TB) *stateFixture {
	tb.Helper()
	return newFixtureOf(tb, stateTOML)
}

// newFixtureOf is the fixture of a registry whose providers' token API
// answers by organisation: refused (403), unknown (404), down (503),
// consent (consent_required), throttled (429 with Retry-After), bad-…
// (401: the partner API key is refused), none (503), w-unknown… (404),
// else a token.
func newFixtureOf(tb testing.TB, toml string) *stateFixture {
	tb.Helper()
	f := &stateFixture{clk: clocktest.New(time.Unix(1_700_000_000, 0)), load: configtest.Reloader(tb, "state.toml")}
	reg, err := f.load([]byte(toml), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		tb.Fatal(err)
	}
	src := sourceFunc(func(_ context.Context, req broker.Request) (broker.Token, error) {
		if f.gate != nil {
			f.gate(req.Organisation)
		}
		switch {
		case strings.HasPrefix(req.Organisation, "bad-"):
			return broker.Token{}, errBadKey
		case strings.HasPrefix(req.Organisation, "w-unknown"):
			return broker.Token{}, errUnknown
		}
		switch req.Organisation {
		case "", "down":
			return broker.Token{}, errDown
		case "refused":
			return broker.Token{}, errRefused
		case "unknown":
			return broker.Token{}, errUnknown
		case "consent":
			return broker.Token{}, errConsent
		case "throttled":
			return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 429, RetryAfter: 30 * time.Second}
		}
		now := f.clk.Now()
		return broker.Token{Value: broker.Secret("secret-token-" + req.Organisation), IssuedAt: now, Expiry: now.Add(time.Hour)}, nil
	})
	for _, p := range reg.Providers {
		p.Source = src
	}
	f.reg = reg
	f.br = broker.New(broker.Options{Now: f.clk.Now, MaxAttempts: 1, FailureTTL: time.Minute, FailureMax: time.Hour,
		Sleep: func(context.Context, time.Duration) error { return nil }})
	tb.Cleanup(f.br.Close)
	f.tracker = NewTracker(TrackerOptions{Now: f.clk.Now, Emit: f.events.emit})
	f.table = bindings.ForRegistry(reg, nil, nil, f.clk.Now)
	f.rec = telemetry.ForRegistry(nil, f.tracker, zap.NewNop(), f.table, f.reg, f.br)
	return f
}

// get asks the broker for a merchant's token through the table, as the
// handler does; it returns the error.
func (f *stateFixture) get(tb testing.TB, merchant string) error {
	tb.Helper()
	b, err := f.table.Get(merchant, hooks{f})
	if err != nil {
		tb.Fatalf("%s: %v", merchant, err)
	}
	_, _, err = f.br.Get(context.Background(), &b.Binding)
	if err == nil {
		f.table.Served(b)
	}
	return err
}

func (f *stateFixture) sources() Sources {
	return Sources{Registry: f.reg, Broker: f.br, Tables: []*bindings.Table{f.table}, Tracker: f.tracker, Index: &f.index}
}

// page returns the merchants of a report as "id state".
func page(r Report) []string {
	var out []string
	for _, m := range r.Merchants {
		out = append(out, m.Merchant+" "+m.State)
	}
	return out
}

// TestBuild: every merchant of the registry is in the report, including
// the one never asked for (idle), each in its state; wildcard merchants
// are there while active; filters, counts and pages.
func TestBuild(t *testing.T) {
	f := newStateFixture(t)
	_ = f.get(t, "f-refreshing")
	f.clk.Add(58*time.Minute + 30*time.Second) // past f-refreshing's planned refresh (before its last 90 s)
	for _, m := range []string{"a-fresh", "b-refused", "c-unknown", "d-down", "g-consent", "h-other", "w-fresh", "w-unknown"} {
		_ = f.get(t, m)
	}
	f.clk.Add(time.Second)
	all := Build(f.sources(), Query{}, f.clk.Now())
	idx := f.index.last.Load()
	if idx == nil || idx.reg != f.reg || len(idx.merchants) != len(f.reg.Merchants) {
		t.Fatal("the registry's index is not kept")
	}
	want := []string{"a-fresh fresh", "b-refused refused", "c-unknown unknown_organisation", "d-down backing_off", "e-idle idle",
		"f-refreshing refreshing", "g-consent needs_consent", "h-other fresh", "w-fresh fresh", "w-unknown unknown_organisation"}
	if got := page(all); !slices.Equal(got, want) {
		t.Fatalf("merchants %q, want %q", got, want)
	}
	wantCounts := map[string]int{StateRefused: 1, StateUnknownOrganisation: 2, StateNeedsConsent: 1, StateBackingOff: 1,
		StateRefreshing: 1, StateFresh: 3, StateIdle: 1}
	if !mapsEqual(all.Counts, wantCounts) || all.Total != 10 || all.Next != "" {
		t.Errorf("counts %v total %d next %q; want %v, 10, none", all.Counts, all.Total, all.Next, wantCounts)
	}
	down := all.Merchants[3]
	if down.LastError != "token_unavailable" || down.LastErrorAt == nil || down.BackoffUntil == nil ||
		!down.BackoffUntil.Equal(down.LastErrorAt.Add(time.Minute)) || down.Expiry != nil {
		t.Errorf("d-down: %+v; want token_unavailable, backing off a minute, no token", down)
	}
	if w := all.Merchants[9]; !w.Wildcard || w.Organisation != "w-unknown" || w.LastError != "token_refused" {
		t.Errorf("w-unknown: %+v", w)
	}
	if a := all.Merchants[0]; a.Expiry == nil || a.LastError != "" || a.Wildcard {
		t.Errorf("a-fresh: %+v", a)
	}
	body, _ := json.Marshal(all)
	if strings.Contains(string(body), "secret-token") || strings.Contains(string(body), "partner-key") {
		t.Fatalf("the report carries a secret: %s", body)
	}
	if len(all.Providers) != 2 || all.Providers[0].Name != "nuapay" || all.Providers[0].Merchants != 9 || all.Providers[1].Merchants != 1 {
		t.Fatalf("providers %+v", all.Providers)
	}
	p := all.Providers[0]
	// Its last call that says something of the provider (w-fresh's; the
	// refusal of w-unknown's organisation after it does not) worked.
	if p.Requests != 7 || p.Failures != 5 || p.Status != "ok" || p.Breaker != "closed" || p.Window != "5m0s" || p.LastError != "token_refused" {
		t.Errorf("provider nuapay: %+v; want 7 requests (f-refreshing's is older than the window), 5 failures, ok", p)
	}
	if all.Fleet != nil {
		t.Errorf("fleet %+v without a fleet tier", all.Fleet)
	}

	if Build(f.sources(), Query{}, f.clk.Now()); f.index.last.Load() != idx {
		t.Fatal("the registry's index was made again")
	}
	for _, tt := range []struct {
		query      string
		want       []string
		total      int
		next       string
		counts     int // merchants counted
		fresh      int
		refreshing int
	}{
		{"state=fresh", []string{"a-fresh fresh", "h-other fresh", "w-fresh fresh"}, 3, "", 10, 3, 1},
		{"provider=nuapay2", []string{"h-other fresh"}, 1, "", 1, 1, 0},
		{"provider=nuapay&state=fresh", []string{"a-fresh fresh", "w-fresh fresh"}, 2, "", 9, 2, 1},
		{"limit=3", []string{"a-fresh fresh", "b-refused refused", "c-unknown unknown_organisation"}, 10, "c-unknown", 10, 3, 1},
		{"limit=3&after=c-unknown", []string{"d-down backing_off", "e-idle idle", "f-refreshing refreshing"}, 10, "f-refreshing", 10, 3, 1},
		{"limit=3&after=f-refreshing", []string{"g-consent needs_consent", "h-other fresh", "w-fresh fresh"}, 10, "w-fresh", 10, 3, 1},
		{"limit=3&after=w-fresh", []string{"w-unknown unknown_organisation"}, 10, "", 10, 3, 1},
		{"state=unknown_organisation&limit=1", []string{"c-unknown unknown_organisation"}, 2, "c-unknown", 10, 3, 1},
		{"after=zzz", nil, 10, "", 10, 3, 1},
		{"provider=none", nil, 0, "", 0, 0, 0},
	} {
		t.Run(tt.query, func(t *testing.T) {
			v, _ := url.ParseQuery(tt.query)
			q, err := ParseQuery(v)
			if err != nil {
				t.Fatal(err)
			}
			r := Build(f.sources(), q, f.clk.Now())
			n := 0
			for _, c := range r.Counts {
				n += c
			}
			if got := page(r); !slices.Equal(got, tt.want) || r.Total != tt.total || r.Next != tt.next || n != tt.counts ||
				r.Counts[StateFresh] != tt.fresh || r.Counts[StateRefreshing] != tt.refreshing || len(r.Counts) != len(States()) {
				t.Errorf("merchants %q total %d next %q counts %v; want %q, %d, %q, %d counted", got, r.Total, r.Next, r.Counts, tt.want, tt.total, tt.next, tt.counts)
			}
		})
	}

	// A wildcard merchant evicted from the table leaves the report and the
	// tracker.
	f.clk.Add(3 * time.Hour) // beyond the wildcard's idle timeout
	_ = f.get(t, "w-new1")
	_ = f.get(t, "w-new2")
	r := Build(f.sources(), Query{State: StateUnknownOrganisation}, f.clk.Now())
	if got := page(r); !slices.Equal(got, []string{"c-unknown unknown_organisation"}) {
		t.Errorf("after eviction: %q", got)
	}
	if _, ok := records(f.tracker)["w-unknown"]; ok {
		t.Error("the tracker still remembers an evicted wildcard merchant")
	}
}

// TestBuildProviderStatus: a provider's breaker and backoff make its
// status; the fleet tier's health is reported when configured.
func TestBuildProviderStatus(t *testing.T) {
	f := newStateFixture(t)
	f.br = broker.New(broker.Options{Now: f.clk.Now, MaxAttempts: 1, BreakerThreshold: 2, FailureTTL: time.Millisecond,
		Sleep: func(context.Context, time.Duration) error { return nil }})
	t.Cleanup(f.br.Close)
	f.rec = telemetry.ForRegistry(nil, f.tracker, zap.NewNop(), f.table, f.reg, f.br)
	f.tracker.SetFleet(true, true)
	_ = f.get(t, "d-down")
	f.clk.Add(time.Second)
	if p := Build(f.sources(), Query{Page: Page{Limit: 1}}, f.clk.Now()).Providers[0]; p.Status != "failing" || p.Breaker != "closed" {
		t.Errorf("provider after a failure: %+v", p)
	}
	for range 2 {
		_ = f.get(t, "d-down")
		f.clk.Add(time.Second)
	}
	r := Build(f.sources(), Query{Page: Page{Limit: 1}}, f.clk.Now())
	if p := r.Providers[0]; p.Status != "open" || p.Breaker != "open" || p.Requests != 2 || p.Failures != 2 || p.LastError != "token_unavailable" {
		t.Errorf("provider after its breaker opened: %+v", p)
	}
	if r.Providers[1].Status != "ok" {
		t.Errorf("the other provider: %+v", r.Providers[1])
	}
	if r.Fleet == nil || !r.Fleet.Up || r.Fleet.Since == nil {
		t.Errorf("fleet %+v, want up", r.Fleet)
	}
	if !slices.Contains(f.events.take(), "provider_failing provider=nuapay error=token_unavailable") {
		t.Error("no provider_failing event")
	}
	f.tracker.FleetChanged(false, fmt.Errorf("redis: connection refused"))
	r = Build(f.sources(), Query{Page: Page{Limit: 1}}, f.clk.Now())
	if r.Fleet.Up || r.Fleet.LastError != "redis: connection refused" || r.Fleet.LastErrorAt == nil {
		t.Errorf("fleet %+v, want down", r.Fleet)
	}
}

// TestBuildProviderBackingOff: a 429 with Retry-After holds the provider
// (status backing_off, an event), and a success after it ends releases
// it (an event).
func TestBuildProviderBackingOff(t *testing.T) {
	f := newStateFixture(t)
	_ = f.get(t, "throttled")
	r := Build(f.sources(), Query{Page: Page{Limit: 1}}, f.clk.Now())
	if p := r.Providers[0]; p.Status != "backing_off" || p.BackoffUntil == nil || !p.BackoffUntil.Equal(f.clk.Now().Add(30*time.Second)) ||
		p.LastError != "token_rate_limited" {
		t.Errorf("provider after a 429: %+v", p)
	}
	if got := f.events.take(); !slices.Equal(got, []string{"provider_failing provider=nuapay error=token_rate_limited"}) {
		t.Errorf("events %q", got)
	}
	f.clk.Add(31 * time.Second)
	if err := f.get(t, "a-fresh"); err != nil {
		t.Fatal(err)
	}
	r = Build(f.sources(), Query{Page: Page{Limit: 1}}, f.clk.Now())
	if p := r.Providers[0]; p.BackoffUntil != nil || p.Status != "ok" {
		t.Errorf("provider after a success: %+v", p)
	}
	if got := f.events.take(); !slices.Equal(got, []string{"provider_recovered provider=nuapay"}) {
		t.Errorf("events %q", got)
	}
}

func TestParseQuery(t *testing.T) {
	for _, tt := range []struct {
		query string
		want  Query
		err   string
	}{
		{"", Query{Page: Page{Limit: DefaultLimit}}, ""},
		{"provider=nuapay&state=refused&after=m-1&limit=5", Query{Provider: "nuapay", State: "refused", Page: Page{After: "m-1", Limit: 5}}, ""},
		{"limit=1000", Query{Page: Page{Limit: 1000}}, ""},
		{"state=broken", Query{}, `state "broken" is not a merchant state: use one of refused, unknown_organisation, needs_consent, backing_off, refreshing, fresh, idle`},
		{"limit=0", Query{}, `limit "0": must be a whole number from 1 to 1000`},
		{"limit=1001", Query{}, `limit "1001": must be a whole number from 1 to 1000`},
		{"limit=ten", Query{}, `limit "ten": must be a whole number from 1 to 1000`},
		{"after=%20x", Query{}, `after " x" is not a merchant id: pass the next of the previous page`},
		{"stat=fresh", Query{}, `unknown parameter "stat": use provider, state, after, limit`},
		{"state=fresh&state=idle", Query{}, `parameter "state" is given 2 times: give it once`},
		// The first bad parameter in name order, whatever the map's order.
		{"zeta=1&state=a&state=b&kappa=1&eta=1&theta=1&iota=1&lambda=1&mu=1&nu=1&xi=1", Query{},
			`unknown parameter "eta": use provider, state, after, limit`},
		{"zeta=1&state=a&state=b&kappa=1&theta=1&iota=1&lambda=1&mu=1&nu=1&xi=1", Query{},
			`unknown parameter "iota": use provider, state, after, limit`},
		{"after=a&after=b&zeta=1&kappa=1&theta=1&iota=1&lambda=1&mu=1&nu=1&xi=1", Query{},
			`parameter "after" is given 2 times: give it once`},
		{strings.Repeat("n", 100) + "=1", Query{}, `unknown parameter "` + strings.Repeat("n", 64) + `": use provider, state, after, limit`},
		{"state=" + strings.Repeat("s", 100), Query{}, `state "` + strings.Repeat("s", 64) + `" is not a merchant state: use one of refused, unknown_organisation, needs_consent, backing_off, refreshing, fresh, idle`},
		{"after=" + strings.Repeat("a", 200), Query{}, `after "` + strings.Repeat("a", 130) + `" is not a merchant id: pass the next of the previous page`},
	} {
		t.Run(tt.query, func(t *testing.T) {
			v, _ := url.ParseQuery(tt.query)
			q, err := ParseQuery(v)
			if tt.err != "" {
				if err == nil || err.Error() != tt.err {
					t.Fatalf("error %v, want %s", err, tt.err)
				}
				return
			}
			if err != nil || q != tt.want {
				t.Fatalf("%+v, %v; want %+v", q, err, tt.want)
			}
		})
	}
}

func mapsEqual(a, b map[string]int) bool {
	for k, v := range b {
		if a[k] != v {
			return false
		}
	}
	for k, v := range a {
		if b[k] != v {
			return false
		}
	}
	return true
}

// sharedTOML has merchants that share a cache key (the same
// organisation at a provider, or none at a provider without
// organisations) and merchants behind a refused partner API key.
const sharedTOML = `
[providers.nuapay]
type = "nuapay"
base_url = "http://127.0.0.1:1"
api_key = "{env.K}"

[providers.oneid]
type = "oauth2"
token_url = "http://127.0.0.1:2/token"
client_id = "partner"
client_secret = "{env.K}"

[providers.badkey]
type = "nuapay"
base_url = "http://127.0.0.1:3"
api_key = "{env.K}"

[merchants.x1]
provider = "nuapay"
organisation = "shared"
scopes = ["s"]

[merchants.x2]
provider = "nuapay"
organisation = "shared"
scopes = ["s"]

[merchants.x3]
provider = "nuapay"
organisation = "alone"
scopes = ["s"]

[merchants.y1]
provider = "oneid"
scopes = ["s"]

[merchants.y2]
provider = "oneid"
scopes = ["s"]

[merchants.z1]
provider = "badkey"
organisation = "bad-1"
scopes = ["s"]

[merchants.z2]
provider = "badkey"
organisation = "bad-2"
scopes = ["s"]

[merchants.z3]
provider = "badkey"
organisation = "bad-3"
scopes = ["s"]
`

// TestBuildSharedState: a merchant takes the state of the cache key it
// shares with others (a token served to one, a failure of another), and
// the merchants of a source in backoff without a token take the source's
// state (a refused partner API key refuses them all).
func TestBuildSharedState(t *testing.T) {
	f := newFixtureOf(t, sharedTOML)
	if err := f.get(t, "x2"); err != nil {
		t.Fatal(err)
	}
	if err := f.get(t, "y2"); err == nil {
		t.Fatal("y2: a token from a provider that is down")
	}
	for _, m := range []string{"z1", "z2"} {
		if err := f.get(t, m); err == nil {
			t.Fatalf("%s: a token behind a refused API key", m)
		}
	}
	f.clk.Add(time.Second)
	r := Build(f.sources(), Query{}, f.clk.Now())
	want := []string{"x1 fresh", "x2 fresh", "x3 idle", "y1 backing_off", "y2 backing_off", "z1 refused", "z2 refused", "z3 refused"}
	if got := page(r); !slices.Equal(got, want) {
		t.Fatalf("merchants %q, want %q", got, want)
	}
	for _, tt := range []struct {
		merchant   string
		lastError  string
		backingOff bool
		expiry     bool
	}{
		{"x1", "", false, true},
		{"x2", "", false, true},
		{"x3", "", false, false},
		{"y1", "token_unavailable", true, false},
		{"y2", "token_unavailable", true, false},
		{"z1", "token_refused", true, false},
		{"z2", "token_refused", true, false},
		{"z3", "token_refused", true, false},
	} {
		t.Run(tt.merchant, func(t *testing.T) {
			i := slices.IndexFunc(r.Merchants, func(m Merchant) bool { return m.Merchant == tt.merchant })
			m := r.Merchants[i]
			if m.LastError != tt.lastError || (m.BackoffUntil != nil) != tt.backingOff || (m.Expiry != nil) != tt.expiry ||
				(m.LastErrorAt != nil) != (tt.lastError != "") {
				t.Errorf("%+v; want last error %q, backing off %v, a token %v", m, tt.lastError, tt.backingOff, tt.expiry)
			}
		})
	}
	counts := Counts(f.sources(), f.clk.Now())
	if c := counts["badkey"]; c[StateRefused] != 3 {
		t.Errorf("badkey counts %v, want 3 refused", c)
	}
	if c := counts["oneid"]; c[StateBackingOff] != 2 {
		t.Errorf("oneid counts %v, want 2 backing off", c)
	}
	if c := counts["nuapay"]; c[StateFresh] != 2 || c[StateIdle] != 1 {
		t.Errorf("nuapay counts %v, want 2 fresh, 1 idle", c)
	}
}

// TestReconcile: reading the state emits nothing; Reconcile (a scrape
// runs it) drops a source the registries no longer name
// (provider_recovered) and keeps one that another registry whose fetches
// the tracker is told of names.
func TestReconcile(t *testing.T) {
	f := newStateFixture(t)
	_ = f.get(t, "throttled") // the wildcard's merchant: a 429 holds nuapay's source
	if got := f.events.take(); !slices.Equal(got, []string{"provider_failing provider=nuapay error=token_rate_limited"}) {
		t.Fatalf("events %q", got)
	}
	reloaded, err := configtest.Load(t, "reloaded.toml", []byte(strings.Replace(stateTOML, "127.0.0.1:1", "127.0.0.1:9", 1)),
		config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	if reloaded.Providers["nuapay"].ID == f.reg.Providers["nuapay"].ID {
		t.Fatal("the reloaded provider kept its source ID")
	}
	for _, tt := range []struct {
		name   string
		do     func(s Sources)
		others []*config.Registry
		want   []string
	}{
		{"a read", func(s Sources) { Build(s, Query{}, f.clk.Now()) }, nil, nil},
		{"counts", func(s Sources) { Counts(s, f.clk.Now()) }, nil, nil},
		{"a handler's registry still names the held source", Reconcile, []*config.Registry{f.reg}, nil},
		{"a scrape, when no registry names it", func(s Sources) {
			testutil.CollectAndCount(NewCollector(func() Sources { return s }))
		}, nil, []string{"provider_recovered provider=nuapay"}},
	} {
		s := f.sources()
		s.Registry, s.Others = reloaded, tt.others
		tt.do(s)
		if got := f.events.take(); !slices.Equal(got, tt.want) {
			t.Errorf("%s: events %q, want %q", tt.name, got, tt.want)
		}
	}
}

// dpopSource is a source whose tokens are bound to a DPoP key.
type dpopSource struct {
	broker.Source
	key *dpop.Key
}

func (s dpopSource) DPoPKey() *dpop.Key { return s.key }

// TestBuildProviderDPoP: a provider whose tokens are DPoP-bound shows its
// key's algorithm and thumbprint, and nothing of the private key; a bearer
// provider shows no dpop.
func TestBuildProviderDPoP(t *testing.T) {
	f := newStateFixture(t)
	k := dpoptest.NewKey(t)
	p := f.reg.Providers["nuapay2"]
	p.Source = dpopSource{Source: p.Source, key: k}
	r := Build(f.sources(), Query{Page: Page{Limit: 1}}, f.clk.Now())
	if r.Providers[0].DPoP != nil {
		t.Errorf("bearer provider %s: dpop %+v", r.Providers[0].Name, r.Providers[0].DPoP)
	}
	want := DPoPKey{Alg: dpop.EdDSA, JKT: k.Thumbprint()}
	if got := r.Providers[1].DPoP; got == nil || *got != want {
		t.Fatalf("provider %s: dpop %+v, want %+v", r.Providers[1].Name, got, want)
	}
	out, err := json.Marshal(r.Providers[1])
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(out), `"dpop":{"alg":"EdDSA","jkt":"`+k.Thumbprint()+`"}`) || strings.Contains(string(out), `"d":`) {
		t.Errorf("JSON %s", out)
	}
}

// TestBuildSharedKeyRecovered: a merchant whose token request was
// refused leaves its state when the cache key it shares with another
// merchant gets a token through the other's request: it is served that
// token, and makes no token request of its own to be told of.
func TestBuildSharedKeyRecovered(t *testing.T) {
	f := newFixtureOf(t, sharedTOML)
	var refuse atomic.Bool
	refuse.Store(true)
	for _, p := range f.reg.Providers {
		src := p.Source
		p.Source = sourceFunc(func(ctx context.Context, req broker.Request) (broker.Token, error) {
			if refuse.Load() {
				return broker.Token{}, errRefused
			}
			return src.Token(ctx, req)
		})
	}
	if err := f.get(t, "x1"); err == nil {
		t.Fatal("x1: a token while the provider refuses")
	}
	refuse.Store(false)
	f.clk.Add(2 * time.Minute) // past the key's failure memory
	if err := f.get(t, "x2"); err != nil {
		t.Fatal(err)
	}
	if err := f.get(t, "x1"); err != nil {
		t.Fatal(err)
	}
	r := Build(f.sources(), Query{Provider: "nuapay"}, f.clk.Now())
	if got, want := page(r), []string{"x1 fresh", "x2 fresh", "x3 idle"}; !slices.Equal(got, want) {
		t.Fatalf("merchants %q, want %q", got, want)
	}
}

// TestReloadedMerchantLeavesItsOldFailure: a merchant refused under one
// configuration (an unknown organisation, a refused provider) and served
// once a reload of the registry's file fixed it (another organisation,
// under the same provider ID; the provider renamed, under another) shows
// the state of its keys under the configuration in force, once the
// registries are reconciled: not the old key's failure, which no request
// will ever end.
func TestReloadedMerchantLeavesItsOldFailure(t *testing.T) {
	for _, tt := range []struct {
		name, merchant string
		edit           func(toml string) string
		sameID         bool // the provider of the merchant keeps its ID
	}{
		{"organisation fixed", "c-unknown", func(s string) string {
			return strings.Replace(s, `organisation = "unknown"`, `organisation = "fixed"`, 1)
		}, true},
		{"provider renamed", "b-refused", func(s string) string {
			s = strings.ReplaceAll(s, `provider = "nuapay"`, `provider = "renamed"`)
			s = strings.Replace(s, `[providers.nuapay]`, `[providers.renamed]`, 1)
			return strings.Replace(s, `organisation = "refused"`, `organisation = "fixed"`, 1)
		}, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			f := newStateFixture(t)
			if err := f.get(t, tt.merchant); err == nil {
				t.Fatalf("%s: a token under the first configuration", tt.merchant)
			}
			old := f.reg.Merchants[tt.merchant].Provider
			reloaded, err := f.load([]byte(tt.edit(stateTOML)), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
			if err != nil {
				t.Fatal(err)
			}
			if sameID := reloaded.Providers[reloaded.Merchants[tt.merchant].Provider].ID == f.reg.Providers[old].ID; sameID != tt.sameID {
				t.Fatalf("the provider of %s kept its ID: %t, want %t", tt.merchant, sameID, tt.sameID)
			}
			for _, p := range reloaded.Providers {
				p.Source = f.reg.Providers["nuapay2"].Source
			}
			f.reg, f.table = reloaded, bindings.ForRegistry(reloaded, nil, nil, f.clk.Now)
			f.rec = telemetry.ForRegistry(nil, f.tracker, zap.NewNop(), f.table, reloaded, f.br)
			s := f.sources()
			Reconcile(s)
			f.clk.Add(time.Hour) // past the old key's failure memory
			if err := f.get(t, tt.merchant); err != nil {
				t.Fatalf("%s under the reloaded configuration: %v", tt.merchant, err)
			}
			r := Build(s, Query{}, f.clk.Now())
			i := slices.IndexFunc(r.Merchants, func(m Merchant) bool { return m.Merchant == tt.merchant })
			if i < 0 || r.Merchants[i].State != StateFresh {
				t.Errorf("%s served under the reloaded configuration: index %d in %+v, want it there in state %s", tt.merchant, i, r.Merchants, StateFresh)
			}
		})
	}
}

// TestReconcileRemovedProvider: a provider told failing that a reload
// removes (or renames) is told recovered when the registries are
// reconciled: no answer of its will ever end the failure.
func TestReconcileRemovedProvider(t *testing.T) {
	f := newStateFixture(t)
	_ = f.get(t, "throttled") // the wildcard's merchant: a 429 holds nuapay's source
	if got := f.events.take(); !slices.Equal(got, []string{"provider_failing provider=nuapay error=token_rate_limited"}) {
		t.Fatalf("events %q", got)
	}
	renamed := strings.ReplaceAll(strings.Replace(stateTOML, "[providers.nuapay]", "[providers.renamed]", 1), `provider = "nuapay"`, `provider = "renamed"`)
	reloaded, err := configtest.Load(t, "reloaded.toml", []byte(renamed),
		config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	s := f.sources()
	s.Registry = reloaded
	Reconcile(s)
	if got, want := f.events.take(), []string{"provider_recovered provider=nuapay"}; !slices.Equal(got, want) {
		t.Errorf("events %q, want %q", got, want)
	}
	Reconcile(s)
	if got := f.events.take(); len(got) > 0 {
		t.Errorf("events of a second reconcile: %q, want none", got)
	}
}
