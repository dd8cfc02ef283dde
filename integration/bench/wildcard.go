package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// wildcardResult is what the wildcard case measured.
type wildcardResult struct {
	Distinct, Active int // ids driven, max_active
	Start            time.Duration
	RSSIdle, RSSEnd  int64
	Sidecar, Plain   round
	Tokens           int64         // token requests of the sidecar's run
	TokenAPICPU      time.Duration // CPU of the token API helper during it
	Duration         time.Duration
	// Samples are the sidecar's RSS and the token requests so far, taken
	// during its run: flat RSS while the ids reached grow is the bound.
	Samples []wildcardSample
}

// wildcardSample is one reading during the wildcard run.
type wildcardSample struct {
	At     time.Duration // since the run started
	RSS    int64
	Tokens int64 // token requests since the run started: ids reached
}

// wildcardSamples is how many readings are taken during the run.
const wildcardSamples = 6

// wildcardIdle is the idle_timeout of the wildcard case: ids in the
// window (active/4 ids) are requested about every active/4 requests, well
// within it at the rates of this machine; ids the window left go idle.
const wildcardIdle = 2 * time.Second

// Lua's request numbers advance the window by one id every
// wildcardStride requests, so that about 1 request in wildcardStride
// names an id not seen before (a token request).
const wildcardStride = 4

// measureWildcard runs the wildcard case: a fresh sidecar with the
// wildcard registry (max_active = active), wrk with ids from a window of
// active/4 ids sliding over [0, distinct) for d, then the plain Caddy with
// the same script for d/4 (its CPU per request is steady). Every id the
// window reaches costs one token request: the run reaches distinct ids
// only when the token API and the sidecar mint distinct/d tokens per
// second; the report says how far it got.
func (e *env) measureWildcard(wrk string, distinct, active int, d time.Duration) (wildcardResult, error) {
	r := wildcardResult{Distinct: distinct, Active: active, Duration: d}
	toml, err := wildcardRegistryTOML(distinct, active, e.tokenAPI)
	if err != nil {
		return r, err
	}
	registry := filepath.Join(e.dir, "merchants-wildcard.toml")
	if err := os.WriteFile(registry, []byte(toml), 0o644); err != nil {
		return r, err
	}
	script := filepath.Join(e.dir, "wildcard.lua")
	if err := os.WriteFile(script, []byte(wildcardScript(distinct, max(1, active/4), e.o.threads)), 0o644); err != nil {
		return r, err
	}
	progress("wildcard: start (max_active %d)", active)
	t0 := time.Now()
	side, err := e.startCaddy("sidecar-wildcard", registry)
	if err != nil {
		return r, err
	}
	defer side.p.stop()
	if r.Start, err = waitHTTP(side.p, side.url(), nil, t0, 5*time.Minute); err != nil {
		return r, err
	}
	time.Sleep(e.o.settle)
	if r.RSSIdle, err = rss(side.p.pid()); err != nil {
		return r, err
	}
	progress("wildcard: wrk %s over %d ids, then plain %s", d, distinct, d/4)
	before, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	c0, err := cpuTicks(e.tokenProc.pid())
	if err != nil {
		return r, err
	}
	done := make(chan struct{})
	sampled := make(chan []wildcardSample, 1)
	go func() { sampled <- e.sampleWildcard(side.p.pid(), before, d, done) }()
	r.Sidecar, err = e.wrk(wrk, script, side, d)
	close(done)
	r.Samples = <-sampled
	if err != nil {
		return r, err
	}
	c1, err := cpuTicks(e.tokenProc.pid())
	if err != nil {
		return r, err
	}
	r.TokenAPICPU = time.Duration(c1-c0) * e.tick
	after, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	r.Tokens = after - before
	if r.RSSEnd, err = rss(side.p.pid()); err != nil {
		return r, err
	}
	if r.Plain, err = e.wrk(wrk, script, e.plain, max(time.Second, d/4)); err != nil {
		return r, err
	}
	return r, nil
}

