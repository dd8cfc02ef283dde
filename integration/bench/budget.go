package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// Budget mode (-budget): sidecars sharing one redis-server spend a
// provider's token-request budget (rate_limit) against the sandbox's
// token API, which answers 429 above the same limit and counts the token
// requests of every second (sandbox.TokenStats). Every merchant is
// requested once in a cold burst spread over -budget-warm (a caller
// answered 503 budget_exhausted comes back after its Retry-After), then
// every merchant is called every budgetPeriod for -budget-lifetimes token
// lifetimes through the sandbox's echo, which says whether the token it
// got was valid. Three steps:
//
//   - budget: -budget-sidecars sidecars, rate_limit = -budget-rate: the
//     token API's peak per second, its 429s, the callers' errors and
//     expired tokens once warm, the cold answers (a token, or 503 with
//     Retry-After, within the deadline);
//   - no budget: the same without rate_limit, for the wave it prevents;
//   - steady: -budget-steady sidecars, a tenth of the merchants and
//     organisations: token requests per key per lifetime once warm.
//
// The merchants share organisations (-budget-orgs: the cache keys): the
// keys' refreshes must fit the rate (keys / lifetime at most three
// quarters of it, the share planned for refreshes; validate refuses more).
type budgetOptions struct {
	on           bool
	merchants    int
	orgs         int
	sidecars     int
	rate         int // token requests per second: rate_limit and the token API's limit
	lifetime     time.Duration
	lifetimes    int
	warm         time.Duration
	steady       int
	fetchTimeout time.Duration
}

// budgetPeriod is how often each merchant is called once warm.
const budgetPeriod = 10 * time.Second

// budgetFlags registers the budget mode's flags.
func budgetFlags(fs *flag.FlagSet, b *budgetOptions) {
	fs.BoolVar(&b.on, "budget", false, "budget mode: sidecars and redis-server spend a provider's rate_limit against a token API that answers 429 above it, with and without the budget (budget.go)")
	fs.IntVar(&b.merchants, "budget-merchants", 2000, "budget mode: merchants")
	fs.IntVar(&b.orgs, "budget-orgs", 800, "budget mode: their organisations (cache keys); keys per lifetime must fit three quarters of the rate")
	fs.IntVar(&b.sidecars, "budget-sidecars", 3, "budget mode: sidecars of the budget and no-budget steps")
	fs.IntVar(&b.rate, "budget-rate", 20, "budget mode: token requests per second, the registry's rate_limit and the token API's limit (its burst: one second's worth)")
	fs.DurationVar(&b.lifetime, "budget-lifetime", time.Minute, "budget mode: token_lifetime")
	fs.IntVar(&b.lifetimes, "budget-lifetimes", 3, "budget mode: token lifetimes of traffic once warm")
	fs.DurationVar(&b.warm, "budget-warm", 10*time.Second, "budget mode: the cold burst, every merchant once, spread over this")
	fs.IntVar(&b.steady, "budget-steady", 10, "budget mode: sidecars of the steady step (0 skips it)")
	fs.DurationVar(&b.fetchTimeout, "budget-fetch-timeout", 10*time.Second, "budget mode: the sidecars' fetch_timeout, a cold caller's deadline")
}

// validate checks the budget mode's flags when it is on.
func (b budgetOptions) validate() error {
	if !b.on {
		return nil
	}
	if b.merchants < 1 || b.orgs < 1 || b.orgs > b.merchants || b.sidecars < 1 || b.rate < 1 || b.lifetimes < 1 || b.steady < 0 ||
		b.lifetime < 10*time.Second || b.warm <= 0 || b.fetchTimeout < time.Second {
		return errors.New("flags: want -budget-merchants >= -budget-orgs >= 1, -budget-sidecars >= 1, -budget-rate >= 1, -budget-lifetimes >= 1, -budget-steady >= 0, -budget-lifetime >= 10s (the token API's minimum), -budget-warm > 0 and -budget-fetch-timeout >= 1s")
	}
	if need, most := float64(b.orgs)/b.lifetime.Seconds(), budget.BackgroundShare*float64(b.rate); need > most {
		return fmt.Errorf("flags: %d keys (-budget-orgs) of %s tokens need %.1f refreshes per second, more than three quarters of -budget-rate %d (%.1f/s, the share planned for refreshes): lower -budget-orgs to at most %d, or raise -budget-lifetime or -budget-rate",
			b.orgs, b.lifetime, need, b.rate, most, int(most*b.lifetime.Seconds()))
	}
	return nil
}

// budgetStep is one step of the budget mode.
type budgetStep struct {
	name      string
	sidecars  int
	merchants int
	orgs      int
	rateLimit bool // the registry's provider has rate_limit
}

