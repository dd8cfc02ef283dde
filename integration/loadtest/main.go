// Command loadtest measures the token broker end to end on loopback, in one
// process: a direct upstream, Caddy's reverse_proxy with a static
// `header_up Authorization`, and the broker with cached tokens for 1, 1 000
// and 100 000 merchants, driven in interleaved rounds by a closed-loop
// keep-alive client; then a cold burst, a steady load with 10 s tokens, and
// the heap per cached token. Everything listens on 127.0.0.1 and stops when
// the run ends; the run is bounded by its flags.
//
// Its figures are in-process: client, sidecar, upstream and sandbox share
// one process (heap, GC, scheduler) and it does not measure CPU per
// request. The end-to-end comparison as separate processes is
// integration/bench (`make bench`).
//
//	go run ./integration/loadtest [-clients 32] [-rounds 3] [-round 3s] [-merchants 100000] [-burst 1000] [-steady 35s]
package main

import (
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	_ "github.com/tokenbroker/caddy-token-broker/module"
)

const apiKey = "loadtest-partner-key"

var (
	clients   = flag.Int("clients", 32, "concurrent closed-loop clients")
	rounds    = flag.Int("rounds", 3, "interleaved rounds per configuration")
	roundDur  = flag.Duration("round", 3*time.Second, "duration of one round of one configuration")
	merchants = flag.Int("merchants", 100_000, "merchants in the registry (the largest spread)")
	burstN    = flag.Int("burst", 1000, "concurrent first requests of the cold burst")
	steadyDur = flag.Duration("steady", 35*time.Second, "duration of the steady load with 10s tokens (0 skips it)")
	steadyN   = flag.Int("steady-merchants", 10, "merchants of the steady load")
)

