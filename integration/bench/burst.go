package main

import (
	"bufio"
	"fmt"
	"io"
	"net/http"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// burstWorkers is how many requests the driver keeps in flight per
// sidecar during the cold burst.
const burstWorkers = 200

// burstResult is what the cold burst measured.
type burstResult struct {
	merchants, burners int
	tokenRequests      int64
	failed             int64
	firstErr           string
	took               time.Duration
	p50, p99           time.Duration
	// Summed over the sidecars, from their /metrics (timeouts, openings
	// and bypasses: -1 when a sidecar does not export the series) and
	// their logs (breaker openings, which every version logs).
	timeouts, errs, bypassed, openings, openingsLogged int64
}

// burn keeps one CPU busy until the process is stopped: the driver's
// burner helper (bench burn).
func burn() {
	x := uint64(1)
	for {
		x = x*6364136223846793005 + 1442695040888963407
	}
}

// coldBurst requests merchants first … first+n-1 on every sidecar at
// once (burstWorkers at a time per sidecar, each sidecar in the same
// order) while burners processes of the driver (self) spin, and counts
// the token requests it cost, the Redis timeouts, errors and breaker
// openings of the sidecars.
func (e *env) coldBurst(nodes []*server, self string, first, n, burners int) (*burstResult, error) {
	r := &burstResult{merchants: n, burners: burners}
	before, err := e.tokenCount()
	if err != nil {
		return nil, err
	}
	m0, err := fleetMetrics(nodes)
	if err != nil {
		return nil, err
	}
	var spinning []*proc
	for i := range burners {
		p, err := start(e.dir, fmt.Sprintf("burner-%d", i), nil, self, "burn")
		if err != nil {
			return nil, err
		}
		spinning = append(spinning, p)
	}
	defer func() {
		for _, p := range spinning {
			p.stop()
		}
	}()
	progress("cold burst: %d merchants on each of %d sidecars at once, %d CPU burners", n, len(nodes), burners)
	time.Sleep(time.Second) // the burners take the CPUs
	client := &http.Client{Timeout: 2 * time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: burstWorkers}}
	defer client.CloseIdleConnections()
	var mu sync.Mutex
	var lat []time.Duration
	var failed atomic.Int64
	var firstErr atomic.Value
	var wg sync.WaitGroup
	t0 := time.Now()
	for _, s := range nodes {
		var next atomic.Int64
		for range burstWorkers {
			wg.Go(func() {
				for {
					i := int(next.Add(1)) - 1
					if i >= n {
						return
					}
					req, _ := http.NewRequest("GET", s.url(), nil)
					req.Header.Set("X-Merchant-Id", merchantID(first+i))
					start := time.Now()
					resp, err := client.Do(req)
					if err == nil {
						io.Copy(io.Discard, resp.Body)
						resp.Body.Close()
						if resp.StatusCode != http.StatusOK {
							err = fmt.Errorf("%s merchant %s: status %d", s.url(), merchantID(first+i), resp.StatusCode)
						}
					}
					if err != nil {
						failed.Add(1)
						firstErr.CompareAndSwap(nil, err.Error())
						continue
					}
					d := time.Since(start)
					mu.Lock()
					lat = append(lat, d)
					mu.Unlock()
				}
			})
		}
	}
	wg.Wait()
	r.took = time.Since(t0)
	for _, p := range spinning {
		p.stop()
	}
	spinning = nil
	after, err := e.tokenCount()
	if err != nil {
		return nil, err
	}
	m1, err := fleetMetrics(nodes)
	if err != nil {
		return nil, err
	}
	r.tokenRequests = after - before
	r.failed = failed.Load()
	if v, ok := firstErr.Load().(string); ok {
		r.firstErr = v
	}
	slices.Sort(lat)
	if len(lat) > 0 {
		r.p50, r.p99 = lat[len(lat)/2], lat[int(.99*float64(len(lat)-1))]
	}
	diff := func(a, b int64) int64 {
		if a < 0 || b < 0 {
			return -1
		}
		return b - a
	}
	r.timeouts, r.errs = diff(m0.timeouts, m1.timeouts), diff(m0.errs, m1.errs)
	r.bypassed, r.openings = diff(m0.bypassed, m1.bypassed), diff(m0.openings, m1.openings)
	for _, s := range nodes {
		r.openingsLogged += countLines(s.p.log, "redis unavailable")
	}
	return r, nil
}

