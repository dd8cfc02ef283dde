package module

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// wildcardEnv is a sandbox Nuapay (real HTTP on loopback) whose
// organisations list can be made to fail, and a handler on a registry
// with an explicit merchant and a wildcard entry.
type wildcardEnv struct {
	sb       *sandbox.Server
	listDown atomic.Bool
	h        *Handler
	clk      *clocktest.Clock
	listing  *listing.Listing
}

func newWildcardEnv(t *testing.T, wildcard string) *wildcardEnv {
	t.Helper()
	return newWildcardEnvOrg(t, "{merchant}", wildcard)
}

// newWildcardEnvOrg is newWildcardEnv with the wildcard entry's
// organisation template org.
func newWildcardEnvOrg(t *testing.T, org, wildcard string) *wildcardEnv {
	t.Helper()
	env := &wildcardEnv{clk: clocktest.New(time.Unix(1_700_000_000, 0))}
	env.sb = sandbox.New(sandbox.Config{APIKeys: []string{"partner-key"}, Organisations: []sandbox.Organisation{
		{ID: "org-acme", Name: "Acme"}, {ID: "ORG1", Name: "One"}, {ID: "ORG2", Name: "Two"}, {ID: "ORG3", Name: "Three"}, {ID: "ORG4", Name: "Four"}}})
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if env.listDown.Load() && strings.HasSuffix(r.URL.Path, "/organisations") {
			http.Error(w, `{"code":"unavailable"}`, http.StatusServiceUnavailable)
			return
		}
		env.sb.ServeHTTP(w, r)
	}))
	t.Cleanup(ts.Close)
	toml := fmt.Sprintf(`
[providers.nuapay]
type = "nuapay"
base_url = %q
api_key = "{env.K}"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants."*"]
provider = "nuapay"
organisation = %q
scopes = ["openbanking_pisp"]
%s
`, ts.URL, org, wildcard)
	reg, err := configtest.Load(t, "w.toml", []byte(toml), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		t.Fatal(err)
	}
	if reg.Wildcard.OnlyListed {
		src := reg.Providers["nuapay"].Source
		env.listing = listing.New("nuapay", src.(listing.OrganisationLister), nuapay.ListLimits{}, time.Hour, zap.NewNop())
	}
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector()}
	h.broker = broker.New(broker.Options{Now: env.clk.Now, MaxAttempts: 1, FailureTTL: -1})
	t.Cleanup(h.broker.Close)
	h.registry = reg
	h.bindings = bindings.ForRegistry(reg, nil, admission.Allow(env.listing), env.clk.Now)
	h.instrument(telemetry.NewMetrics(false))
	env.h = h
	return env
}

// get sends a request for merchant and returns the status and the
// organisation the token was issued for ("" without a token).
func (env *wildcardEnv) get(t *testing.T, merchant string) (int, string) {
	t.Helper()
	rec, got, err := serve(t, env.h, merchantRequest(merchant))
	if err != nil {
		t.Fatal(err)
	}
	if got == nil {
		return rec.Code, ""
	}
	tok, _ := strings.CutPrefix(got.Header.Get("Authorization"), "Bearer ")
	org, _, valid := env.sb.Issued(tok)
	if !valid {
		t.Fatalf("%s: the upstream got a token the sandbox did not issue", merchant)
	}
	return http.StatusOK, org
}

// active is the number of wildcard merchants in the handler's table.
func (env *wildcardEnv) active() int {
	n := 0
	env.h.bindings.Each(func(_ string, b *bindings.Binding) {
		if b.Wild() {
			n++
		}
	})
	return n
}

// TestWildcardOrganisationFromID: any merchant id is served with
// organisation = the id, the explicit entry wins, and one token request
// is made per merchant.
func TestWildcardOrganisationFromID(t *testing.T) {
	env := newWildcardEnv(t, "")
	for _, tt := range []struct {
		merchant, org string
		status        int
	}{
		{"ORG1", "ORG1", 200},
		{"ORG2", "ORG2", 200},
		{"acme", "org-acme", 200}, // explicit wins: not "acme"
		{"ORG1", "ORG1", 200},     // cached
		{"bad/id", "", 400},       // validated before substitution
		{"..", "", 400},
	} {
		if status, org := env.get(t, tt.merchant); status != tt.status || org != tt.org {
			t.Errorf("%s: %d %q, want %d %q", tt.merchant, status, org, tt.status, tt.org)
		}
	}
	if n := env.sb.TokenRequests(); n != 3 {
		t.Fatalf("token requests = %d, want 3", n)
	}
}

