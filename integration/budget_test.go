package integration

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// The budget test: three sidecars sharing one Redis spend a provider's
// token-request budget (rate_limit) against a token API stand-in that
// enforces a rate limit (the sandbox's TokenRateLimit: 429 above it) and
// counts the requests of every second. The assertions are on the
// stand-in's counts and on what callers get, not on timings.
const (
	budgetMerchants = 100
	budgetOrgs      = 30              // cache keys: merchants share organisations
	budgetLifetime  = 8 * time.Second // the stand-in caps the tokens' life
	budgetLifetimes = 3
	// The stand-in's limit, and the registry's budget below it.
	standInRate, standInBurst = 10, 5
	budgetRate                = 8
	budgetRateLimit           = "8/s"
	budgetBurst               = 3
	budgetSidecars            = 3 // the Caddyfile's fleet_size
)

// budgetCaddyfile is examples/fleet-redis's sidecar with fleet_size, a
// refresh window of half the token's life (tokens of a few seconds) and a
// fetch_timeout short enough that a cold burst meets the budget's
// deadline: a caller that cannot get a turn before it gets 503
// budget_exhausted with Retry-After at once.
const budgetCaddyfile = `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
		fleet_size 3
		refresh_window 0.5
		fetch_timeout 3s
		redis {
			address {$REDIS_ADDR}
			encryption_key {env.TOKEN_CACHE_KEY}
			timeout 200ms
		}
	}
	persist_config off
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker
	reverse_proxy {$SANDBOX_URL}
}
`

