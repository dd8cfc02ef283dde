// Command bench compares, as separate processes on 127.0.0.1, the token
// broker sidecar (bin/caddy with token_broker on three routes and a Nuapay
// registry of N explicit merchants) with a plain Caddy (the same binary and
// routes, reverse_proxy with a static `header_up Authorization`), both in
// front of one minimal upstream, the sidecar fetching tokens from the
// sandbox's Nuapay Gatekeeper. Load comes from wrk with a random merchant
// per request. For each merchant count it measures start, reload and RSS
// (idle, then with every merchant's token cached), then runs interleaved
// rounds (sidecar, plain, plain, sidecar, ...) after a warm-up and reports
// the medians of requests/s, p99 and the server's CPU per request (from
// /proc/PID/stat) and the ratios sidecar/plain, as a markdown table.
// With the sidecar's Go runtime figures (GET /debug/vars of Caddy's admin
// API) next to RSS. Then the split reload case (split.go): a registry
// folder of -split-files files of -split-merchants merchants, one file
// edited, `caddy reload` timed and the token requests it caused counted.
// -dpop runs the DPoP comparison instead (dpop.go): CPU per request of a
// route whose tokens are DPoP-bound, per algorithm, against a bearer route
// and the plain Caddy. -profile DIR saves a CPU and a heap profile of the sidecar at the
// largest merchant count. Then the wildcard case (wildcard.go): a sidecar with one
// [merchants."*"] entry and max_active, wrk with merchant ids from a
// window sliding over -wildcard distinct ids for -wildcard-time; it
// reports RSS against max_active and the mint rate the run reached.
// -budget runs the budget mode instead (budget.go): sidecars and Redis
// spending a provider's rate_limit against a rate-limited token API, with
// and without the budget.
//
//	make bench                 # installs wrk if missing, builds, runs the defaults
//	go run ./integration/bench [-merchants 1,1000,100000] [-rounds 7] [-round 5s] ...
//	BENCH_QUICK=1 make bench   # smoke test: 1 round of 2 s, 1 s warm-up and settle
//
// Every process it starts is stopped by its pid; the run ends by itself,
// and -timeout bounds it.
package main