// TestWildcardListing: with only_listed_organisations, an unlisted
// merchant gets 403 and causes no token request; before the first good
// list, 503; an outage of the list keeps the last good one.
func TestWildcardListing(t *testing.T) {
	env := newWildcardEnv(t, "only_listed_organisations = true")
	ctx := context.Background()

	if status, _ := env.get(t, "ORG1"); status != http.StatusServiceUnavailable {
		t.Fatalf("before any list: %d, want 503", status)
	}
	if status, _ := env.get(t, "acme"); status != 200 {
		t.Fatalf("explicit merchant before any list: %d, want 200", status)
	}
	env.listDown.Store(true)
	if _, err := env.listing.Refresh(ctx); err == nil {
		t.Fatal("refresh during an outage: want an error")
	}
	if status, _ := env.get(t, "ORG1"); status != http.StatusServiceUnavailable {
		t.Fatalf("outage before any list: %d, want 503", status)
	}
	env.listDown.Store(false)
	if n, err := env.listing.Refresh(ctx); err != nil || n != 5 {
		t.Fatalf("refresh: %d %v", n, err)
	}
	before := env.sb.TokenRequests()
	if status, _ := env.get(t, "UNLISTED"); status != http.StatusForbidden {
		t.Fatalf("unlisted: %d, want 403", status)
	}
	if n := env.sb.TokenRequests(); n != before {
		t.Fatalf("an unlisted merchant caused %d token requests", n-before)
	}
	if status, org := env.get(t, "ORG2"); status != 200 || org != "ORG2" {
		t.Fatalf("listed: %d %q", status, org)
	}
	env.listDown.Store(true)
	if _, err := env.listing.Refresh(ctx); err == nil {
		t.Fatal("refresh during an outage: want an error")
	}
	for _, m := range []string{"ORG2", "ORG3"} { // served binding and new merchant
		if status, org := env.get(t, m); status != 200 || org != m {
			t.Fatalf("%s during the outage: %d %q, want the last good list to hold", m, status, org)
		}
	}
	if status, _ := env.get(t, "UNLISTED"); status != http.StatusForbidden {
		t.Fatalf("unlisted during the outage: %d, want 403", status)
	}
}

// TestWildcardEviction: the active set is bounded by max_active; only
// merchants idle longer than idle_timeout are evicted, a request holding
// an evicted binding still completes, and an evicted merchant that comes
// back gets its cached token without a token request.
func TestWildcardEviction(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 2\nidle_timeout = \"1m\"")
	for _, m := range []string{"ORG1", "ORG2"} {
		if status, _ := env.get(t, m); status != 200 {
			t.Fatalf("%s: %d", m, status)
		}
	}
	held := env.h.bindings.Peek("ORG1") // as a request in flight holds it
	env.clk.Add(30 * time.Second)
	if status, _ := env.get(t, "ORG2"); status != 200 { // ORG2 used again
		t.Fatal(status)
	}
	env.clk.Add(40 * time.Second) // ORG1 idle 70s, ORG2 40s
	if status, _ := env.get(t, "ORG3"); status != 200 {
		t.Fatalf("ORG3 with ORG1 idle: %d", status)
	}
	if env.h.bindings.Peek("ORG1") != nil || env.h.bindings.Peek("ORG2") == nil {
		t.Fatal("want ORG1 evicted and ORG2 (in use) kept")
	}
	if got := env.active(); got != 2 {
		t.Fatalf("active = %d, want 2", got)
	}
	// Nobody idle: a new merchant is refused, nobody is evicted.
	if status, _ := env.get(t, "ORG-NEW"); status != http.StatusServiceUnavailable {
		t.Fatalf("full and nobody idle: %d, want 503", status)
	}
	if env.h.bindings.Peek("ORG2") == nil || env.h.bindings.Peek("ORG3") == nil {
		t.Fatal("a merchant in use was evicted")
	}
	// The request that held ORG1's binding still gets its token.
	e, _, err := env.h.broker.Get(context.Background(), &held.Binding)
	if err != nil || e.Header() == "" {
		t.Fatalf("held binding after eviction: %v", err)
	}
	before := env.sb.TokenRequests()
	env.clk.Add(2 * time.Minute)
	if status, org := env.get(t, "ORG1"); status != 200 || org != "ORG1" {
		t.Fatalf("ORG1 back: %d %q", status, org)
	}
	if n := env.sb.TokenRequests(); n != before {
		t.Fatalf("an evicted merchant coming back caused %d token requests, want its cached token", n-before)
	}
}