// sampleWildcard reads the sidecar's RSS and the token requests made
// since before, wildcardSamples times over d, until done.
func (e *env) sampleWildcard(pid int, before int64, d time.Duration, done <-chan struct{}) []wildcardSample {
	var out []wildcardSample
	t0 := time.Now()
	tick := time.NewTicker(d / wildcardSamples)
	defer tick.Stop()
	for {
		select {
		case <-done:
			return out
		case <-tick.C:
			r, err := rss(pid)
			if err != nil {
				continue
			}
			n, err := e.tokenCount()
			if err != nil {
				continue
			}
			out = append(out, wildcardSample{At: time.Since(t0), RSS: r, Tokens: n - before})
		}
	}
}

// text renders the wildcard case for the report.
func (r wildcardResult) text() string {
	var b strings.Builder
	b.WriteString("Wildcard entry (`[merchants.\"*\"]`, organisation = \"{merchant}\"):\n\n")
	b.WriteString("| distinct ids (target) | max_active | start | idle RSS | RSS at the end | req/s sidecar / plain | CPU per request vs plain | p99 sidecar / plain | token requests (mint rate) | token API CPU per mint | errors |\n")
	b.WriteString("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n")
	secsRun := r.Sidecar.Duration.Seconds()
	if secsRun <= 0 {
		secsRun = r.Duration.Seconds()
	}
	perMint := time.Duration(0)
	if r.Tokens > 0 {
		perMint = r.TokenAPICPU / time.Duration(r.Tokens)
	}
	fmt.Fprintf(&b, "| %s in %s | %s | %s | %s | %s | %.0f / %.0f | %s | %s / %s | %d (%.0f/s) | %s | %d |\n",
		thousands(r.Distinct), secs(r.Duration), thousands(r.Active), secs(r.Start), mib(r.RSSIdle), mib(r.RSSEnd),
		r.Sidecar.RPS(), r.Plain.RPS(), ratioText(float64(r.Sidecar.CPUPerRequest()), float64(r.Plain.CPUPerRequest())),
		ms(r.Sidecar.P99), ms(r.Plain.P99), r.Tokens, float64(r.Tokens)/secsRun, us(perMint), r.Sidecar.Errors)
	fmt.Fprintf(&b, "\nEach token request is a distinct id reached (ids slide by one every %d requests, a window of max_active/4); "+
		"idle_timeout %s; the run reaches the target only at a mint rate of %.0f/s.\n", wildcardStride, wildcardIdle, float64(r.Distinct)/r.Duration.Seconds())
	if len(r.Samples) > 0 {
		b.WriteString("\nRSS of the sidecar during its run (time: token requests so far, one per new id, RSS): ")
		for i, s := range r.Samples {
			if i > 0 {
				b.WriteString("; ")
			}
			fmt.Fprintf(&b, "%s: %s token requests, %s", secs(s.At), thousands(int(s.Tokens)), mib(s.RSS))
		}
		b.WriteString(".\n")
	}
	return b.String()
}

// wildcardScript is wrk's Lua script of the wildcard case: request c of
// thread t (of threads) names merchant (base + random(0, window-1)) mod
// distinct, base = (c*threads + t) / wildcardStride: a window of ids that
// slides over the whole range, no table of ids.
func wildcardScript(distinct, window, threads int) string {
	return fmt.Sprintf(`-- generated by integration/bench (wildcard case)
local distinct = %d
local window = %d
local threads = %d
local stride = %d
local path = %q
local started = 0

function setup(thread)
  thread:set("tid", started)
  started = started + 1
end

function init(args)
  t = tid or 0
  c = 0
  math.randomseed(os.time() * 1000 + t)
end

function request()
  c = c + 1
  local base = math.floor((c * threads + t) / stride)
  local id = (base + math.random(0, window - 1)) %% distinct
  return wrk.format("GET", path, { ["X-Merchant-Id"] = string.format(%q, id) })
end

`, distinct, window, threads, wildcardStride, benchPath, merchantFormat) + wrkDone
}
