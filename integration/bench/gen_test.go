package main

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig"
	_ "github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	_ "github.com/caddyserver/caddy/v2/modules/standard"

	"github.com/tokenbroker/caddy-token-broker/config"
	_ "github.com/tokenbroker/caddy-token-broker/module"
)

// loadTOML writes data to a file named name in a fresh folder and loads
// it with config.LoadWith.
func loadTOML(t *testing.T, name, data string, env func(string) (string, bool)) (*config.Registry, error) {
	t.Helper()
	path := filepath.Join(t.TempDir(), name)
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
	return config.LoadWith(path, config.Options{LookupEnv: env})
}

// The generated registry is one the broker loads: n merchants, each with
// the organisation of the same index, the API key from the environment.
func TestRegistryTOML(t *testing.T) {
	env := func(k string) (string, bool) {
		if k == apiKeyEnv {
			return apiKey, true
		}
		return "", false
	}
	for _, n := range []int{1, 1000, 12345} {
		t.Run(fmt.Sprint(n), func(t *testing.T) {
			reg, err := loadTOML(t, "merchants.toml", registryTOML(n, "http://127.0.0.1:9"), env)
			if err != nil {
				t.Fatal(err)
			}
			if len(reg.Merchants) != n || len(reg.Providers) != 1 {
				t.Fatalf("%d merchants and %d providers, want %d and 1", len(reg.Merchants), len(reg.Providers), n)
			}
			for _, i := range []int{0, n / 2, n - 1} {
				m := reg.Merchants[merchantID(i)]
				if m == nil || m.Organisation != orgID(i) {
					t.Errorf("merchant %s: %+v, want organisation %s", merchantID(i), m, orgID(i))
				}
			}
		})
	}
	w, err := wildcardRegistryTOML(1_000_000, 50_000, "http://127.0.0.1:9")
	if err != nil {
		t.Fatal(err)
	}
	reg, err := loadTOML(t, "w.toml", w, func(string) (string, bool) { return apiKey, true })
	if err != nil || reg.Wildcard == nil || reg.Wildcard.MaxActive != 50_000 {
		t.Fatalf("wildcard registry: %v", err)
	}
	if b, err := reg.Binding(merchantID(42), nil); err != nil || b.Organisation != merchantID(42) {
		t.Fatalf("wildcard binding: %v %+v", err, b)
	}
}

// Both Caddyfiles adapt, with the same three routes; only the sidecar's
// have token_broker, only the plain one's a static Authorization header.
func TestCaddyfiles(t *testing.T) {
	for _, tc := range []struct {
		name, registry string
		want, not      []string
	}{
		{name: "sidecar", registry: "/tmp/merchants.toml",
			want: []string{`"handler":"token_broker"`, `"config":"/tmp/merchants.toml"`, `"listen":["127.0.0.1:4001"]`, `"admin":{"listen":"127.0.0.1:4002"`},
			not:  []string{"Bearer static"}},
		{name: "plain", want: []string{`"Authorization":["Bearer static"]`, `"listen":["127.0.0.1:4001"]`},
			not: []string{"token_broker"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			out, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(caddyfile(4001, 4002, "127.0.0.1:4003", tc.registry)), map[string]any{"filename": tc.name})
			if err != nil {
				t.Fatal(err)
			}
			js := string(out)
			for _, w := range tc.want {
				if !strings.Contains(js, w) {
					t.Errorf("adapted config lacks %s:\n%s", w, js)
				}
			}
			for _, w := range tc.not {
				if strings.Contains(js, w) {
					t.Errorf("adapted config has %s:\n%s", w, js)
				}
			}
			if got := strings.Count(js, `"upstreams":[{"dial":"127.0.0.1:4003"}]`); got != len(routes) {
				t.Errorf("%d reverse_proxy handlers, want %d", got, len(routes))
			}
			var v any
			if err := json.Unmarshal(out, &v); err != nil {
				t.Fatal(err)
			}
		})
	}
}

