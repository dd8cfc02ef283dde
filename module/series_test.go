package module

import (
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"net/http/httptest"
	"strconv"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// lookupSeries returns the cache_lookups_total series of merchant in reg
// (result -> value).
func lookupSeries(t *testing.T, reg *prometheus.Registry, merchant string) map[string]float64 {
	t.Helper()
	mfs, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != "caddy_token_broker_cache_lookups_total" {
			continue
		}
		for _, s := range mf.GetMetric() {
			var m, r string
			for _, l := range s.GetLabel() {
				switch l.GetName() {
				case "merchant":
					m = l.GetValue()
				case "result":
					r = l.GetValue()
				}
			}
			if m == merchant {
				got[r] = s.GetCounter().GetValue()
			}
		}
	}
	return got
}

// TestWildcardReleaseKeepsExplicitSeries (a review finding): a merchant
// served through the wildcard in the old config and listed explicitly
// (same provider name) in the new one keeps its series when the old
// config is discarded: the new config's explicit binding counts into
// them ("An explicit merchant's series stay", README).
func TestWildcardReleaseKeepsExplicitSeries(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 2\nidle_timeout = \"1m\"")
	m := newTokenMetrics(true)
	promReg := prometheus.NewRegistry()
	if err := m.register(promReg); err != nil {
		t.Fatal(err)
	}
	h1 := env.h // the old config: ORG1 through the wildcard
	h1.instrument(m)

	// The new config: ORG1 onboarded explicitly, same provider name.
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"partner-key"}, Organisations: []sandbox.Organisation{{ID: "ORG1", Name: "One"}}})
	ts := httptest.NewServer(sb)
	t.Cleanup(ts.Close)
	reg2, err := config.Parse("w2.toml", []byte(fmt.Sprintf(`
[providers.nuapay]
type = "nuapay"
base_url = %q
api_key = "{env.K}"

[merchants.ORG1]
provider = "nuapay"
organisation = "ORG1"
scopes = ["openbanking_pisp"]
`, ts.URL)), func(string) (string, bool) { return "partner-key", true })
	if err != nil {
		t.Fatal(err)
	}
	h2 := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchantHeader: "X-Merchant-Id", header: "Authorization"}
	h2.broker = h1.broker
	h2.bindings = newBindingTable(reg2, nil, nil)
	h2.bindings.now = env.clk.Now
	h2.instrument(m)

	for _, step := range []struct {
		h  *Handler
		id string
	}{{h1, "ORG1"}, {h2, "ORG1"}} {
		if rec, got, err := serve(t, step.h, merchantRequest(step.id)); err != nil || got == nil {
			t.Fatalf("%s: %d %v", step.id, rec.Code, err)
		}
	}
	if err := h1.Cleanup(); err != nil { // the old config is discarded
		t.Fatal(err)
	}
	env.clk.Add(time.Second)
	if rec, got, err := serve(t, h2, merchantRequest("ORG1")); err != nil || got == nil {
		t.Fatalf("ORG1 after reload: %d %v", rec.Code, err)
	}
	got := lookupSeries(t, promReg, "ORG1")
	if len(got) == 0 {
		t.Fatalf("explicit ORG1 served by the live config has no cache_lookups_total series (deleted by the old config's wildcard release)")
	}
}

// TestDiscardedTableEvictionReleasesNothing (a review finding): after
// Cleanup (discard released every wildcard binding of the table), a
// request still going through the old handler evicts; that eviction must
// not release the evicted binding again, which would take away the hold
// of the live config's binding of the same merchant and delete its series
// while it counts.
func TestDiscardedTableEvictionReleasesNothing(t *testing.T) {
	env := newWildcardEnv(t, "max_active = 1\nidle_timeout = \"1m\"")
	m := newTokenMetrics(true)
	promReg := prometheus.NewRegistry()
	if err := m.register(promReg); err != nil {
		t.Fatal(err)
	}
	h1 := env.h // old config
	h1.instrument(m)
	h2 := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchantHeader: "X-Merchant-Id", header: "Authorization"}
	h2.broker = h1.broker
	h2.bindings = newBindingTable(h1.bindings.reg, nil, nil) // new config, same registry
	h2.bindings.now = env.clk.Now
	h2.instrument(m)
	get := func(h *Handler, id string) {
		t.Helper()
		if rec, got, err := serve(t, h, merchantRequest(id)); err != nil || got == nil {
			t.Fatalf("%s: %d %v", id, rec.Code, err)
		}
	}
	get(h1, "ORG1")
	get(h2, "ORG1") // two holders
	if err := h1.Cleanup(); err != nil {
		t.Fatal(err)
	}
	env.clk.Add(2 * time.Minute)
	get(h1, "ORG2") // late request through the old handler: evicts ORG1 there
	get(h2, "ORG1") // the live config's ORG1, never evicted
	if got := lookupSeries(t, promReg, "ORG1"); len(got) == 0 {
		t.Fatalf("ORG1, live in the new config, has no cache_lookups_total series (released twice by the old table)")
	}
}

// TestFetchOutcomesCoverClassify: every code classify can return (read
// from its source, so that a code added there is seen) is in
// fetchOutcomes, by which a wildcard merchant's token_requests_total
// series are deleted; a code missing there would leave a series per
// merchant id.
func TestFetchOutcomesCoverClassify(t *testing.T) {
	file, err := parser.ParseFile(token.NewFileSet(), "errors.go", nil, 0)
	if err != nil {
		t.Fatal(err)
	}
	known := map[string]bool{}
	for _, o := range fetchOutcomes {
		known[o] = true
	}
	found := 0
	ast.Inspect(file, func(n ast.Node) bool {
		fn, ok := n.(*ast.FuncDecl)
		if !ok || fn.Name.Name != "classify" {
			return true
		}
		ast.Inspect(fn.Body, func(n ast.Node) bool {
			ret, ok := n.(*ast.ReturnStmt)
			if !ok || len(ret.Results) != 2 {
				return true
			}
			lit, ok := ret.Results[1].(*ast.BasicLit)
			if !ok || lit.Kind != token.STRING {
				t.Errorf("classify returns a code that is not a string literal at %v: keep fetchOutcomes in step by hand", ret.Pos())
				return true
			}
			code, _ := strconv.Unquote(lit.Value)
			found++
			if !known[code] {
				t.Errorf("classify returns %q, missing from fetchOutcomes: a wildcard merchant's token_requests_total series with it would never be deleted", code)
			}
			return true
		})
		return false
	})
	if found < 5 {
		t.Fatalf("found %d codes in classify's source, want its return statements", found)
	}
	if !known[fetchOutcome(nil)] {
		t.Errorf("fetchOutcome(nil) = %q, missing from fetchOutcomes", fetchOutcome(nil))
	}
}