func main() {
	flag.Parse()
	log.SetFlags(0)
	if *merchants < 1000 {
		log.Fatal("-merchants must be at least 1000")
	}
	dir, err := os.MkdirTemp("", "tb-loadtest-")
	check(err)
	defer os.RemoveAll(dir)

	upstream := serve(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		io.Copy(io.Discard, r.Body)
		w.Header().Set("Content-Type", "text/plain")
		w.Write([]byte("ok\n"))
	}))
	defer upstream.Close()

	orgs := make([]sandbox.Organisation, 0, *merchants+1+*steadyN)
	for i := range *merchants {
		orgs = append(orgs, sandbox.Organisation{ID: org(i)})
	}
	orgs = append(orgs, sandbox.Organisation{ID: "org-burst"})
	for i := range *steadyN {
		orgs = append(orgs, sandbox.Organisation{ID: fmt.Sprintf("org-steady-%d", i)})
	}
	sb := sandbox.New(sandbox.Config{APIKeys: []string{apiKey}, Organisations: orgs})
	gatekeeper := serve(sb)
	defer gatekeeper.Close()

	registry := filepath.Join(dir, "merchants.toml")
	writeRegistry(registry, "http://"+gatekeeper.Addr().String())

	ports := map[string]int{"static": freePort(), "broker": freePort(), "steady": freePort()}
	admin := freePort()
	caddyfile := fmt.Sprintf(`{
	admin 127.0.0.1:%d
	persist_config off
	log {
		output discard
	}
	token_broker {
		config %s
	}
}

http://:%d {
	bind 127.0.0.1
	reverse_proxy %s {
		header_up Authorization "Bearer x"
	}
}

http://:%d {
	bind 127.0.0.1
	token_broker
	reverse_proxy %s
}

http://:%d {
	bind 127.0.0.1
	token_broker
	reverse_proxy %s
}
`, admin, registry, ports["static"], upstream.Addr(), ports["broker"], upstream.Addr(), ports["steady"], upstream.Addr())
	var before runtime.MemStats
	loadCaddy(caddyfile)
	defer caddy.Stop()

	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 2 * *clients, MaxIdleConns: 4 * *clients,
		DisableCompression: true, IdleConnTimeout: time.Minute}}
	base := func(name string) string { return fmt.Sprintf("http://127.0.0.1:%d", ports[name]) }

	printMachine()

	// Warm the cache: one token per merchant, and measure the heap it takes.
	runtime.GC()
	runtime.ReadMemStats(&before)
	t0 := time.Now()
	warm(client, base("broker"), *merchants)
	warmTime := time.Since(t0)
	runtime.GC()
	var after runtime.MemStats
	runtime.ReadMemStats(&after)
	fetched := sb.TokenRequests()
	fmt.Printf("warm-up: %d tokens fetched in %s (%.0f tokens/s)\n", fetched, warmTime.Round(time.Millisecond), float64(fetched)/warmTime.Seconds())
	perToken := (float64(after.HeapAlloc) - float64(before.HeapAlloc)) / float64(*merchants)
	fmt.Printf("heap per cached token (whole process, including the in-process sandbox's own record of each token it issued): %.0f bytes\n\n", perToken)

	// Interleaved closed-loop rounds.
	configs := []loadConfig{
		{name: "direct", url: "http://" + upstream.Addr().String() + "/v1/payments"},
		{name: "static-header", url: base("static") + "/v1/payments"},
		{name: "sidecar-1", url: base("broker") + "/v1/payments", merchants: 1},
		{name: "sidecar-1000", url: base("broker") + "/v1/payments", merchants: 1000},
		{name: fmt.Sprintf("sidecar-%d", *merchants), url: base("broker") + "/v1/payments", merchants: *merchants},
	}
	results := make([]*stats, len(configs))
	for i := range results {
		results[i] = &stats{}
	}
	tokensBefore := sb.TokenRequests()
	for r := range *rounds {
		for i, c := range configs {
			if r%2 == 1 { // alternate the order between rounds
				i = len(configs) - 1 - i
				c = configs[i]
			}
			results[i].add(drive(client, c, *clients, *roundDur))
		}
	}
	fmt.Printf("closed loop: %d clients, %d rounds x %s per configuration, interleaved\n", *clients, *rounds, *roundDur)
	fmt.Printf("%-16s %12s %10s %10s %8s\n", "config", "req/s", "p50", "p99", "errors")
	for i, c := range configs {
		s := results[i]
		fmt.Printf("%-16s %12.0f %10s %10s %8d\n", c.name, s.throughput(), s.quantile(0.50), s.quantile(0.99), s.errors)
	}
	static := results[1]
	fmt.Println()
	for i := 2; i < len(configs); i++ {
		s := results[i]
		fmt.Printf("ratio %s / static-header: throughput %.3f (target >= 0.97), p99 %.3f (target <= 1.05)\n",
			configs[i].name, s.throughput()/static.throughput(), float64(s.quantile(0.99))/float64(static.quantile(0.99)))
	}
	fmt.Printf("token API calls during the rounds: %d (want 0: every token was cached)\n\n", sb.TokenRequests()-tokensBefore)

	// Cold burst: N concurrent first requests for one merchant.
	tokensBefore = sb.TokenRequests()
	burst := coldBurst(base("broker")+"/v1/payments", "burst", *burstN)
	fmt.Printf("cold burst: %d concurrent first requests for one merchant -> %d token API call(s) (target 1), p50 %s, p99 %s, errors %d\n\n",
		*burstN, sb.TokenRequests()-tokensBefore, burst.quantile(0.5), burst.quantile(0.99), burst.errors)

	// Steady load with 10 s tokens.
	if *steadyDur > 0 {
		steady(client, base("steady"), admin, *steadyN, *steadyDur, sb)
	}
}

type loadConfig struct {
	name, url string
	merchants int // 0: no merchant header
}

// drive runs a closed loop of n clients against c for d.
func drive(client *http.Client, c loadConfig, n int, d time.Duration) *stats {
	var wg sync.WaitGroup
	out := make([]*stats, n)
	deadline := time.Now().Add(d)
	start := time.Now()
	for w := range n {
		out[w] = &stats{lat: make([]time.Duration, 0, 1<<14)}
		wg.Go(func() {
			s := out[w]
			i := w * 7919
			for time.Now().Before(deadline) {
				merchant := ""
				if c.merchants > 0 {
					i = (i + 7919) % c.merchants
					merchant = name(i)
				}
				t := time.Now()
				ok := get(client, c.url, merchant)
				s.lat = append(s.lat, time.Since(t))
				if !ok {
					s.errors++
				}
			}
		})
	}
	wg.Wait()
	total := &stats{elapsed: time.Since(start)}
	for _, s := range out {
		total.lat = append(total.lat, s.lat...)
		total.errors += s.errors
	}
	return total
}

