package main

import (
	"crypto/rand"
	"encoding/base64"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// Fleet mode (-fleet N): N sidecars share one redis-server. It measures
// the mints per key per token lifetime under steady traffic spread over the
// fleet (target 1: one refresh per key per refresh period, whatever N), and
// the latency added by an L1 miss served from L2: a merchant minted on
// node 0, then called on node 1 (L1 miss, L2 hit) and again (L1 hit).
// First, unless -fleet-burst 0, the cold burst (burst.go): -fleet-burst
// merchants never seen before, requested at once on every sidecar while
// -fleet-burners processes keep the CPUs busy.
const (
	fleetKeys   = 10  // merchants under steady traffic
	fleetProbes = 200 // merchants of the L2 latency probe
)

func fleetRegistryTOML(n int, tokenAPI string, lifetime time.Duration) string {
	return strings.Replace(registryTOML(n, tokenAPI), `token_lifetime = "6h"`, fmt.Sprintf("token_lifetime = %q", lifetime), 1)
}

func fleetCaddyfile(port, admin int, upstream, registry, redisAddr string) string {
	c := caddyfile(port, admin, upstream, registry)
	return strings.Replace(c, "\t\tconfig "+registry+"\n",
		"\t\tconfig "+registry+"\n\t\tredis {\n\t\t\taddress "+redisAddr+"\n\t\t\tencryption_key {env.TOKEN_CACHE_KEY}\n\t\t}\n", 1)
}

// newCacheKey is a random TOKEN_CACHE_KEY for the sidecars of a fleet.
func newCacheKey() string {
	key := make([]byte, 32)
	rand.Read(key)
	return base64.StdEncoding.EncodeToString(key)
}

// startSidecar starts the sidecar name of a fleet (startServer): its
// Caddyfile made by caddyfile, the fleet's TOKEN_CACHE_KEY and Caddy data
// and config folders of its own; it returns once the sidecar answers HTTP.
func (e *env) startSidecar(name, cacheKey string, caddyfile func(port, admin int) string) (*server, error) {
	env := []string{apiKeyEnv + "=" + apiKey, "TOKEN_CACHE_KEY=" + cacheKey,
		"XDG_DATA_HOME=" + filepath.Join(e.dir, "data", name), "XDG_CONFIG_HOME=" + filepath.Join(e.dir, "config", name)}
	t0 := time.Now()
	s, err := e.startServer(name, env, caddyfile)
	if err != nil {
		return nil, err
	}
	if _, err := waitHTTP(s.p, s.url(), nil, t0, 5*time.Minute); err != nil {
		s.p.stop()
		return nil, err
	}
	return s, nil
}

func runFleet(o options) error {
	redisBin, err := lookRedis()
	if err != nil {
		return err
	}
	e, self, cleanup, err := newEnv(o, "tb-bench-fleet-")
	if err != nil {
		return err
	}
	defer cleanup()
	dir := e.dir
	n := fleetKeys + fleetProbes + o.fleetBurst
	if err := e.startTokenAPI(self, nil, "-orgs", fmt.Sprint(n)); err != nil {
		return err
	}
	_, redisAddr, err := startRedis(dir, "redis", redisBin)
	if err != nil {
		return err
	}
	registry := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(registry, []byte(fleetRegistryTOML(n, e.tokenAPI, o.fleetLifetime)), 0o644); err != nil {
		return err
	}
	key := newCacheKey()
	nodes := make([]*server, o.fleet)
	for i := range nodes {
		if nodes[i], err = e.startSidecar(fmt.Sprintf("node-%d", i), key, func(port, admin int) string {
			return fleetCaddyfile(port, admin, e.upstream, registry, redisAddr)
		}); err != nil {
			return err
		}
	}
	progress("%d sidecars and redis-server on %s", o.fleet, redisAddr)
	var burst *burstResult
	if o.fleetBurst > 0 {
		if burst, err = e.coldBurst(nodes, self, fleetKeys+fleetProbes, o.fleetBurst, o.fleetBurners); err != nil {
			return err
		}
	}
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{MaxIdleConnsPerHost: 64}}
	call := func(s *server, m int) (time.Duration, error) {
		req, _ := http.NewRequest("GET", s.url(), nil)
		req.Header.Set("X-Merchant-Id", merchantID(m))
		t0 := time.Now()
		resp, err := client.Do(req)
		if err != nil {
			return 0, err
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return 0, fmt.Errorf("%s merchant %s: status %d", s.url(), merchantID(m), resp.StatusCode)
		}
		return time.Since(t0), nil
	}

	// Steady traffic: every node calls every key, o.fleetLifetimes lifetimes.
	before, err := e.tokenCount()
	if err != nil {
		return err
	}
	traffic := time.Duration(o.fleetLifetimes) * o.fleetLifetime
	progress("steady traffic on %d keys over %d sidecars for %s", fleetKeys, o.fleet, traffic)
	var failed atomic.Int64
	var first atomic.Value
	var wg sync.WaitGroup
	t0 := time.Now()
	for _, s := range nodes {
		wg.Go(func() {
			for i := 0; time.Since(t0) < traffic; i++ {
				if _, err := call(s, i%fleetKeys); err != nil {
					failed.Add(1)
					first.CompareAndSwap(nil, err.Error())
				}
				time.Sleep(10 * time.Millisecond)
			}
		})
	}
	wg.Wait()
	after, err := e.tokenCount()
	if err != nil {
		return err
	}
	mints := after - before
	perKeyLifetime := float64(mints) / float64(fleetKeys) / float64(o.fleetLifetimes)

	// L1 miss served from L2.
	progress("L2 latency probe: %d merchants", fleetProbes)
	var l2, l1 []time.Duration
	for m := fleetKeys; m < n; m++ {
		if _, err := call(nodes[0], m); err != nil {
			return err
		}
		d2, err := call(nodes[1%len(nodes)], m)
		if err != nil {
			return err
		}
		d1, err := call(nodes[1%len(nodes)], m)
		if err != nil {
			return err
		}
		l2, l1 = append(l2, d2), append(l1, d1)
	}
	slices.Sort(l2)
	slices.Sort(l1)
	pct := func(xs []time.Duration, p float64) time.Duration { return xs[int(p*float64(len(xs)-1))] }
	fmt.Printf("## Fleet: %d sidecars, one redis-server\n\n", o.fleet)
	fmt.Printf("%s\n\n", machine())
	fmt.Printf("| measure | value |\n| --- | --- |\n")
	fmt.Printf("| token requests, %d keys, %s tokens, %s of traffic | %d |\n", fleetKeys, o.fleetLifetime, traffic, mints)
	fmt.Printf("| mints per key per lifetime, the first mint included (target 1; refreshes planned late in the window cost life / (life - max(life/40, leeway+1s)): 1.25 with 10 s tokens, 1.03 with 60 s; at most 1.33 with refresh-ahead at the window's start) | %.2f |\n", perKeyLifetime)
	firstErr := ""
	if v, ok := first.Load().(string); ok {
		firstErr = "(first: " + v + ")"
	}
	fmt.Printf("| failed requests | %d %s |\n", failed.Load(), firstErr)
	fmt.Printf("| L1 miss from L2: p50 / p99 | %s / %s |\n", pct(l2, .5), pct(l2, .99))
	fmt.Printf("| L1 hit: p50 / p99 | %s / %s |\n", pct(l1, .5), pct(l1, .99))
	fmt.Printf("| added by L2: p50 / p99 | %s / %s |\n", pct(l2, .5)-pct(l1, .5), pct(l2, .99)-pct(l1, .99))
	if burst != nil {
		burst.print(o.fleet)
	}
	return nil
}