// print writes the burst's table.
func (r *burstResult) print(sidecars int) {
	orNA := func(v int64) string {
		if v < 0 {
			return "n/a (not exported by this build)"
		}
		return strconv.FormatInt(v, 10)
	}
	fmt.Printf("\n### Cold burst: %d merchants on each of %d sidecars at once, %d CPU burners\n\n", r.merchants, sidecars, r.burners)
	fmt.Printf("| measure | value |\n| --- | --- |\n")
	fmt.Printf("| token requests at the token API (target: one per merchant, %d) | %d |\n", r.merchants, r.tokenRequests)
	fmt.Printf("| failed requests | %d %s |\n", r.failed, r.firstErr)
	fmt.Printf("| burst time; request p50 / p99 | %s; %s / %s |\n", r.took.Round(time.Millisecond), r.p50.Round(time.Millisecond), r.p99.Round(time.Millisecond))
	fmt.Printf("| Redis timeouts (all sidecars) | %s |\n", orNA(r.timeouts))
	fmt.Printf("| Redis errors, timeouts included (all sidecars) | %s |\n", orNA(r.errs))
	fmt.Printf("| lookups that minted without the shared tier | %s |\n", orNA(r.bypassed))
	fmt.Printf("| breaker openings: sidecars' logs / metrics | %d / %s |\n", r.openingsLogged, orNA(r.openings))
}

// fleetCounts are the shared tier's counters summed over the sidecars.
type fleetCounts struct{ timeouts, errs, bypassed, openings int64 }

// fleetMetrics sums the shared tier's counters of every sidecar's
// /metrics (admin API); a series no sidecar exports is -1.
func fleetMetrics(nodes []*server) (fleetCounts, error) {
	c := fleetCounts{-1, -1, -1, -1}
	var body string
	add := func(dst *int64, name string) {
		v, ok := metricSum(body, name)
		if !ok {
			return
		}
		if *dst < 0 {
			*dst = 0
		}
		*dst += int64(v)
	}
	for _, s := range nodes {
		resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", s.admin))
		if err != nil {
			return c, err
		}
		b, err := io.ReadAll(resp.Body)
		resp.Body.Close()
		if err != nil {
			return c, err
		}
		body = string(b)
		add(&c.timeouts, "caddy_token_broker_l2_timeouts_total")
		add(&c.errs, "caddy_token_broker_l2_errors_total")
		add(&c.bypassed, "caddy_token_broker_l2_bypassed_total")
		add(&c.openings, "caddy_token_broker_l2_breaker_openings_total")
	}
	// A counter vector without any series yet is absent even where the
	// build has it: it reads 0 when a plain counter of the same build is
	// there (errors came with bypasses, timeouts with breaker openings).
	if c.errs < 0 && c.bypassed >= 0 {
		c.errs = 0
	}
	if c.timeouts < 0 && c.openings >= 0 {
		c.timeouts = 0
	}
	return c, nil
}

// metricSum sums the samples of metric name (every label set) in a
// Prometheus text exposition; ok is false when there is none and no
// HELP line names it.
func metricSum(body, name string) (sum float64, ok bool) {
	for line := range strings.SplitSeq(body, "\n") {
		if strings.HasPrefix(line, "# HELP "+name+" ") {
			ok = true
			continue
		}
		rest, found := strings.CutPrefix(line, name)
		if !found || (rest != "" && rest[0] != '{' && rest[0] != ' ') {
			continue
		}
		f := strings.Fields(line)
		if v, err := strconv.ParseFloat(f[len(f)-1], 64); err == nil {
			sum, ok = sum+v, true
		}
	}
	return sum, ok
}

// countLines counts the lines of file path that contain s.
func countLines(path, s string) int64 {
	f, err := os.Open(path)
	if err != nil {
		return 0
	}
	defer f.Close()
	var n int64
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64*1024), 1024*1024)
	for sc.Scan() {
		if strings.Contains(sc.Text(), s) {
			n++
		}
	}
	return n
}
