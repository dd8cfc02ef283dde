package bindings

import (
	"errors"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// resolver serves ids starting with "x" as explicit merchants and every
// other id through the wildcard; "bad" is unknown.
type resolver struct{ profile *broker.Profile }

func (r resolver) Resolve(id string) (*broker.Binding, string, string, bool, error) {
	if id == "bad" {
		return nil, "", "", false, errors.New("unknown merchant")
	}
	wild := !strings.HasPrefix(id, "x")
	if wild {
		id = strings.Clone(id)
	}
	return broker.NewBindingFor(r.profile, id, "org-"+id), "nuapay", "nuapay", wild, nil
}

// hooks record what a table tells them.
type hooks struct {
	mu       sync.Mutex
	track    bool
	released []string
	dropped  []string
	evicted  []string
}

func (h *hooks) Made(b *Binding, track bool) bool { return track && h.track }
func (h *hooks) Released(b *Binding) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.released = append(h.released, b.Merchant)
}
func (h *hooks) Evicted(b *Binding) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.evicted = append(h.evicted, b.Merchant)
}
func (h *hooks) Drop(b *broker.Binding) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.dropped = append(h.dropped, b.Merchant)
}

func newTable(limits Limits, allow func(string) error) (*Table, *clocktest.Clock) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	p := broker.NewProfile("nuapay#1", nil, []string{"openbanking_pisp"}, "", 0)
	return New(Config{Resolver: resolver{p}, Limits: limits, Allow: allow, Now: clk.Now}), clk
}

// step is a request for a merchant ("+1m" moves the clock); served says
// that it got a token.
func run(t *testing.T, tbl *Table, clk *clocktest.Clock, h Hooks, steps []string) []string {
	t.Helper()
	var out []string
	for _, s := range steps {
		if d, err := time.ParseDuration(s[1:]); s[0] == '+' && err == nil {
			clk.Add(d)
			continue
		}
		id, served := strings.CutSuffix(s, "!")
		b, err := tbl.Get(id, h)
		switch {
		case errors.Is(err, ErrTooManyMerchants):
			out = append(out, "full")
		case err != nil:
			out = append(out, "refused")
		default:
			if served {
				tbl.Served(b)
			}
			out = append(out, "ok")
		}
	}
	return out
}

// TestTable: explicit merchants are never bounded nor evicted; wildcard
// merchants are bounded by MaxActive, evicted when idle (least recently
// used first), else the oldest never served, else refused.
func TestTable(t *testing.T) {
	for _, tt := range []struct {
		name    string
		steps   []string // "id!" is served a token
		want    []string
		present []string
		absent  []string
		evicted []string // told to the hooks (Hooks.Evicted)
	}{
		{"explicit merchants are not counted", []string{"a!", "b!", "x1", "x2", "x3"},
			[]string{"ok", "ok", "ok", "ok", "ok"}, []string{"a", "b", "x1", "x2", "x3"}, nil, nil},
		{"full of served merchants in use", []string{"a!", "b!", "+30s", "c"},
			[]string{"ok", "ok", "full"}, []string{"a", "b"}, []string{"c"}, nil},
		{"the idle one goes, the one used since stays", []string{"a!", "b!", "+50s", "a", "+20s", "c"},
			[]string{"ok", "ok", "ok", "ok"}, []string{"a", "c"}, []string{"b"}, []string{"b"}},
		{"the oldest never served goes first", []string{"a", "b!", "c", "d"},
			[]string{"ok", "ok", "ok", "ok"}, []string{"b", "d"}, []string{"a", "c"}, []string{"a", "c"}},
		{"unknown", []string{"bad"}, []string{"refused"}, nil, []string{"bad"}, nil},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tbl, clk := newTable(Limits{MaxActive: 2, IdleTimeout: time.Minute}, nil)
			h := &hooks{}
			if got := run(t, tbl, clk, h, tt.steps); !slices.Equal(got, tt.want) {
				t.Fatalf("got %q, want %q", got, tt.want)
			}
			if !slices.Equal(h.evicted, tt.evicted) {
				t.Errorf("evicted %q, want %q", h.evicted, tt.evicted)
			}
			for _, id := range tt.present {
				if tbl.Peek(id) == nil {
					t.Errorf("%s: not in the table", id)
				}
			}
			for _, id := range tt.absent {
				if tbl.Peek(id) != nil {
					t.Errorf("%s: in the table", id)
				}
			}
			if n := tbl.lru.Len(); n > 2 {
				t.Errorf("%d active, max 2", n)
			}
		})
	}
}