// budgetResult is what one step measured.
type budgetResult struct {
	step budgetStep
	// cold counts the first answers of the cold burst, by kind; coldLate
	// those that came after the deadline; coldWorst the slowest.
	cold      map[string]int
	coldLate  int
	coldWorst time.Duration
	warmedIn  time.Duration // until every merchant had a token or gave up
	// coldFailed counts the callers that gave up: an answer without
	// Retry-After, or none.
	coldFailed       int
	firstColdFailure string
	// calls, failed and expired are the calls once warm, those without a
	// 200 and those whose token the token API no longer took as valid.
	calls, failed, expired int64
	firstFailure           string
	// stats are the token API's counts; trafficFrom is the Unix second
	// the traffic once warm began, trafficTokens its token requests.
	stats         sandbox.TokenStats
	trafficFrom   int64
	trafficTokens int64
}

func runBudget(o options) error {
	b := o.budget
	redisBin, err := lookRedis()
	if err != nil {
		return err
	}
	e, self, cleanup, err := newEnv(o, "tb-bench-budget-")
	if err != nil {
		return err
	}
	defer cleanup()
	steps := []budgetStep{
		{name: "budget", sidecars: b.sidecars, merchants: b.merchants, orgs: b.orgs, rateLimit: true},
		{name: "no budget", sidecars: b.sidecars, merchants: b.merchants, orgs: b.orgs},
	}
	if b.steady > 0 {
		steps = append(steps, budgetStep{name: "steady", sidecars: b.steady, merchants: max(1, b.merchants/10), orgs: max(1, b.orgs/10), rateLimit: true})
	}
	var results []budgetResult
	for i, st := range steps {
		progress("budget step %q: %d sidecars, %d merchants over %d organisations, rate_limit %v", st.name, st.sidecars, st.merchants, st.orgs, st.rateLimit)
		r, err := e.budgetStep(b, st, i, self, redisBin)
		if err != nil {
			return fmt.Errorf("budget step %q: %w", st.name, err)
		}
		results = append(results, r)
	}
	fmt.Print(budgetReport(b, results))
	return nil
}

// budgetStep runs one step with its own token API and redis-server,
// stopped (by pid) when it ends.
func (e *env) budgetStep(b budgetOptions, st budgetStep, n int, self, redisBin string) (budgetResult, error) {
	r := budgetResult{step: st, cold: map[string]int{}}
	var started []*proc
	defer func() {
		for _, p := range slices.Backward(started) {
			p.stop()
		}
	}()
	addrFile := filepath.Join(e.dir, fmt.Sprintf("tokenapi-%d.addr", n))
	ta, err := start(e.dir, fmt.Sprintf("tokenapi-%d", n), []string{apiKeyEnv + "=" + apiKey}, self, "tokenapi",
		"-addr-file", addrFile, "-orgs", strconv.Itoa(st.orgs), "-rate", strconv.Itoa(b.rate), "-burst", strconv.Itoa(b.rate))
	if err != nil {
		return r, err
	}
	started = append(started, ta)
	addr, err := readAddrFile(ta, addrFile, time.Minute)
	if err != nil {
		return r, err
	}
	tokenAPI := "http://" + addr
	rp, redisAddr, err := startRedis(e.dir, fmt.Sprintf("redis-%d", n), redisBin)
	if err != nil {
		return r, err
	}
	started = append(started, rp)
	registry := filepath.Join(e.dir, fmt.Sprintf("budget-%d.toml", n))
	if err := os.WriteFile(registry, []byte(budgetRegistryTOML(b, st, tokenAPI)), 0o644); err != nil {
		return r, err
	}
	key := newCacheKey()
	nodes := make([]*server, st.sidecars)
	for i := range nodes {
		// The sidecars proxy to the token API's echo, which says whether
		// the token a request carried is valid.
		s, err := e.startSidecar(fmt.Sprintf("budget-%d-node-%d", n, i), key, func(port, admin int) string {
			c := fleetCaddyfile(port, admin, addr, registry, redisAddr)
			return strings.Replace(c, "\t\tconfig "+registry+"\n", fmt.Sprintf("\t\tconfig %s\n\t\tfleet_size %d\n\t\tfetch_timeout %s\n", registry, st.sidecars, b.fetchTimeout), 1)
		})
		if err != nil {
			return r, err
		}
		started = append(started, s.p)
		nodes[i] = s
	}
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 256, MaxIdleConns: 1024}}
	defer client.CloseIdleConnections()

	progress("cold burst: %d merchants over %s", st.merchants, b.warm)
	r.coldBurst(client, nodes, st.merchants, b)
	before, err := tokenStats(tokenAPI)
	if err != nil {
		return r, err
	}
	r.trafficFrom = time.Now().Unix() + 1
	traffic := time.Duration(b.lifetimes) * b.lifetime
	progress("traffic once warm: every merchant every %s for %s", budgetPeriod, traffic)
	r.traffic(client, nodes, st.merchants, traffic)
	if r.stats, err = tokenStats(tokenAPI); err != nil {
		return r, err
	}
	r.trafficTokens = r.stats.Total - before.Total
	return r, nil
}

