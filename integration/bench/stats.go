package main

import (
	"errors"
	"fmt"
	"math"
	"slices"
	"strconv"
	"strings"
	"time"
)

// round is what one wrk run against one server measured.
type round struct {
	Requests  int64         // completed requests
	Duration  time.Duration // wrk's measured duration
	P99       time.Duration // 99th percentile latency
	Errors    int64         // socket errors, timeouts and non-2xx/3xx responses
	CPUTicks  int64         // utime+stime of the server process during the run, in clock ticks
	ClockTick time.Duration // length of one clock tick (1/CLK_TCK)
	// Alloc and GCs are the bytes the server's Go runtime allocated and
	// the GC cycles it completed from just before the run to just after
	// it (memstats TotalAlloc and NumGC deltas).
	Alloc uint64
	GCs   uint32
}

// RPS is requests per second.
func (r round) RPS() float64 {
	if r.Duration <= 0 {
		return 0
	}
	return float64(r.Requests) / r.Duration.Seconds()
}

// CPUPerRequest is the server's CPU time per request; 0 without requests.
func (r round) CPUPerRequest() time.Duration {
	if r.Requests <= 0 {
		return 0
	}
	return time.Duration(float64(r.CPUTicks) * float64(r.ClockTick) / float64(r.Requests))
}

// AllocPerRequest is the bytes allocated per request; 0 without requests.
func (r round) AllocPerRequest() float64 {
	if r.Requests <= 0 {
		return 0
	}
	return float64(r.Alloc) / float64(r.Requests)
}

// GCsPerSecond is the GC cycles completed per second of the run.
func (r round) GCsPerSecond() float64 {
	if r.Duration <= 0 {
		return 0
	}
	return float64(r.GCs) / r.Duration.Seconds()
}

// summary is the median of each metric over rounds of one configuration.
type summary struct {
	Rounds int
	RPS    float64
	P99    time.Duration
	CPU    time.Duration // CPU per request
	Errors int64         // sum over the rounds
	Alloc  float64       // bytes allocated per request
	GCs    float64       // GC cycles per second
}

func summarize(rs []round) summary {
	s := summary{Rounds: len(rs)}
	rps := make([]float64, len(rs))
	p99 := make([]float64, len(rs))
	cpu := make([]float64, len(rs))
	alloc := make([]float64, len(rs))
	gcs := make([]float64, len(rs))
	for i, r := range rs {
		rps[i], p99[i], cpu[i] = r.RPS(), float64(r.P99), float64(r.CPUPerRequest())
		alloc[i], gcs[i] = r.AllocPerRequest(), r.GCsPerSecond()
		s.Errors += r.Errors
	}
	s.RPS = median(rps)
	s.P99 = time.Duration(median(p99))
	s.CPU = time.Duration(median(cpu))
	s.Alloc = median(alloc)
	s.GCs = median(gcs)
	return s
}

// median of xs (the mean of the two middle values for an even count); NaN
// for none. xs is not modified.
func median(xs []float64) float64 {
	if len(xs) == 0 {
		return math.NaN()
	}
	s := slices.Clone(xs)
	slices.Sort(s)
	n := len(s)
	if n%2 == 1 {
		return s[n/2]
	}
	return (s[n/2-1] + s[n/2]) / 2
}

// ratio is a/b, NaN when b is 0 or either is NaN.
func ratio(a, b float64) float64 {
	if b == 0 || math.IsNaN(a) || math.IsNaN(b) {
		return math.NaN()
	}
	return a / b
}

// wrkResultPrefix starts the line the Lua script's done() prints.
const wrkResultPrefix = "wrk-result"

// wrkDone is the done() of every wrk script: one wrkResultPrefix line
// with the run's figures, which parseWrk reads.
const wrkDone = `function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format("` + wrkResultPrefix + ` requests=%d duration_us=%d p99_us=%d connect=%d read=%d write=%d status=%d timeout=%d\n",
    summary.requests, summary.duration, latency:percentile(99), e.connect, e.read, e.write, e.status, e.timeout))
end
`

// parseWrk reads the wrk-result line of wrk's output (see wrkScript):
//
//	wrk-result requests=N duration_us=N p99_us=N connect=N read=N write=N status=N timeout=N
func parseWrk(out string) (round, error) {
	for line := range strings.SplitSeq(out, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 || f[0] != wrkResultPrefix {
			continue
		}
		vals := map[string]int64{}
		for _, kv := range f[1:] {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return round{}, fmt.Errorf("wrk output: %q is not key=value in %q", kv, line)
			}
			n, err := strconv.ParseInt(v, 10, 64)
			if err != nil {
				return round{}, fmt.Errorf("wrk output: %s=%q is not an integer in %q", k, v, line)
			}
			vals[k] = n
		}
		for _, k := range []string{"requests", "duration_us", "p99_us"} {
			if _, ok := vals[k]; !ok {
				return round{}, fmt.Errorf("wrk output: %s missing in %q", k, line)
			}
		}
		return round{
			Requests: vals["requests"],
			Duration: time.Duration(vals["duration_us"]) * time.Microsecond,
			P99:      time.Duration(vals["p99_us"]) * time.Microsecond,
			Errors:   vals["connect"] + vals["read"] + vals["write"] + vals["status"] + vals["timeout"],
		}, nil
	}
	return round{}, errors.New("wrk output: no wrk-result line (did the Lua script's done() run?)")
}

// parseStatCPU returns utime+stime (fields 14 and 15, clock ticks) of a
// /proc/PID/stat line. The command name (field 2) is in parentheses and may
// hold spaces and parentheses, so fields are counted after the last ')'.
func parseStatCPU(stat string) (int64, error) {
	i := strings.LastIndexByte(stat, ')')
	if i < 0 {
		return 0, fmt.Errorf("/proc stat %q: no ')' after the command name", truncate(stat))
	}
	f := strings.Fields(stat[i+1:])
	// f[0] is field 3 (state): utime is field 14 = f[11], stime f[12].
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc stat %q: %d fields after the command name, want at least 13", truncate(stat), len(f))
	}
	var sum int64
	for _, s := range f[11:13] {
		n, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc stat: utime/stime %q is not an integer", s)
		}
		sum += n
	}
	return sum, nil
}

// parseVmRSS returns VmRSS of a /proc/PID/status text, in bytes.
func parseVmRSS(status string) (int64, error) {
	for line := range strings.SplitSeq(status, "\n") {
		v, ok := strings.CutPrefix(line, "VmRSS:")
		if !ok {
			continue
		}
		f := strings.Fields(v)
		if len(f) != 2 || f[1] != "kB" {
			return 0, fmt.Errorf("/proc status: VmRSS line %q: want \"VmRSS: N kB\"", line)
		}
		n, err := strconv.ParseInt(f[0], 10, 64)
		if err != nil {
			return 0, fmt.Errorf("/proc status: VmRSS %q is not an integer", f[0])
		}
		return n * 1024, nil
	}
	return 0, errors.New("/proc status: no VmRSS line (has the process exited?)")
}

func truncate(s string) string {
	if len(s) > 80 {
		return s[:80] + "…"
	}
	return s
}