// TestTableHoldsMerchant: a table holds an explicit merchant's binding
// for good, a wildcard merchant's until it is evicted (then none, not
// wild) or the merchant's new binding once it is back. MaxActive is 2.
func TestTableHoldsMerchant(t *testing.T) {
	for _, tt := range []struct {
		name       string
		steps      []string
		id         string
		held, wild bool
	}{
		{"explicit", []string{"x1"}, "x1", true, false},
		{"explicit, wildcard merchants evicted", []string{"x1", "a", "b", "c"}, "x1", true, false},
		{"wildcard", []string{"a"}, "a", true, true},
		{"never seen", nil, "a", false, false},
		{"wildcard evicted", []string{"a", "b", "c"}, "a", false, false},
		{"wildcard evicted, then back", []string{"a", "b", "c", "a"}, "a", true, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tbl, clk := newTable(Limits{MaxActive: 2, IdleTimeout: time.Minute}, nil)
			run(t, tbl, clk, &hooks{}, tt.steps)
			if held, wild := tbl.HoldsMerchant(tt.id); held != tt.held || wild != tt.wild {
				t.Errorf("HoldsMerchant(%s) = %v, %v; want %v, %v", tt.id, held, wild, tt.held, tt.wild)
			}
		})
	}
}

// TestTableUnservedBounded: a flood of merchants never served keeps the
// lists at the active bindings, and a merchant served afterwards keeps
// its slot.
func TestTableUnservedBounded(t *testing.T) {
	tbl, clk := newTable(Limits{MaxActive: 3, IdleTimeout: time.Hour}, nil)
	h := &hooks{}
	for i := range 500 {
		run(t, tbl, clk, h, []string{"bad" + strings.Repeat("x", i%7) + string(rune('a'+i%26)) + strings.Repeat("y", i/26)})
		if tbl.lru.Len() > 3 || tbl.unserved.Len() > tbl.lru.Len() || len(tbl.m) > 3 {
			t.Fatalf("after %d: lru %d, unserved %d, map %d", i+1, tbl.lru.Len(), tbl.unserved.Len(), len(tbl.m))
		}
	}
	if got := run(t, tbl, clk, h, []string{"m!", "n", "o", "p", "q"}); !slices.Equal(got, []string{"ok", "ok", "ok", "ok", "ok"}) {
		t.Fatal(got)
	}
	if tbl.Peek("m") == nil {
		t.Error("a served merchant was evicted for a new one")
	}
}

// TestTableParking: the tokens of the last MaxActive merchants evicted
// for idleness are kept, older ones dropped, unless the merchant is back
// in the table, is the one coming, or was parked again since, whatever
// the order within one batch of evictions.
func TestTableParking(t *testing.T) {
	for _, tt := range []struct {
		name  string
		steps []string
		want  []string // dropped
	}{
		{"one at a time", []string{"a!", "+2m", "b!", "+2m", "c!", "+2m", "d!"}, []string{"a", "b"}},
		{"back in the table", []string{"a!", "b!", "+2m", "c!", "a!", "+2m", "a!", "d!"}, nil},
		{"parked again since", []string{"a!", "b!", "+2m", "c!", "a!", "+2m", "d!"}, []string{"b"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			max := 2
			if tt.name == "one at a time" {
				max = 1
			}
			tbl, clk := newTable(Limits{MaxActive: max, IdleTimeout: time.Minute}, nil)
			h := &hooks{}
			run(t, tbl, clk, h, tt.steps)
			if !slices.Equal(h.dropped, tt.want) {
				t.Errorf("dropped %q, want %q", h.dropped, tt.want)
			}
		})
	}
	// A merchant parked, back, and parked again in one batch keeps its
	// token in either order of the batch.
	for _, order := range [][]string{{"c", "a"}, {"a", "c"}} {
		tbl, _ := newTable(Limits{MaxActive: 2, IdleTimeout: time.Minute}, nil)
		h := &hooks{}
		mk := func(id string) *Binding {
			return &Binding{Binding: *brokertest.NewBinding("s", nil, broker.Request{Merchant: id})}
		}
		tbl.wmu.Lock()
		tbl.park([]*Binding{mk("a"), mk("b")}, h, "")
		var batch []*Binding
		for _, id := range order {
			batch = append(batch, mk(id))
		}
		tbl.park(batch, h, "d")
		tbl.wmu.Unlock()
		if slices.Contains(h.dropped, "a") {
			t.Errorf("order %q: a's token dropped, though parked again in the batch", order)
		}
	}
}

