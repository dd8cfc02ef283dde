package module

import (
	"context"
	"fmt"
	"net/http"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
)

// handTable returns a table holding bindings made by hand (tests,
// benchmarks), as explicit merchants of one provider, each keeping its
// Observer.
func handTable(provider, typ string, bds ...*broker.Binding) *bindings.Table {
	r := handResolver{provider: provider, typ: typ, m: map[string]*broker.Binding{}}
	for _, bd := range bds {
		r.m[bd.Merchant] = bd
	}
	t := bindings.New(bindings.Config{Resolver: r})
	for _, bd := range bds {
		if _, err := t.Get(bd.Merchant, keepObserver{}); err != nil {
			panic(err)
		}
	}
	return t
}

// handResolver resolves the merchants of bindings made by hand.
type handResolver struct {
	provider, typ string
	m             map[string]*broker.Binding
}

func (r handResolver) Resolve(id string) (*broker.Binding, string, string, bool, error) {
	if bd := r.m[id]; bd != nil {
		return bd, r.provider, r.typ, false, nil
	}
	return nil, "", "", false, bindings.ErrUnknownMerchant
}

// keepObserver are bindings.Hooks that leave a binding's Observer as
// made.
type keepObserver struct{}

func (keepObserver) Made(*bindings.Binding, bool) bool { return false }
func (keepObserver) Released(*bindings.Binding)        {}
func (keepObserver) Drop(*broker.Binding)              {}
func (keepObserver) Evicted(*bindings.Binding)         {}

// TestWildcardUnservedMerchantsKeepNoSlot: merchant ids whose token
// requests fail (the sandbox answers 404 for an unknown organisation)
// fill the wildcard's slots, yet a merchant that can get a token is
// served at once: the oldest binding never served a token is evicted for
// it. A merchant served a token keeps its slot until idle_timeout, and
// the queue of unserved bindings stays bounded.
func TestWildcardUnservedMerchantsKeepNoSlot(t *testing.T) {
	for _, tt := range []struct {
		name  string
		steps []string // merchant ids (BAD*: not an organisation) or "+<duration>"
		want  []int    // the status of each merchant step
	}{
		{"five failing ids, then merchants with tokens",
			[]string{"BAD1", "BAD2", "BAD3", "BAD4", "BAD5", "ORG1", "ORG2", "ORG3", "ORG4", "org-acme"},
			[]int{502, 502, 502, 502, 502, 200, 200, 200, 200, 200}},
		{"failing ids take turns, served ones stay",
			[]string{"ORG1", "ORG2", "ORG3", "ORG4", "BAD1", "BAD2", "BAD3", "org-acme", "BAD4"},
			[]int{200, 200, 200, 200, 502, 502, 502, 200, 503}},
		{"served merchants are not evicted before idle_timeout",
			[]string{"ORG1", "ORG2", "ORG3", "ORG4", "org-acme", "BAD1", "+1h", "BAD2", "+61m", "BAD3", "ORG1"},
			[]int{200, 200, 200, 200, 200, 503, 503, 502, 200}},
		{"a failing id asked again keeps no slot either",
			[]string{"BAD1", "BAD1", "BAD2", "BAD3", "BAD4", "BAD5", "BAD1", "ORG1", "ORG2", "ORG3", "ORG4", "org-acme"},
			[]int{502, 502, 502, 502, 502, 502, 502, 200, 200, 200, 200, 200}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := newWildcardEnv(t, "max_active = 5\nidle_timeout = \"2h\"")
			i := 0
			for _, step := range tt.steps {
				if d, err := time.ParseDuration(step[1:]); step[0] == '+' && err == nil {
					env.clk.Add(d)
					continue
				}
				status, _ := env.get(t, step)
				if status != tt.want[i] {
					t.Fatalf("step %d, %s: %d, want %d", i, step, status, tt.want[i])
				}
				i++
				if a := env.active(); a > 5 {
					t.Fatalf("after %s: %d wildcard bindings, max_active is 5", step, a)
				}
			}
		})
	}
}

// TestWildcardUnservedQueueBounded: a flood of failing merchant ids
// leaves at most max_active bindings, whatever the number of ids, and a
// merchant that can get a token is served after it.
func TestWildcardUnservedQueueBounded(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 3\nidle_timeout = \"2h\"")
	for i := range 500 {
		if status, _ := env.get(t, fmt.Sprint("BAD", i)); status != http.StatusBadGateway {
			t.Fatalf("BAD%d: %d, want 502", i, status)
		}
		if a := env.active(); a > 3 {
			t.Fatalf("after %d failing ids: %d active", i+1, a)
		}
	}
	if status, org := env.get(t, "ORG1"); status != 200 || org != "ORG1" {
		t.Fatalf("ORG1 after the flood: %d %q", status, org)
	}
}

// TestWildcardEvictedInFlight: a binding evicted before its first token
// arrived still serves the request that holds it, and the merchant's next
// request finds the token cached (no second token request).
func TestWildcardEvictedInFlight(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 1\nidle_timeout = \"2h\"")
	held, rf := env.h.binding("ORG1") // a request in flight holds it
	if rf != nil {
		t.Fatalf("ORG1: %+v", rf)
	}
	if status, _ := env.get(t, "BAD1"); status != http.StatusBadGateway { // evicts ORG1's binding
		t.Fatalf("BAD1: %d, want 502", status)
	}
	if env.h.bindings.Peek("ORG1") != nil {
		t.Fatal("ORG1's unserved binding was not evicted")
	}
	if _, _, err := env.h.broker.Get(context.Background(), &held.Binding); err != nil {
		t.Fatalf("the request holding ORG1's evicted binding: %v", err)
	}
	before := env.sb.TokenRequests()
	if status, org := env.get(t, "ORG1"); status != 200 || org != "ORG1" {
		t.Fatalf("ORG1 next: %d %q", status, org)
	}
	if n := env.sb.TokenRequests() - before; n != 0 {
		t.Fatalf("ORG1's next request made %d token requests, want its cached token", n)
	}
}
