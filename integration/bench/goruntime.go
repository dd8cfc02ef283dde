package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"time"
)

// memStats are the figures of the sidecar's runtime.MemStats the report
// shows next to RSS, read from Caddy's admin API (GET /debug/vars, the
// expvar "memstats" variable: runtime.ReadMemStats, which stops the world
// briefly but does not run a GC).
type memStats struct {
	HeapAlloc     uint64  // bytes of live and not yet swept heap objects
	HeapInuse     uint64  // bytes in in-use heap spans
	HeapIdle      uint64  // bytes in idle heap spans
	HeapReleased  uint64  // bytes of idle spans returned to the OS
	HeapObjects   uint64  // allocated heap objects
	NextGC        uint64  // heap size goal of the next GC cycle
	Sys           uint64  // bytes obtained from the OS by the runtime
	StackInuse    uint64  // bytes of goroutine stacks
	NumGC         uint32  // completed GC cycles since start
	TotalAlloc    uint64  // bytes allocated since start (never decreases)
	GCCPUFraction float64 // share of the CPU the GC used since start
}

// retained is the heap memory the runtime holds (in use or idle, not
// returned to the OS): HeapInuse + HeapIdle - HeapReleased.
func (m memStats) retained() uint64 { return m.HeapInuse + m.HeapIdle - m.HeapReleased }

// parseMemStats reads the "memstats" variable of an expvar answer
// (GET /debug/vars).
func parseMemStats(body []byte) (memStats, error) {
	var v struct {
		MemStats *memStats `json:"memstats"`
	}
	if err := json.Unmarshal(body, &v); err != nil {
		return memStats{}, fmt.Errorf("admin /debug/vars: not JSON: %v", err)
	}
	if v.MemStats == nil {
		return memStats{}, errors.New("admin /debug/vars: no \"memstats\" variable (is this Caddy's admin API?)")
	}
	if v.MemStats.HeapInuse == 0 || v.MemStats.Sys == 0 {
		return memStats{}, errors.New("admin /debug/vars: memstats without HeapInuse or Sys")
	}
	return *v.MemStats, nil
}

// adminGet GETs path of s's admin API within timeout and returns the body;
// any status but 200 is an error.
func (s *server) adminGet(path string, timeout time.Duration) ([]byte, error) {
	client := &http.Client{Timeout: timeout}
	resp, err := client.Get(fmt.Sprintf("http://127.0.0.1:%d%s", s.admin, path))
	if err != nil {
		return nil, fmt.Errorf("%s admin API: %w", s.p.name, err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, fmt.Errorf("%s admin API %s: %w", s.p.name, path, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("%s admin API %s: status %d: %s", s.p.name, path, resp.StatusCode, truncate(string(b)))
	}
	return b, nil
}

// memStats reads the server's runtime figures from its admin API.
func (s *server) memStats() (memStats, error) {
	b, err := s.adminGet("/debug/vars", time.Minute)
	if err != nil {
		return memStats{}, err
	}
	return parseMemStats(b)
}

// profileSeconds is the length of the CPU profile of -profile.
const profileSeconds = 10

// profile saves a CPU profile of the sidecar under wrk load and then a
// heap profile into e.o.profile: one extra, unmeasured wrk run of
// profileSeconds (the profiler's sampling costs CPU, so the measured
// rounds stay unprofiled) right after the measured rounds, with the same
// script. It returns the two files' paths.
func (e *env) profile(wrk, script string, side *server, n int) ([]string, error) {
	if err := os.MkdirAll(e.o.profile, 0o755); err != nil {
		return nil, fmt.Errorf("-profile: %w", err)
	}
	cpu := filepath.Join(e.o.profile, fmt.Sprintf("sidecar-%d-cpu.pprof", n))
	heap := filepath.Join(e.o.profile, fmt.Sprintf("sidecar-%d-heap.pprof", n))
	progress("%d merchants: %d s CPU profile under wrk, then heap profile, into %s", n, profileSeconds, e.o.profile)
	type answer struct {
		b   []byte
		err error
	}
	ch := make(chan answer, 1)
	go func() {
		b, err := side.adminGet(fmt.Sprintf("/debug/pprof/profile?seconds=%d", profileSeconds), profileSeconds*time.Second+2*time.Minute)
		ch <- answer{b, err}
	}()
	// wrk runs a second longer than the profile, so that the profile
	// covers load only.
	_, werr := e.wrk(wrk, script, side, (profileSeconds+1)*time.Second)
	a := <-ch
	if err := errors.Join(werr, a.err); err != nil {
		return nil, fmt.Errorf("-profile: %w", err)
	}
	if err := os.WriteFile(cpu, a.b, 0o644); err != nil {
		return nil, err
	}
	b, err := side.adminGet("/debug/pprof/heap", time.Minute)
	if err != nil {
		return nil, fmt.Errorf("-profile: %w", err)
	}
	if err := os.WriteFile(heap, b, 0o644); err != nil {
		return nil, err
	}
	return []string{cpu, heap}, nil
}