// wrk runs the generated script: each request carries a merchant of the
// registry, the picks spread over them, and done() prints a line parseWrk
// reads. Skipped where wrk is not installed (`make bench` installs it).
func TestWrkScript(t *testing.T) {
	wrk := requireWrk(t)
	const n = 50
	var mu sync.Mutex
	seen := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.URL.Path+" "+r.Header.Get("X-Merchant-Id")]++
		mu.Unlock()
	}))
	defer srv.Close()
	script := filepath.Join(t.TempDir(), "random.lua")
	if err := os.WriteFile(script, []byte(wrkScript(n)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _, err := run(time.Minute, wrk, "-t", "2", "-c", "4", "-d", "2s", "-s", script, srv.URL)
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	rd, err := parseWrk(out)
	if err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	valid := map[string]bool{}
	for i := range n {
		valid[benchPath+" "+merchantID(i)] = true
	}
	var total int64
	for k, c := range seen {
		if !valid[k] {
			t.Errorf("request %q (%d times): not a registry merchant on %s", k, c, benchPath)
		}
		total += int64(c)
	}
	// wrk counts the requests completed within its duration; the server
	// may see a few more.
	if rd.Requests == 0 || rd.Requests > total || rd.Errors != 0 || rd.P99 <= 0 {
		t.Errorf("wrk result %+v; the server saw %d requests", rd, total)
	}
	if total >= 10*n && len(seen) < n/2 {
		t.Errorf("%d requests hit only %d of %d merchants: not random", total, len(seen), n)
	}
}

func TestReport(t *testing.T) {
	tick := 10 * time.Millisecond
	r := countResult{Merchants: 100000, Start: 4800 * time.Millisecond, Reload: 3200 * time.Millisecond,
		RSSIdle: 512 << 20, RSSAfterReload: 704 << 20, RSSWarm: 600 << 20, WarmTokens: 100000, WarmTime: 40 * time.Second,
		Sidecar: []round{{Requests: 9300, Duration: time.Second, P99: 21 * time.Millisecond, CPUTicks: 119, ClockTick: tick, Alloc: 9300 * 17_200, GCs: 2}},
		Plain:   []round{{Requests: 10000, Duration: time.Second, P99: 20 * time.Millisecond, CPUTicks: 100, ClockTick: tick, Alloc: 10000 * 17_100, GCs: 31}},
	}
	r.MemIdle = memStats{HeapInuse: 400 << 20, HeapAlloc: 380 << 20, HeapIdle: 50 << 20, HeapReleased: 10 << 20, NextGC: 760 << 20,
		HeapObjects: 2_000_000, NumGC: 12, GCCPUFraction: 0.0123, Sys: 500 << 20}
	r.MemWarm = memStats{HeapInuse: 480 << 20, HeapAlloc: 470 << 20, HeapObjects: 2_500_000, NumGC: 30, Sys: 580 << 20}
	r.Profiles = []string{"/p/sidecar-100000-cpu.pprof", "/p/sidecar-100000-heap.pprof"}
	r.ReloadWarm, r.ReloadWarmChecked = 400*time.Millisecond, 145
	small := countResult{Merchants: 1, Reload: 100 * time.Millisecond, ReloadWarmTokens: 3, ReloadWarmChecked: 1}
	split := &splitResult{Files: 10, PerFile: 10000, Start: 2 * time.Second, RSSIdle: 100 << 20, Reload: 300 * time.Millisecond,
		RSSAfterReload: 120 << 20, Warmed: 145, ReloadTokens: 0, EditTokens: 2,
		EditedID: merchantID(90000), AddedID: merchantID(100000), EditedOrg: orgID(100000), AddedOrg: orgID(100001),
		MemIdle: memStats{HeapInuse: 50 << 20}, MemAfterReload: memStats{HeapInuse: 60 << 20}}
	out := report("2 CPUs", "wrk", "plain", []countResult{small, r}, split, "wildcard: not measured in this test")
	for _, want := range []string{
		"| 100 000 | 4.80 s | 3.20 s (RSS 704 MiB after) | 512 MiB | 600 MiB | 1.28 | 0.93 | 1.05 |",
		"| 100 000 in 10 files × 10 000, one edited | 2.00 s | 0.30 s (RSS 120 MiB after) | 100 MiB | – | – | – | – |",
		"| one file | 100 000 | none | 3.20 s before the token warm-up; 0.40 s with every token cached | 704 MiB | 0 (second reload + one request to each of 145 warm merchants) | – |",
		"| one file | 1 | none | 0.10 s before the token warm-up; 0.00 s with every token cached | 0 MiB | 3 (second reload + one request to each of 1 warm merchants) | – |",
		"| 100 000 in 10 files | idle | 100 MiB | 50 MiB |",
		"| 100 001 in 10 files | after the edit's reload | 120 MiB | 60 MiB |",
		"| 10 files × 10 000 | 100 000 → 100 001 | one file: m0090000 moved to org-0100000, m0100000 added | 0.30 s | 120 MiB | 0 (reload + one request to each of 145 warm merchants of unchanged entries) | yes (edited and added merchant: 2 token requests, want 2) |",
		"| 100 000 | idle | 512 MiB | 400 MiB | 380 MiB | 440 MiB | 760 MiB | 2000000 | 4194 B | 20.0 | 12 | 0.012 | 500 MiB |",
		"| 100 000 | with tokens | 600 MiB | 480 MiB | 470 MiB | 480 MiB | 0 MiB | 2500000 | 5033 B | 25.0 | 30 | 0.000 | 580 MiB |",
		"/p/sidecar-100000-cpu.pprof, /p/sidecar-100000-heap.pprof",
		"| 100 000 | sidecar | 1 | 9300 | 21.00 ms | 128.0 µs | 17200 B | 2.0 | 0 | warm-up 100000 in 40.00 s (2500/s); rounds 0 |",
		"| 100 000 | plain | 1 | 10000 | 20.00 ms | 100.0 µs | 17100 B | 31.0 | 0 | |",
		"wildcard: not measured in this test",
	} {
		if !strings.Contains(out, want) {
			t.Errorf("report lacks %q:\n%s", want, out)
		}
	}
	for n, want := range map[int]string{1: "1", 999: "999", 1000: "1 000", 100000: "100 000", 1000000: "1 000 000"} {
		if got := thousands(n); got != want {
			t.Errorf("thousands(%d) = %q, want %q", n, got, want)
		}
	}
}

// wrk runs the wildcard script: every id is a merchant id of the range,
// the window slides (ids beyond the first window are reached), and ids
// wrap around the range. Skipped where wrk is not installed.
func TestWildcardScript(t *testing.T) {
	wrk := requireWrk(t)
	const distinct, window = 200, 10
	var mu sync.Mutex
	seen := map[string]int{}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		mu.Lock()
		seen[r.Header.Get("X-Merchant-Id")]++
		mu.Unlock()
	}))
	defer srv.Close()
	script := filepath.Join(t.TempDir(), "wildcard.lua")
	if err := os.WriteFile(script, []byte(wildcardScript(distinct, window, 2)), 0o644); err != nil {
		t.Fatal(err)
	}
	out, _, err := run(time.Minute, wrk, "-t", "2", "-c", "4", "-d", "2s", "-s", script, srv.URL)
	if err != nil {
		t.Fatalf("wrk: %v\n%s", err, out)
	}
	if _, err := parseWrk(out); err != nil {
		t.Fatal(err)
	}
	mu.Lock()
	defer mu.Unlock()
	valid := map[string]bool{}
	for i := range distinct {
		valid[merchantID(i)] = true
	}
	var total int
	for id, c := range seen {
		if !valid[id] {
			t.Errorf("merchant id %q (%d times) is not in the range of %d", id, c, distinct)
		}
		total += c
	}
	// The window moves by one id every wildcardStride requests: after
	// wildcardStride*distinct requests it went round the whole range.
	if total >= 2*wildcardStride*distinct && len(seen) < distinct*9/10 {
		t.Errorf("%d requests reached %d of %d ids: the window does not slide", total, len(seen), distinct)
	}
	if total < 2*wildcardStride*distinct {
		t.Logf("only %d requests (a busy machine): window not checked", total)
	}
}