// budgetRegistryTOML is the step's registry: merchantID(i) in orgID(i %
// orgs), tokens of b.lifetime, rate_limit when the step has one.
func budgetRegistryTOML(b budgetOptions, st budgetStep, tokenAPI string) string {
	var s strings.Builder
	fmt.Fprintf(&s, "[providers.nuapay]\ntype = \"nuapay\"\nbase_url = %q\napi_key = \"{env.%s}\"\ntimeout = \"10s\"\ntoken_lifetime = %q\n",
		tokenAPI, apiKeyEnv, b.lifetime.String())
	if st.rateLimit {
		fmt.Fprintf(&s, "rate_limit = \"%d/s\"\n", b.rate)
	}
	s.WriteString("\n")
	for i := range st.merchants {
		merchantTOML(&s, merchantID(i), orgID(i%st.orgs))
	}
	return s.String()
}

// budgetCall is one request of a merchant: the status, the error code
// and Retry-After of an error answer, whether the token reached the echo
// valid, and how long the answer took.
type budgetCall struct {
	status     int
	code       string
	retryAfter time.Duration
	valid      bool
	took       time.Duration
	err        error
}

func callBudget(client *http.Client, s *server, merchant string) budgetCall {
	req, _ := http.NewRequest("GET", s.url(), nil)
	req.Header.Set("X-Merchant-Id", merchant)
	t0 := time.Now()
	resp, err := client.Do(req)
	if err != nil {
		return budgetCall{err: err, took: time.Since(t0)}
	}
	body, _ := io.ReadAll(resp.Body)
	resp.Body.Close()
	c := budgetCall{status: resp.StatusCode, took: time.Since(t0)}
	if resp.StatusCode == http.StatusOK {
		var e sandbox.Echo
		c.valid = json.Unmarshal(body, &e) == nil && e.Authorization.Valid
		return c
	}
	var eb struct {
		Error string `json:"error"`
	}
	json.Unmarshal(body, &eb)
	c.code = eb.Error
	if ra, err := strconv.Atoi(resp.Header.Get("Retry-After")); err == nil && ra > 0 {
		c.retryAfter = time.Duration(ra) * time.Second
	}
	return c
}

// coldBurst requests every merchant once, the starts spread evenly over
// b.warm on the nodes in turn; a caller answered with a Retry-After
// comes back after it until it has a token (within 10 minutes). A caller
// answered otherwise gives up (counted in coldFailed).
func (r *budgetResult) coldBurst(client *http.Client, nodes []*server, merchants int, b budgetOptions) {
	var mu sync.Mutex
	var wg sync.WaitGroup
	var failed atomic.Int64
	var first atomic.Value
	t0 := time.Now()
	giveUp := t0.Add(10 * time.Minute)
	for i := range merchants {
		time.Sleep(time.Until(t0.Add(b.warm * time.Duration(i) / time.Duration(merchants))))
		wg.Go(func() {
			s, m := nodes[i%len(nodes)], merchantID(i)
			for attempt := 0; ; attempt++ {
				c := callBudget(client, s, m)
				if attempt == 0 {
					kind := coldKind(c)
					mu.Lock()
					r.cold[kind]++
					r.coldWorst = max(r.coldWorst, c.took)
					if c.took > b.fetchTimeout+2*time.Second {
						r.coldLate++
					}
					mu.Unlock()
				}
				if c.err == nil && c.status == http.StatusOK {
					return
				}
				if c.retryAfter == 0 || time.Now().Add(c.retryAfter).After(giveUp) {
					failed.Add(1)
					first.CompareAndSwap(nil, fmt.Sprintf("merchant %s: %d %s %v", m, c.status, c.code, c.err))
					return
				}
				time.Sleep(c.retryAfter)
			}
		})
	}
	wg.Wait()
	r.warmedIn = time.Since(t0)
	r.coldFailed = int(failed.Load())
	if v, ok := first.Load().(string); ok {
		r.firstColdFailure = v
	}
}

// coldKind names a cold answer.
func coldKind(c budgetCall) string {
	switch {
	case c.err != nil:
		return "no answer"
	case c.status == http.StatusOK:
		return "token"
	case c.retryAfter > 0:
		return fmt.Sprintf("%d %s + Retry-After", c.status, c.code)
	}
	return fmt.Sprintf("%d %s", c.status, c.code)
}