// TestWildcardParkedTokensBounded: the tokens of evicted wildcard
// merchants stay cached for the last max_active evicted only: one that
// comes back soon costs no token request, an older one's token was
// dropped (one token request when it comes back), so the cache holds at
// most twice max_active wildcard tokens however many ids were seen.
func TestWildcardParkedTokensBounded(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 1\nidle_timeout = \"1m\"")
	cached := func() int { return len(env.h.broker.Entries()) }
	for _, m := range []string{"ORG1", "ORG2", "ORG3"} {
		// Each evicts the one before (idle 2m > 1m): ORG1, then ORG2
		// parked; parking ORG2 drops ORG1's token.
		if status, org := env.get(t, m); status != 200 || org != m {
			t.Fatalf("%s: %d %q", m, status, org)
		}
		env.clk.Add(2 * time.Minute)
	}
	if got := cached(); got != 2 {
		t.Errorf("%d tokens cached, want 2: ORG3's (active) and ORG2's (parked); ORG1's dropped", got)
	}
	for _, tt := range []struct {
		merchant string
		requests int64
	}{
		{"ORG2", 0}, // parked: its token is still cached
		{"ORG1", 1}, // dropped when ORG2 was parked
	} {
		before := env.sb.TokenRequests()
		if status, org := env.get(t, tt.merchant); status != 200 || org != tt.merchant {
			t.Fatalf("%s back: %d %q", tt.merchant, status, org)
		}
		if n := env.sb.TokenRequests() - before; n != tt.requests {
			t.Errorf("%s back: %d token requests, want %d", tt.merchant, n, tt.requests)
		}
		env.clk.Add(2 * time.Minute)
	}
	if got, max := cached(), 2; got > max {
		t.Errorf("%d tokens cached, want at most %d (twice max_active)", got, max)
	}
}

// TestWildcardParkingKeepsSharedTokens: a parked merchant's token is not
// dropped while another merchant uses it too (an explicit merchant and a
// wildcard id naming its organisation; a wildcard entry with one
// organisation for every id), nor while the merchant was parked again
// since: no extra token request in either case.
func TestWildcardParkingKeepsSharedTokens(t *testing.T) {
	for _, tt := range []struct {
		name, org, wildcard string
		steps               []string // merchant ids; "+2m" moves the clock
		want                int64    // token requests over the steps
	}{
		{"explicit merchant shares the key", "{merchant}", "max_active = 1\nidle_timeout = \"1m\"",
			[]string{"acme", "org-acme", "+2m", "ORG1", "+2m", "ORG2", "acme"}, 3},
		{"one organisation for every id", "org-acme", "max_active = 1\nidle_timeout = \"1m\"",
			[]string{"a1", "+2m", "a2", "+2m", "a3", "+2m", "a4", "+2m", "a5"}, 1},
		{"evicted, back, evicted again", "{merchant}", "max_active = 2\nidle_timeout = \"1m\"",
			[]string{"ORG1", "ORG2", "+2m", "ORG3", "ORG1", "+2m", "ORG4", "+2m", "ORG1"}, 4},
	} {
		t.Run(tt.name, func(t *testing.T) {
			env := newWildcardEnvOrg(t, tt.org, tt.wildcard)
			before := env.sb.TokenRequests()
			for _, step := range tt.steps {
				if step == "+2m" {
					env.clk.Add(2 * time.Minute)
					continue
				}
				if status, _ := env.get(t, step); status != 200 {
					t.Fatalf("%s: %d", step, status)
				}
			}
			if n := env.sb.TokenRequests() - before; n != tt.want {
				t.Errorf("%d token requests, want %d", n, tt.want)
			}
		})
	}
}

// TestWildcardFullTableRefuses: with the active set full and nobody
// idle, new merchants are refused and nobody is evicted; once the oldest
// bindings are idle, they are evicted and the new merchant is served.
func TestWildcardFullTableRefuses(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 2\nidle_timeout = \"1m\"")
	for _, m := range []string{"ORG1", "ORG2"} {
		if status, _ := env.get(t, m); status != 200 {
			t.Fatalf("%s: %d", m, status)
		}
	}
	env.clk.Add(30 * time.Second)
	for i := range 20 {
		if status, _ := env.get(t, fmt.Sprintf("NEW%d", i)); status != http.StatusServiceUnavailable {
			t.Fatalf("NEW%d with nobody idle: %d, want 503", i, status)
		}
	}
	if env.h.bindings.Peek("ORG1") == nil || env.h.bindings.Peek("ORG2") == nil {
		t.Fatal("a merchant in use was evicted")
	}
	env.clk.Add(31 * time.Second) // ORG1 and ORG2 idle 61 s
	if status, org := env.get(t, "ORG3"); status != 200 || org != "ORG3" {
		t.Fatalf("ORG3 once the others are idle: %d %q", status, org)
	}
	if env.h.bindings.Peek("ORG1") != nil {
		t.Fatal("ORG1, idle, was not evicted")
	}
}
