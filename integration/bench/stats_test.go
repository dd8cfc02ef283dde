package main

import (
	"math"
	"slices"
	"strings"
	"testing"
	"time"
)

func TestParseWrk(t *testing.T) {
	for _, tc := range []struct {
		name string
		out  string
		want round
		err  string
	}{
		{
			name: "wrk output with the result line",
			out: "Running 5s test @ http://127.0.0.1:4000\n  2 threads and 32 connections\n" +
				"  Thread Stats   Avg      Stdev     Max   +/- Stdev\n    Latency     3.01ms    1.2ms  40.00ms   90.00%\n" +
				"  50000 requests in 5.00s, 6.00MB read\nRequests/sec:  10000.00\nTransfer/sec:      1.20MB\n" +
				"wrk-result requests=50000 duration_us=5000123 p99_us=24420 connect=0 read=1 write=0 status=2 timeout=3\n",
			want: round{Requests: 50000, Duration: 5000123 * time.Microsecond, P99: 24420 * time.Microsecond, Errors: 6},
		},
		{
			name: "error fields absent count as 0",
			out:  "wrk-result requests=7 duration_us=1000000 p99_us=5\n",
			want: round{Requests: 7, Duration: time.Second, P99: 5 * time.Microsecond},
		},
		{name: "no result line", out: "Running 5s test\nRequests/sec: 1.0\n", err: "no wrk-result line"},
		{name: "not an integer", out: "wrk-result requests=1e3 duration_us=1 p99_us=1\n", err: `requests="1e3" is not an integer`},
		{name: "missing p99", out: "wrk-result requests=1 duration_us=1\n", err: "p99_us missing"},
		{name: "not key=value", out: "wrk-result requests\n", err: "is not key=value"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseWrk(tc.out)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if got != tc.want {
				t.Errorf("got %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestParseStatCPU(t *testing.T) {
	// Fields 14 and 15 (utime, stime) are 1234 and 567 in each line.
	rest := " S 1 2 3 4 5 6 7 8 9 10 1234 567 0 0 20 0 12 0 100 200 300"
	for _, tc := range []struct {
		name, stat string
		want       int64
		err        string
	}{
		{name: "plain name", stat: "4242 (caddy)" + rest + "\n", want: 1801},
		{name: "name with spaces and parentheses", stat: "4242 (we(ird) na) me)" + rest, want: 1801},
		{name: "no parenthesis", stat: "4242 caddy S 1 2", err: "no ')'"},
		{name: "too short", stat: "4242 (caddy) S 1 2 3", err: "want at least 13"},
		{name: "not a number", stat: "4242 (caddy) S 1 2 3 4 5 6 7 8 9 10 x 567", err: `"x" is not an integer`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseStatCPU(tc.stat)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("got %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestParseVmRSS(t *testing.T) {
	for _, tc := range []struct {
		name, status string
		want         int64
		err          string
	}{
		{name: "status file", status: "Name:\tcaddy\nVmPeak:\t  900 kB\nVmRSS:\t   52344 kB\nRssAnon:\t 40000 kB\n", want: 52344 * 1024},
		{name: "no VmRSS (kernel thread or exited)", status: "Name:\tkthreadd\nState:\tS\n", err: "no VmRSS"},
		{name: "unit other than kB", status: "VmRSS:\t 5 MB\n", err: `want "VmRSS: N kB"`},
		{name: "not a number", status: "VmRSS:\t x kB\n", err: `"x" is not an integer`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := parseVmRSS(tc.status)
			if tc.err != "" {
				if err == nil || !strings.Contains(err.Error(), tc.err) {
					t.Fatalf("err = %v, want it to contain %q", err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("got %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestMedianAndRatio(t *testing.T) {
	for _, tc := range []struct {
		name string
		xs   []float64
		want float64
	}{
		{"one", []float64{3}, 3},
		{"odd, unsorted", []float64{9, 1, 5, 7, 3}, 5},
		{"even: mean of the middle two", []float64{4, 1, 3, 2}, 2.5},
		{"outlier does not move it", []float64{10, 11, 12, 10_000, 9, 10, 11}, 11},
	} {
		t.Run(tc.name, func(t *testing.T) {
			in := append([]float64(nil), tc.xs...)
			if got := median(tc.xs); got != tc.want {
				t.Errorf("median(%v) = %v, want %v", in, got, tc.want)
			}
			for i := range in {
				if in[i] != tc.xs[i] {
					t.Fatalf("median modified its input: %v", tc.xs)
				}
			}
		})
	}
	if !math.IsNaN(median(nil)) {
		t.Error("median(nil) is not NaN")
	}
	for _, tc := range []struct{ a, b, want float64 }{{6, 3, 2}, {1, 0, math.NaN()}, {math.NaN(), 1, math.NaN()}} {
		got := ratio(tc.a, tc.b)
		if got != tc.want && !(math.IsNaN(got) && math.IsNaN(tc.want)) {
			t.Errorf("ratio(%v, %v) = %v, want %v", tc.a, tc.b, got, tc.want)
		}
	}
}

func TestSummarize(t *testing.T) {
	tick := 10 * time.Millisecond
	// 3 rounds of the sidecar and of plain; medians: sidecar 1000 req/s,
	// p99 20 ms, 200 µs CPU per request, 16 000 B per request, 2 GC
	// cycles/s; plain 1100 req/s, 18 ms, 180 µs.
	side := []round{
		{Requests: 5000, Duration: 5 * time.Second, P99: 20 * time.Millisecond, CPUTicks: 100, ClockTick: tick, Alloc: 5000 * 16_000, GCs: 10},           // 1000/s, 200 µs
		{Requests: 4000, Duration: 5 * time.Second, P99: 40 * time.Millisecond, CPUTicks: 100, ClockTick: tick, Alloc: 4000 * 20_000, GCs: 15},           // 800/s, 250 µs
		{Requests: 6000, Duration: 5 * time.Second, P99: 10 * time.Millisecond, CPUTicks: 108, ClockTick: tick, Errors: 2, Alloc: 6000 * 12_000, GCs: 5}, // 1200/s, 180 µs
	}
	plain := []round{
		{Requests: 5500, Duration: 5 * time.Second, P99: 18 * time.Millisecond, CPUTicks: 99, ClockTick: tick},  // 1100/s, 180 µs
		{Requests: 5000, Duration: 5 * time.Second, P99: 30 * time.Millisecond, CPUTicks: 100, ClockTick: tick}, // 1000/s, 200 µs
		{Requests: 6000, Duration: 5 * time.Second, P99: 12 * time.Millisecond, CPUTicks: 90, ClockTick: tick},  // 1200/s, 150 µs
	}
	s, p := summarize(side), summarize(plain)
	want := summary{Rounds: 3, RPS: 1000, P99: 20 * time.Millisecond, CPU: 200 * time.Microsecond, Errors: 2, Alloc: 16_000, GCs: 2}
	if s != want {
		t.Errorf("sidecar summary %+v, want %+v", s, want)
	}
	if want := (summary{Rounds: 3, RPS: 1100, P99: 18 * time.Millisecond, CPU: 180 * time.Microsecond}); p != want {
		t.Errorf("plain summary %+v, want %+v", p, want)
	}
	for _, tc := range []struct {
		name      string
		got, want string
	}{
		{"CPU per request", ratioText(float64(s.CPU), float64(p.CPU)), "1.11"},
		{"throughput", ratioText(s.RPS, p.RPS), "0.91"},
		{"p99", ratioText(float64(s.P99), float64(p.P99)), "1.11"},
		{"undefined", ratioText(1, 0), "n/a"},
	} {
		if tc.got != tc.want {
			t.Errorf("%s ratio %s, want %s", tc.name, tc.got, tc.want)
		}
	}
	if got := (round{}).CPUPerRequest(); got != 0 {
		t.Errorf("CPU per request without requests = %s, want 0", got)
	}
	if got := (round{}).AllocPerRequest(); got != 0 {
		t.Errorf("allocated per request without requests = %v, want 0", got)
	}
	if got := (round{GCs: 3}).GCsPerSecond(); got != 0 {
		t.Errorf("GC cycles per second without a duration = %v, want 0", got)
	}
}

func TestParseCounts(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want []int
		err  bool
	}{
		{in: "1,1000,100000", want: []int{1, 1000, 100000}},
		{in: " 1 , 100_000", want: []int{1, 100000}},
		{in: "0", err: true},
		{in: "1,,2", err: true},
		{in: "10000000", err: true},
		{in: "many", err: true},
	} {
		got, err := parseCounts(tc.in)
		if (err != nil) != tc.err || (!tc.err && !slices.Equal(got, tc.want)) {
			t.Errorf("parseCounts(%q) = %v, %v; want %v (error %v)", tc.in, got, err, tc.want, tc.err)
		}
	}
}

func TestQuickDefaults(t *testing.T) {
	for _, tc := range []struct {
		name  string
		args  []string
		quick bool
		want  options
	}{
		{name: "defaults", want: options{rounds: 7, round: 5 * time.Second, warmup: 3 * time.Second, settle: 5 * time.Second}},
		{name: "BENCH_QUICK=1", quick: true, want: options{rounds: 1, round: 2 * time.Second, warmup: time.Second, settle: time.Second}},
		{name: "a flag wins over quick", quick: true, args: []string{"-rounds", "3"},
			want: options{rounds: 3, round: 2 * time.Second, warmup: time.Second, settle: time.Second}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o, timeout, err := parseFlags(tc.args, tc.quick)
			if err != nil {
				t.Fatal(err)
			}
			if o.rounds != tc.want.rounds || o.round != tc.want.round || o.warmup != tc.want.warmup || o.settle != tc.want.settle {
				t.Errorf("got rounds %d round %s warmup %s settle %s, want %+v", o.rounds, o.round, o.warmup, o.settle, tc.want)
			}
			if !slices.Equal(o.merchants, []int{1, 1000, 100000}) || timeout <= 0 {
				t.Errorf("merchants %v, timeout %s", o.merchants, timeout)
			}
		})
	}
	if _, _, err := parseFlags([]string{"-round", "100ms"}, false); err == nil {
		t.Error("a round under 1s was accepted")
	}
}