// traffic calls every merchant every budgetPeriod for d, merchant i on
// node i % len(nodes), and counts the failures and expired tokens.
func (r *budgetResult) traffic(client *http.Client, nodes []*server, merchants int, d time.Duration) {
	var calls, failed, expired atomic.Int64
	var first atomic.Value
	const workers = 64
	stop := time.Now().Add(d)
	var wg sync.WaitGroup
	for w := range workers {
		wg.Go(func() {
			start := time.Now()
			if w >= merchants {
				return
			}
			for round := 0; ; round++ {
				for i := w; i < merchants; i += workers {
					// Each merchant once per period, its calls spread over it.
					at := start.Add(time.Duration(round)*budgetPeriod + budgetPeriod*time.Duration(i)/time.Duration(merchants))
					if at.After(stop) {
						return
					}
					time.Sleep(time.Until(at))
					c := callBudget(client, nodes[i%len(nodes)], merchantID(i))
					calls.Add(1)
					switch {
					case c.err != nil || c.status != http.StatusOK:
						failed.Add(1)
						first.CompareAndSwap(nil, fmt.Sprintf("merchant %s: %d %s %v", merchantID(i), c.status, c.code, c.err))
					case !c.valid:
						expired.Add(1)
					}
				}
			}
		})
	}
	wg.Wait()
	r.calls, r.failed, r.expired = calls.Load(), failed.Load(), expired.Load()
	if v, ok := first.Load().(string); ok {
		r.firstFailure = v
	}
}

// tokenStats reads the token API's statistics.
func tokenStats(tokenAPI string) (sandbox.TokenStats, error) {
	var st sandbox.TokenStats
	resp, err := http.Get(tokenAPI + sandbox.TokenStatsPath)
	if err != nil {
		return st, err
	}
	defer resp.Body.Close()
	err = json.NewDecoder(resp.Body).Decode(&st)
	return st, err
}

// peakFrom is the most token requests of one calendar second from the
// Unix second from on.
func peakFrom(st sandbox.TokenStats, from int64) int64 {
	var peak int64
	for _, s := range st.Seconds {
		if s.Second >= from {
			peak = max(peak, s.Requests)
		}
	}
	return peak
}

// budgetReport is the markdown of the budget mode's results.
func budgetReport(b budgetOptions, results []budgetResult) string {
	var s strings.Builder
	fmt.Fprintf(&s, "## Token API budget: rate_limit %d/s against a token API answering 429 above %d/s (burst %d)\n\n", b.rate, b.rate, b.rate)
	fmt.Fprintf(&s, "%s\n\n", machine())
	fmt.Fprintf(&s, "Cold burst: every merchant once, spread over %s, a 503 with Retry-After tried again after it; then every merchant every %s for %d lifetimes of %s; fetch_timeout %s; one redis-server.\n\n",
		b.warm, budgetPeriod, b.lifetimes, b.lifetime, b.fetchTimeout)
	fmt.Fprintf(&s, "| step | sidecars | merchants / keys | cold answers | cold answers after the deadline (slowest) | cold callers that gave up | all warm in | peak token requests per second (sliding second), whole run | peak per second once warm | 429s | calls once warm | failed | expired tokens | token requests per key per lifetime once warm |\n")
	fmt.Fprintf(&s, "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	for _, r := range results {
		kinds := make([]string, 0, len(r.cold))
		for k, n := range r.cold {
			kinds = append(kinds, fmt.Sprintf("%s: %d", k, n))
		}
		slices.Sort(kinds)
		perKey := float64(r.trafficTokens) / float64(r.step.orgs) / float64(b.lifetimes)
		failed := strconv.FormatInt(r.failed, 10)
		if r.firstFailure != "" {
			failed += " (first: " + r.firstFailure + ")"
		}
		gaveUp := strconv.Itoa(r.coldFailed)
		if r.firstColdFailure != "" {
			gaveUp += " (first: " + r.firstColdFailure + ")"
		}
		fmt.Fprintf(&s, "| %s | %d | %d / %d | %s | %d (%s) | %s | %s | %d (%d) | %d | %d | %d | %s | %d | %.2f |\n",
			r.step.name, r.step.sidecars, r.step.merchants, r.step.orgs, strings.Join(kinds, ", "), r.coldLate, secs(r.coldWorst),
			gaveUp, secs(r.warmedIn), r.stats.PeakSecond, r.stats.PeakWindow, peakFrom(r.stats, r.trafficFrom), r.stats.Limited,
			r.calls, failed, r.expired, perKey)
	}
	return s.String()
}