// TestTableSeriesReleased: the hooks that track a wildcard merchant's
// series are told when it is evicted and, for those left, when the table
// is discarded; bindings made afterwards have none tracked.
func TestTableSeriesReleased(t *testing.T) {
	tbl, clk := newTable(Limits{MaxActive: 1, IdleTimeout: time.Minute}, nil)
	h := &hooks{track: true}
	run(t, tbl, clk, h, []string{"x1", "a!", "+2m", "b", "c"})
	// b, idle-evicted a's successor, never served, makes way for c.
	if want := []string{"a", "b"}; !slices.Equal(h.released, want) {
		t.Fatalf("released %q, want %q", h.released, want)
	}
	tbl.Discard()
	tbl.Discard()
	if want := []string{"a", "b", "c"}; !slices.Equal(h.released, want) {
		t.Fatalf("released %q after Discard, want %q", h.released, want)
	}
	run(t, tbl, clk, h, []string{"+2m", "d!", "+2m", "e"})
	if len(h.released) != 3 {
		t.Errorf("released %q: nothing after Discard", h.released)
	}
}

// TestTableAllow: Allow refuses a wildcard merchant before its binding is
// made, and on later lookups; explicit merchants are not asked about.
func TestTableAllow(t *testing.T) {
	var deny sync.Map
	errDenied := errors.New("unlisted")
	allow := func(org string) error {
		if _, ok := deny.Load(org); ok {
			return errDenied
		}
		return nil
	}
	tbl, _ := newTable(Limits{MaxActive: 10, IdleTimeout: time.Minute}, allow)
	deny.Store("org-a", true)
	deny.Store("org-x1", true)
	if _, err := tbl.Get("a", &hooks{}); !errors.Is(err, errDenied) || tbl.Peek("a") != nil {
		t.Fatalf("a: %v, want refused without a binding", err)
	}
	if _, err := tbl.Get("x1", &hooks{}); err != nil {
		t.Fatalf("explicit x1: %v", err)
	}
	if _, err := tbl.Get("b", &hooks{}); err != nil {
		t.Fatal(err)
	}
	deny.Store("org-b", true)
	if _, err := tbl.Get("b", &hooks{}); !errors.Is(err, errDenied) {
		t.Fatalf("b after it was unlisted: %v", err)
	}
}

// TestTableValues: a binding's strings as interface values, made once.
func TestTableValues(t *testing.T) {
	tbl, _ := newTable(Limits{MaxActive: 1, IdleTimeout: time.Minute}, nil)
	b, err := tbl.Get("x1", &hooks{})
	if err != nil {
		t.Fatal(err)
	}
	m, o := b.Values()
	if m != any("x1") || o != any("org-x1") || b.Provider.NameValue() != any("nuapay") {
		t.Fatalf("values %v %v %v", m, o, b.Provider.NameValue())
	}
	if n := testing.AllocsPerRun(100, func() { b.Values() }); n != 0 {
		t.Errorf("Values allocates %v times once made", n)
	}
}

// TestTableRefusedLookupIsNoUse: a request Allow refuses does not count as
// a use of the merchant's binding: a merchant unlisted after it was served
// goes idle whatever its callers send, and makes room for a new one.
func TestTableRefusedLookupIsNoUse(t *testing.T) {
	var deny sync.Map
	allow := func(org string) error {
		if _, ok := deny.Load(org); ok {
			return errors.New("unlisted")
		}
		return nil
	}
	tbl, clk := newTable(Limits{MaxActive: 1, IdleTimeout: time.Minute}, allow)
	h := &hooks{}
	if got := run(t, tbl, clk, h, []string{"a!"}); !slices.Equal(got, []string{"ok"}) {
		t.Fatal(got)
	}
	deny.Store("org-a", true)
	steps := []string{"+30s", "a", "+30s", "a", "+30s", "a", "+30s", "b"}
	if got := run(t, tbl, clk, h, steps); !slices.Equal(got, []string{"refused", "refused", "refused", "ok"}) {
		t.Fatalf("got %q: want a refused three times and b served in its place", got)
	}
}