func get(client *http.Client, url, merchant string) bool {
	req, _ := http.NewRequest("GET", url, nil)
	if merchant != "" {
		req.Header.Set("X-Merchant-Id", merchant)
	}
	resp, err := client.Do(req)
	if err != nil {
		return false
	}
	io.Copy(io.Discard, resp.Body)
	resp.Body.Close()
	return resp.StatusCode == http.StatusOK
}

// warm requests one token per merchant, 32 at a time.
func warm(client *http.Client, base string, n int) {
	var next atomic.Int64
	var failed atomic.Int64
	var wg sync.WaitGroup
	for range 32 {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				if !get(client, base+"/warm", name(i)) {
					failed.Add(1)
				}
			}
		})
	}
	wg.Wait()
	if failed.Load() > 0 {
		log.Fatalf("warm-up: %d requests failed", failed.Load())
	}
}

// coldBurst sends n concurrent first requests for one merchant, each on its
// own connection, released at once.
func coldBurst(url, merchant string, n int) *stats {
	client := &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: n, MaxConnsPerHost: n, DisableCompression: true}}
	defer client.CloseIdleConnections()
	// Open the connections first, so that the burst measures the broker,
	// not TCP handshakes.
	var wg sync.WaitGroup
	for range n {
		wg.Go(func() { get(client, strings.Replace(url, "/v1/payments", "/", 1), "") })
	}
	wg.Wait()
	s := &stats{lat: make([]time.Duration, n)}
	var errs atomic.Int64
	gate := make(chan struct{})
	for i := range n {
		wg.Go(func() {
			<-gate
			t := time.Now()
			if !get(client, url, merchant) {
				errs.Add(1)
			}
			s.lat[i] = time.Since(t)
		})
	}
	close(gate)
	wg.Wait()
	s.errors = int(errs.Load())
	return s
}

// steady drives the 10 s-token merchants for d after a warm-up and reports,
// from the broker's own metrics, how many requests waited on a fetch.
func steady(client *http.Client, base string, admin, n int, d time.Duration, sb *sandbox.Server) {
	for i := range n {
		if !get(client, base+"/v1/payments", fmt.Sprintf("steady-%d", i)) {
			log.Fatal("steady warm-up failed")
		}
	}
	metricsURL := fmt.Sprintf("http://127.0.0.1:%d/metrics", admin)
	m0 := scrape(metricsURL)
	tokens0 := sb.TokenRequests()
	var wg sync.WaitGroup
	var reqs, errs atomic.Int64
	deadline := time.Now().Add(d)
	for w := range 8 {
		wg.Go(func() {
			i := w
			for time.Now().Before(deadline) {
				i = (i + 1) % n
				if !get(client, base+"/v1/payments", fmt.Sprintf("steady-%d", i)) {
					errs.Add(1)
				}
				reqs.Add(1)
				time.Sleep(time.Millisecond) // a steady trickle, not a flood
			}
		})
	}
	wg.Wait()
	m1 := scrape(metricsURL)
	delta := func(result string) float64 {
		k := `caddy_token_broker_cache_lookups_total{provider="nuapay-10s",result="` + result + `"}`
		return m1[k] - m0[k]
	}
	fmt.Printf("steady load: %d merchants with 10s tokens, %s, %d requests, %d errors\n", n, d, reqs.Load(), errs.Load())
	fmt.Printf("  after warm-up: %.0f hit, %.0f refresh-ahead, %.0f miss + %.0f shared = %.0f requests waited on a fetch (target 0); %d token API calls\n",
		delta("hit"), delta("refresh"), delta("miss"), delta("shared"), delta("miss")+delta("shared"), sb.TokenRequests()-tokens0)
}