// newBudgetEnv starts the rate-limited stand-in and redis-server and
// writes the registry and the Caddyfile of the budget fleet.
func newBudgetEnv(t *testing.T) *fleetEnv {
	t.Helper()
	bin := builtOnce(t, "./cmd/caddy")
	r := startRedisServer(t)
	sb, url := serveSandbox(t, func(c *sandbox.Config) {
		for i := range budgetOrgs {
			c.Organisations = append(c.Organisations, sandbox.Organisation{ID: fmt.Sprintf("org-b%02d", i)})
		}
		c.NuapayMaxLifetime = budgetLifetime
		c.TokenRateLimit = sandbox.RateLimit{Rate: standInRate, Burst: standInBurst, Headers: true}
	})
	var reg strings.Builder
	fmt.Fprintf(&reg, "[providers.nuapay-sandbox]\ntype = \"nuapay\"\nbase_url = %q\napi_key = \"{env.NUAPAY_API_KEY}\"\n"+
		"timeout = \"5s\"\ntoken_lifetime = \"1h\"\nrate_limit = %q\nrate_burst = %d\n", url, budgetRateLimit, budgetBurst)
	for i := range budgetMerchants {
		fmt.Fprintf(&reg, "\n[merchants.b%03d]\nprovider = \"nuapay-sandbox\"\norganisation = \"org-b%02d\"\nscopes = [\"openbanking_pisp\"]\n", i, i%budgetOrgs)
	}
	dir := t.TempDir()
	path := filepath.Join(dir, "merchants.toml")
	caddyfile := filepath.Join(dir, "Caddyfile")
	if err := os.WriteFile(path, []byte(reg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(caddyfile, []byte(budgetCaddyfile), 0o600); err != nil {
		t.Fatal(err)
	}
	return &fleetEnv{t: t, bin: bin, sb: sb, sandboxURL: url, redis: r, registry: path, key: newCacheKey(), caddyfile: caddyfile}
}

// budgetAnswer is what a caller got.
type budgetAnswer struct {
	status     int
	valid      bool   // 200: the upstream saw a valid token
	code       string // error: the JSON body's error code
	retryAfter int    // error: the Retry-After header's seconds (0: none)
	err        error  // the request failed (no answer)
}

// budgetCall sends one request for merchant to node.
func budgetCall(n *fleetNode, merchant string) budgetAnswer {
	req, _ := http.NewRequest("GET", n.base+"/tpp/payments", nil)
	req.Header.Set("X-Merchant-Id", merchant)
	resp, err := fleetClient.Do(req)
	if err != nil {
		return budgetAnswer{err: err}
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	a := budgetAnswer{status: resp.StatusCode}
	if resp.StatusCode == http.StatusOK {
		var e echo
		a.valid = json.Unmarshal(body, &e) == nil && e.Authorization.Valid
		return a
	}
	var eb struct {
		Error string `json:"error"`
	}
	json.Unmarshal(body, &eb)
	a.code = eb.Error
	a.retryAfter, _ = strconv.Atoi(resp.Header.Get("Retry-After"))
	return a
}

// TestBudgetFleet: 100 merchants over 30 organisations warmed in one
// burst on three sidecars, then served for three token lifetimes. The
// stand-in never sees more token requests in any one-second window than
// the budget (rate_limit and rate_burst) and answers no 429; cold callers
// get a token or 503 budget_exhausted with a Retry-After, never a timeout;
// warm callers get a valid token every time; the fleet mints a key no
// more often than once per half lifetime (its refresh window), not once
// per sidecar.
func TestBudgetFleet(t *testing.T) {
	t.Parallel()
	f := newBudgetEnv(t)
	nodes := f.startFleet(budgetSidecars)
	start := time.Now()

	// The cold burst: every merchant at once, spread over the nodes.
	answers := make([]budgetAnswer, budgetMerchants)
	concurrently(budgetMerchants, nodes, func(i int, n *fleetNode) {
		answers[i] = budgetCall(n, fmt.Sprintf("b%03d", i))
	})
	cold := map[string]int{}
	for i, a := range answers {
		switch {
		case a.err != nil:
			t.Errorf("cold b%03d: no answer: %v", i, a.err)
		case a.status == http.StatusOK && a.valid:
			cold["token"]++
		case a.status == http.StatusServiceUnavailable && a.code == "budget_exhausted" && a.retryAfter >= 1:
			cold["503 budget_exhausted"]++
		default:
			t.Errorf("cold b%03d: %d %q Retry-After %d: want a valid token or 503 budget_exhausted with Retry-After", i, a.status, a.code, a.retryAfter)
		}
	}
	t.Logf("cold burst of %d merchants (%d keys): %v", budgetMerchants, budgetOrgs, cold)

	// Warm every merchant: a 503 is tried again after its Retry-After
	// (the test's bound is generous: the machine may be busy).
	for deadline := time.Now().Add(time.Minute); ; {
		var retry []int
		for i, a := range answers {
			if a.status != http.StatusOK {
				retry = append(retry, i)
			}
		}
		if len(retry) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d merchants still cold after a minute", len(retry))
		}
		time.Sleep(time.Second)
		for _, i := range retry {
			answers[i] = budgetCall(nodes[i%len(nodes)], fmt.Sprintf("b%03d", i))
		}
	}

	// Steady traffic on every merchant, from every node, for three
	// lifetimes: every answer a valid token.
	var calls, failed atomic.Int64
	var firstFailure sync.Once
	stop := time.Now().Add(budgetLifetimes * budgetLifetime)
	var wg sync.WaitGroup
	for w := range 2 * len(nodes) {
		n := nodes[w%len(nodes)]
		wg.Go(func() {
			for i := w; time.Now().Before(stop); i += 2 * len(nodes) {
				m := fmt.Sprintf("b%03d", i%budgetMerchants)
				a := budgetCall(n, m)
				calls.Add(1)
				if a.status != http.StatusOK || !a.valid {
					failed.Add(1)
					firstFailure.Do(func() {
						t.Errorf("warm %s on %s: %d %q valid=%v %v: want a valid token", m, n.base, a.status, a.code, a.valid, a.err)
					})
				}
				time.Sleep(20 * time.Millisecond)
			}
		})
	}
	wg.Wait()

	st := f.sb.TokenStats()
	t.Logf("warm traffic: %d calls, %d failed; stand-in: %d token requests, peak %d per second, %d in a sliding second, %d answered 429",
		calls.Load(), failed.Load(), st.Total, st.PeakSecond, st.PeakWindow, st.Limited)
	if failed.Load() > 0 {
		t.Errorf("%d of %d warm calls did not get a valid token", failed.Load(), calls.Load())
	}
	if st.Limited != 0 {
		t.Errorf("the stand-in answered %d token requests 429: the budget let more through than its limit", st.Limited)
	}
	if limit := int64(budgetRate + budgetBurst); st.PeakWindow > limit {
		t.Errorf("the stand-in saw %d token requests in one second, above the budget's rate_limit and rate_burst %d", st.PeakWindow, limit)
	}
	// At most a mint per key and a refresh per half lifetime (the refresh
	// window starts there) since the cold burst: a fleet that minted per
	// sidecar would need about three times as many.
	lifetimes := time.Since(start).Seconds() / budgetLifetime.Seconds()
	t.Logf("%.2f token requests per key per lifetime over %.1f lifetimes", float64(st.Total)/budgetOrgs/lifetimes, lifetimes)
	if most := int64(budgetOrgs * (1 + int(2*lifetimes))); st.Total > most {
		t.Errorf("the stand-in saw %d token requests for %d keys over %.1f lifetimes, want at most %d (one per key, then one per half lifetime)",
			st.Total, budgetOrgs, lifetimes, most)
	}
	// The fleet spent one bucket in Redis, under the provider's name and
	// a hash of its URL.
	keys, err := f.redis.Client().Keys(context.Background(), "rate:*").Result()
	if err != nil || len(keys) != 1 || !strings.HasPrefix(keys[0], "rate:token_broker:budget:nuapay-sandbox:") || strings.Contains(keys[0], "127.0.0.1") {
		t.Errorf("Redis keys of the budget %q (%v): want one, rate:token_broker:budget:nuapay-sandbox:HASH", keys, err)
	}
	// The admin state shows the budget each node spends.
	for _, n := range nodes {
		var rep struct {
			Providers []struct {
				Name   string `json:"name"`
				Budget *struct {
					Rate  float64 `json:"rate"`
					Burst int     `json:"burst"`
					Used  uint64  `json:"used"`
				} `json:"budget"`
			} `json:"providers"`
		}
		resp, err := http.Get(n.admin + "/token_broker/state")
		if err != nil {
			t.Fatal(err)
		}
		err = json.NewDecoder(resp.Body).Decode(&rep)
		resp.Body.Close()
		if err != nil || len(rep.Providers) != 1 || rep.Providers[0].Budget == nil {
			t.Fatalf("%s state: %v %+v: want one provider with a budget", n.admin, err, rep)
		}
		if b := rep.Providers[0].Budget; b.Rate != budgetRate || b.Burst != budgetBurst {
			t.Errorf("%s state: budget rate %g burst %d, want %d and %d", n.admin, b.Rate, b.Burst, budgetRate, budgetBurst)
		}
	}
	// Every key is minted once, then refreshed about once per lifetime.
	if min := int64(budgetOrgs * (1 + budgetLifetimes - 1)); st.Total < min {
		t.Errorf("the stand-in saw %d token requests, want at least %d (a mint and a refresh per lifetime per key)", st.Total, min)
	}
}

// TestBudgetFleetRedisDown: with Redis killed under three sidecars
// (fleet_size 3), each spends its share of the budget (rate_limit / 3,
// rate_burst / 3) in its fallback bucket while minting for itself: cold
// bursts on every sidecar never make the stand-in see more token requests
// in a second than the budget, and no 429 (each spending the whole limit
// would be three times that, above the stand-in's limit).
func TestBudgetFleetRedisDown(t *testing.T) {
	t.Parallel()
	f := newBudgetEnv(t)
	nodes := f.startFleet(budgetSidecars)
	f.redis.Kill()

	answers := make([]budgetAnswer, budgetMerchants)
	tokens := 0
	for round := range 4 {
		if round > 0 {
			time.Sleep(time.Second)
		}
		concurrently(budgetMerchants, nodes, func(i int, n *fleetNode) {
			if answers[i].status != http.StatusOK {
				answers[i] = budgetCall(n, fmt.Sprintf("b%03d", i))
			}
		})
	}
	for i, a := range answers {
		switch {
		case a.err != nil:
			t.Errorf("b%03d: no answer: %v", i, a.err)
		case a.status == http.StatusOK && a.valid:
			tokens++
		case a.status == http.StatusServiceUnavailable && a.code == "budget_exhausted" && a.retryAfter >= 1:
		default:
			t.Errorf("b%03d: %d %q Retry-After %d: want a valid token or 503 budget_exhausted with Retry-After", i, a.status, a.code, a.retryAfter)
		}
	}
	st := f.sb.TokenStats()
	t.Logf("Redis down: %d of %d merchants served; stand-in: %d token requests, %d in a sliding second, %d answered 429",
		tokens, budgetMerchants, st.Total, st.PeakWindow, st.Limited)
	if tokens == 0 {
		t.Error("no merchant got a token with Redis down: want each sidecar to spend its share")
	}
	if st.Limited != 0 {
		t.Errorf("the stand-in answered %d token requests 429 with Redis down: the sidecars spent more than their shares", st.Limited)
	}
	if limit := int64(budgetRate + budgetBurst); st.PeakWindow > limit {
		t.Errorf("with Redis down the stand-in saw %d token requests in one second, above the budget's %d: want each of %d sidecars to spend its share",
			st.PeakWindow, limit, budgetSidecars)
	}
}

// budgetState is a provider's budget in the admin state.
type budgetState struct {
	Rate float64 `json:"rate"`
	Used uint64  `json:"used"`
}

// adminBudget reads the budget of the only provider from the admin state.
func adminBudget(t *testing.T, admin string) budgetState {
	t.Helper()
	status, body := get(t, admin+"/token_broker/state")
	var rep struct {
		Providers []struct {
			Budget *budgetState `json:"budget"`
		} `json:"providers"`
	}
	if err := json.Unmarshal(body, &rep); status != http.StatusOK || err != nil || len(rep.Providers) != 1 || rep.Providers[0].Budget == nil {
		t.Fatalf("admin state: %d %s %v: want one provider with a budget", status, body, err)
	}
	return *rep.Providers[0].Budget
}

// TestBudgetKeptAcrossReload: a reload that keeps a provider's
// rate_limit and the app's fleet_size keeps its budget (what it spent
// stays spent); one that changes fleet_size gives it another, its share.
func TestBudgetKeptAcrossReload(t *testing.T) {
	_, url := startSandbox(t)
	dir := t.TempDir()
	registry := filepath.Join(dir, "merchants.toml")
	writeTestFile(t, registry, fmt.Sprintf(`[providers.nuapay]
type = "nuapay"
base_url = %q
api_key = "{env.NUAPAY_API_KEY}"
rate_limit = "12/s"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants.globex]
provider = "nuapay"
organisation = "org-globex"
scopes = ["openbanking_pisp"]
`, url))
	caddyfile := func(fleetSize int, header string) string {
		return fmt.Sprintf(`{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config %s
		fleet_size %d
	}
	persist_config off
}

http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	header X-Config %s
	token_broker
	reverse_proxy %s
}
`, registry, fleetSize, header, url)
	}
	base := startCaddy(t, caddyfile(2, "one"))
	admin := "http://127.0.0.1:" + os.Getenv("TOKEN_BROKER_ADMIN_PORT")
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	if b := adminBudget(t, admin); b.Rate != 6 || b.Used != 1 {
		t.Fatalf("before the reload: budget %+v, want rate 6 (12/s over 2 sidecars) and 1 used", b)
	}

	loadCaddy(t, caddyfile(2, "two")) // the routes change, not the budget
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "globex")
	if b := adminBudget(t, admin); b.Rate != 6 || b.Used != 2 {
		t.Errorf("after a reload that keeps the budget: %+v, want rate 6 and 2 used (the same budget)", b)
	}

	loadCaddy(t, caddyfile(3, "two"))
	if b := adminBudget(t, admin); b.Rate != 4 || b.Used != 0 {
		t.Errorf("after fleet_size 3: %+v, want another budget, rate 4 and none used", b)
	}
}