import (
	"flag"
	"fmt"
	"log"
	"os"
	"os/signal"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// options of one run.
type options struct {
	bin         string
	build       bool
	merchants   []int
	rounds      int
	round       time.Duration
	warmup      time.Duration
	settle      time.Duration
	connections int
	threads     int
	wildcard    int
	// wildcardActive is max_active of the wildcard case; wildcardTime
	// its sidecar run (the plain Caddy runs a quarter of it).
	wildcardActive int
	wildcardTime   time.Duration
	keep           bool
	// split is the split registry of the reload case (split.go);
	// split.files == 0 skips it.
	split splitLayout
	// profile, when set, is the folder that receives a CPU and a heap
	// profile of the sidecar at the largest merchant count.
	profile string
	// sidecarEnv is environment (KEY=VALUE) added to the sidecar's
	// process only in the end-to-end mode, for experiments such as
	// GOGC=400; the report's method names it.
	sidecarEnv []string
	// budget is the budget mode (budget.go); budget.on runs it instead.
	budget budgetOptions
	// fleet > 0 runs the fleet mode instead (fleet.go).
	fleet          int
	fleetLifetime  time.Duration
	fleetLifetimes int
	// dpop runs the DPoP comparison instead (dpop.go).
	dpop bool
	// fleetBurst is the number of cold merchants of the fleet's burst
	// step (0 skips it), fleetBurners the CPU burners during it.
	fleetBurst   int
	fleetBurners int
}

func main() {
	log.SetFlags(0)
	if len(os.Args) > 1 && os.Args[1] == "burn" {
		burn()
	}
	if len(os.Args) > 1 && (os.Args[1] == "upstream" || os.Args[1] == "tokenapi") {
		if err := serveHelper(os.Args[1], os.Args[2:]); err != nil {
			log.Fatalf("bench %s: %v", os.Args[1], err)
		}
		return
	}
	o, timeout, err := parseFlags(os.Args[1:], os.Getenv("BENCH_QUICK") == "1")
	if err != nil {
		log.Fatal(err)
	}
	// Stop every process on interrupt or when the run exceeds -timeout.
	sig := make(chan os.Signal, 1)
	signal.Notify(sig, os.Interrupt, syscall.SIGTERM)
	go func() {
		select {
		case s := <-sig:
			log.Printf("bench: %s: stopping", s)
		case <-time.After(timeout):
			log.Printf("bench: the run exceeded -timeout %s: stopping", timeout)
		}
		stopAll()
		os.Exit(2)
	}()
	switch {
	case o.dpop:
		err = runDPoP(o)
	case o.budget.on:
		err = runBudget(o)
	case o.fleet > 0:
		err = runFleet(o)
	default:
		err = runBench(o)
	}
	stopAll()
	if err != nil {
		log.Fatal("bench: ", err)
	}
}

func parseFlags(args []string, quick bool) (options, time.Duration, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	o := options{}
	rounds, round, warmup, settle, wildcardTime := 7, 5*time.Second, 3*time.Second, 5*time.Second, 2*time.Minute
	if quick {
		rounds, round, warmup, settle, wildcardTime = 1, 2*time.Second, time.Second, time.Second, 20*time.Second
	}
	fs.StringVar(&o.bin, "bin", "bin", "folder of bin/caddy")
	fs.BoolVar(&o.build, "build", true, "build bin/caddy (./cmd/caddy) first")
	counts := fs.String("merchants", "1,1000,100000", "comma-separated merchant counts of the registry")
	fs.IntVar(&o.rounds, "rounds", rounds, "measured rounds per server and merchant count (BENCH_QUICK=1: 1)")
	fs.DurationVar(&o.round, "round", round, "duration of one wrk round (BENCH_QUICK=1: 2s)")
	fs.DurationVar(&o.warmup, "warmup", warmup, "unmeasured wrk warm-up per server and merchant count (BENCH_QUICK=1: 1s)")
	fs.DurationVar(&o.settle, "settle", settle, "wait before reading RSS after start and after the token warm-up (BENCH_QUICK=1: 1s)")
	fs.IntVar(&o.connections, "connections", 32, "wrk connections")
	fs.IntVar(&o.threads, "threads", 2, "wrk threads")
	fs.IntVar(&o.wildcard, "wildcard", 1_000_000, "distinct merchant ids of the wildcard case (0 skips it)")
	fs.IntVar(&o.wildcardActive, "wildcard-active", 10_000, "max_active of the wildcard case")
	fs.DurationVar(&o.wildcardTime, "wildcard-time", wildcardTime, "wrk run of the sidecar in the wildcard case (the plain Caddy: a quarter of it; BENCH_QUICK=1: 20s); about 14m reaches all of -wildcard ids at this machine's mint rate")
	fs.IntVar(&o.split.files, "split-files", 10, "split reload case: merchant files of the registry folder (0 skips the case)")
	fs.IntVar(&o.split.perFile, "split-merchants", 10_000, "split reload case: merchants per file")
	budgetFlags(fs, &o.budget)
	fs.StringVar(&o.profile, "profile", "", "save a 10 s CPU profile (under an extra wrk run) and a heap profile of the sidecar at the largest merchant count into this folder (off when empty)")
	sidecarEnv := fs.String("sidecar-env", "", "comma-separated KEY=VALUE added to the sidecar's environment only (end-to-end mode), for experiments such as GOGC=400; figures of record use none")
	fs.BoolVar(&o.keep, "keep", false, "keep the temporary folder (registries, Caddyfiles, process logs)")
	fs.IntVar(&o.fleet, "fleet", 0, "fleet mode: N sidecars sharing one redis-server; mints per key per lifetime and L2 latency (0: off)")
	fs.BoolVar(&o.dpop, "dpop", false, "DPoP mode: CPU per request of a DPoP route per algorithm (ES256, PS256, EdDSA) vs a bearer route vs Caddy with a static header")
	fs.DurationVar(&o.fleetLifetime, "fleet-lifetime", 10*time.Second, "fleet mode: the tokens' lifetime (token_lifetime; 10s is the token API's minimum)")
	fs.IntVar(&o.fleetLifetimes, "fleet-lifetimes", 3, "fleet mode: token lifetimes (-fleet-lifetime each) of steady traffic")
	fs.IntVar(&o.fleetBurst, "fleet-burst", 600, "fleet mode: cold merchants requested at once on every sidecar under CPU starvation, before the steady traffic (0 skips the step)")
	fs.IntVar(&o.fleetBurners, "fleet-burners", 2*runtime.NumCPU(), "fleet mode: CPU burner processes during the cold burst")
	timeout := fs.Duration("timeout", 45*time.Minute, "stop everything and fail after this long")
	if err := fs.Parse(args); err != nil {
		return o, 0, err
	}
	var err error
	if o.merchants, err = parseCounts(*counts); err != nil {
		return o, 0, err
	}
	if o.sidecarEnv, err = parseEnv(*sidecarEnv); err != nil {
		return o, 0, err
	}
	if o.fleet < 0 || o.fleetLifetime < 10*time.Second || o.fleetLifetimes < 1 || o.fleetBurst < 0 || o.fleetBurners < 0 {
		return o, 0, fmt.Errorf("flags: want -fleet >= 0, -fleet-lifetime >= 10s, -fleet-lifetimes >= 1, -fleet-burst >= 0 and -fleet-burners >= 0")
	}
	if o.wildcard > 0 && (o.wildcardActive < 1 || o.wildcardTime < 4*time.Second) {
		return o, 0, fmt.Errorf("flags: want -wildcard-active >= 1 and -wildcard-time >= 4s")
	}
	if err := o.budget.validate(); err != nil {
		return o, 0, err
	}
	if o.split.files != 0 {
		if err := o.split.validate(); err != nil {
			return o, 0, err
		}
	}
	if o.rounds < 1 || o.round < time.Second || o.connections < 1 || o.threads < 1 || o.connections < o.threads {
		return o, 0, fmt.Errorf("flags: want -rounds >= 1, -round >= 1s, -threads >= 1 and -connections >= -threads")
	}
	return o, *timeout, nil
}

// parseEnv reads "KEY=VALUE,KEY=VALUE" (empty: none).
func parseEnv(s string) ([]string, error) {
	if strings.TrimSpace(s) == "" {
		return nil, nil
	}
	var out []string
	for kv := range strings.SplitSeq(s, ",") {
		kv = strings.TrimSpace(kv)
		if k, _, ok := strings.Cut(kv, "="); !ok || k == "" {
			return nil, fmt.Errorf("-sidecar-env %q: %q is not KEY=VALUE", s, kv)
		}
		out = append(out, kv)
	}
	return out, nil
}

// parseCounts reads "1,1000,100000" (underscores allowed: 100_000).
func parseCounts(s string) ([]int, error) {
	var out []int
	for f := range strings.SplitSeq(s, ",") {
		f = strings.ReplaceAll(strings.TrimSpace(f), "_", "")
		n, err := strconv.Atoi(f)
		if err != nil || n < 1 || n > 9_999_999 {
			return nil, fmt.Errorf("-merchants %q: %q is not a count from 1 to 9999999", s, f)
		}
		out = append(out, n)
	}
	return out, nil
}