// scrape reads the caddy_token_broker_ samples of Caddy's /metrics.
func scrape(url string) map[string]float64 {
	resp, err := http.Get(url)
	check(err)
	defer resp.Body.Close()
	body, err := io.ReadAll(resp.Body)
	check(err)
	out := map[string]float64{}
	for line := range strings.SplitSeq(string(body), "\n") {
		if !strings.HasPrefix(line, "caddy_token_broker_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, _ := strconv.ParseFloat(line[i+1:], 64)
		out[line[:i]] = v
	}
	return out
}

type stats struct {
	lat     []time.Duration
	elapsed time.Duration
	errors  int
	sorted  bool
}

func (s *stats) add(o *stats) {
	s.lat = append(s.lat, o.lat...)
	s.elapsed += o.elapsed
	s.errors += o.errors
	s.sorted = false
}

func (s *stats) throughput() float64 { return float64(len(s.lat)) / s.elapsed.Seconds() }

func (s *stats) quantile(q float64) time.Duration {
	if len(s.lat) == 0 {
		return 0
	}
	if !s.sorted {
		slices.Sort(s.lat)
		s.sorted = true
	}
	return s.lat[min(len(s.lat)-1, int(q*float64(len(s.lat))))].Round(time.Microsecond)
}

func name(i int) string { return fmt.Sprintf("m%06d", i) }
func org(i int) string  { return fmt.Sprintf("org-%06d", i) }

func writeRegistry(path, gatekeeper string) {
	var b strings.Builder
	// The key goes through the environment: the registry refuses clear text.
	check(os.Setenv("LOADTEST_NUAPAY_API_KEY", apiKey))
	const key = "{env.LOADTEST_NUAPAY_API_KEY}"
	fmt.Fprintf(&b, "[providers.nuapay]\ntype = \"nuapay\"\nbase_url = %q\napi_key = %q\ntimeout = \"10s\"\ntoken_lifetime = \"1h\"\n\n", gatekeeper, key)
	fmt.Fprintf(&b, "[providers.nuapay-10s]\ntype = \"nuapay\"\nbase_url = %q\napi_key = %q\ntimeout = \"10s\"\ntoken_lifetime = \"10s\"\n\n", gatekeeper, key)
	for i := range *merchants {
		fmt.Fprintf(&b, "[merchants.%s]\nprovider = \"nuapay\"\norganisation = %q\nscopes = [\"openbanking_pisp\"]\n\n", name(i), org(i))
	}
	b.WriteString("[merchants.burst]\nprovider = \"nuapay\"\norganisation = \"org-burst\"\nscopes = [\"openbanking_pisp\"]\n\n")
	for i := range *steadyN {
		fmt.Fprintf(&b, "[merchants.steady-%d]\nprovider = \"nuapay-10s\"\norganisation = \"org-steady-%d\"\nscopes = [\"openbanking_pisp\"]\n\n", i, i)
	}
	check(os.WriteFile(path, []byte(b.String()), 0o600))
}

func loadCaddy(caddyfile string) {
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile), map[string]any{"filename": "loadtest"})
	check(err)
	check(caddy.Load(cfg, true))
}

// serve runs h on a free port of 127.0.0.1.
func serve(h http.Handler) net.Listener {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	srv := &http.Server{Handler: h, ReadHeaderTimeout: 10 * time.Second}
	go srv.Serve(l)
	return l
}

func freePort() int {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	check(err)
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port
}

func printMachine() {
	model := "unknown"
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for line := range strings.SplitSeq(string(b), "\n") {
			if k, v, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(k) == "model name" {
				model = strings.TrimSpace(v)
				break
			}
		}
	}
	load := ""
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		load = strings.TrimSpace(string(b))
	}
	fmt.Printf("machine: %d CPUs (%s), %s, GOMAXPROCS %d, load average %s, %s\n\n", runtime.NumCPU(), model,
		runtime.Version(), runtime.GOMAXPROCS(0), load, time.Now().UTC().Format(time.RFC3339))
}

func check(err error) {
	if err != nil {
		log.Fatal(err)
	}
}