// requireWrk returns wrk's path. Without wrk the test is skipped, except
// under CI (env CI set), where it fails: `make test` installs it.
func requireWrk(t *testing.T) string {
	t.Helper()
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		if os.Getenv("CI") != "" {
			t.Fatal("wrk is not installed: make test installs it (make tools)")
		}
		t.Skip("wrk not installed (make tools installs it)")
	}
	return wrk
}

// TestWildcardText: the wildcard row and its RSS readings during the run
// are in the report.
func TestWildcardText(t *testing.T) {
	for _, tt := range []struct {
		name    string
		samples []wildcardSample
		want    []string
	}{
		{"no readings", nil, []string{"| 1 000 000 in 120.00 s | 10 000 |"}},
		{"readings", []wildcardSample{{At: 20 * time.Second, RSS: 90 << 20, Tokens: 25_000}, {At: 40 * time.Second, RSS: 91 << 20, Tokens: 50_000}},
			[]string{"20.00 s: 25 000 token requests, 90 MiB; 40.00 s: 50 000 token requests, 91 MiB."}},
	} {
		r := wildcardResult{Distinct: 1_000_000, Active: 10_000, Duration: 120 * time.Second, Samples: tt.samples}
		out := r.text()
		for _, w := range tt.want {
			if !strings.Contains(out, w) {
				t.Errorf("%s: report lacks %q:\n%s", tt.name, w, out)
			}
		}
		if got := strings.Contains(out, "RSS of the sidecar during its run"); got != (len(tt.samples) > 0) {
			t.Errorf("%s: readings line present %t, want %t", tt.name, got, len(tt.samples) > 0)
		}
	}
}
