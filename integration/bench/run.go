package main

import (
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
)

// server is a running Caddy (the sidecar or the plain one).
type server struct {
	p      *proc
	port   int
	admin  int
	config string // its Caddyfile
}

func (s *server) url() string { return fmt.Sprintf("http://127.0.0.1:%d%s", s.port, benchPath) }

// countResult is everything measured for one merchant count.
type countResult struct {
	Merchants      int
	Start          time.Duration
	Reload         time.Duration
	RSSIdle        int64
	RSSAfterReload int64
	RSSWarm        int64
	WarmTokens     int64 // token requests of the warm-up
	WarmTime       time.Duration
	RoundTokens    int64 // token requests during the wrk rounds (want 0)
	// MemIdle and MemWarm are the sidecar's Go runtime figures when RSSIdle
	// and RSSWarm were read.
	MemIdle, MemWarm memStats
	Profiles         []string // files of -profile, when taken
	// ReloadWarm is a second `caddy reload --force` with the registry
	// unchanged, after the rounds (every token cached); ReloadWarmTokens
	// the token requests of it and of one request to each of
	// ReloadWarmChecked merchants spread over the registry (want 0).
	ReloadWarm        time.Duration
	ReloadWarmTokens  int64
	ReloadWarmChecked int
	Sidecar, Plain    []round
}

// env is what every merchant count shares.
type env struct {
	o         options
	dir       string
	caddy     string // bin/caddy
	upstream  string // host:port
	tokenAPI  string // base URL
	plain     *server
	tokenProc *proc // the token API helper, for its CPU
	tick      time.Duration
	plainInfo string
}

func runBench(o options) error {
	wrk, err := lookWrk()
	if err != nil {
		return err
	}
	e, self, cleanup, err := newEnv(o, "tb-bench-")
	if err != nil {
		return err
	}
	defer cleanup()
	maxN := 0
	for _, n := range o.merchants {
		maxN = max(maxN, n)
	}
	orgs := maxN
	if o.split.files > 0 {
		orgs = max(orgs, o.split.orgs())
	}
	if err := e.startTokenAPI(self, nil, "-orgs", fmt.Sprint(orgs), "-merchant-orgs", fmt.Sprint(o.wildcard)); err != nil {
		return err
	}

	// The plain Caddy runs for the whole run.
	t0 := time.Now()
	if e.plain, err = e.startCaddy("plain", ""); err != nil {
		return err
	}
	plainStart, err := waitHTTP(e.plain.p, e.plain.url(), nil, t0, 5*time.Minute)
	if err != nil {
		return err
	}
	time.Sleep(o.settle)
	plainRSS, err := rss(e.plain.p.pid())
	if err != nil {
		return err
	}
	e.plainInfo = fmt.Sprintf("plain Caddy (static header): start %s, idle RSS %s", secs(plainStart), mib(plainRSS))

	var results []countResult
	for _, n := range o.merchants {
		r, err := e.measure(n, wrk, o.profile != "" && n == maxN)
		if err != nil {
			return fmt.Errorf("%d merchants: %w", n, err)
		}
		results = append(results, r)
	}
	var split *splitResult
	if o.split.files > 0 {
		s, err := e.measureSplit(o.split)
		if err != nil {
			return fmt.Errorf("split registry (%d files × %d merchants): %w", o.split.files, o.split.perFile, err)
		}
		split = &s
	}
	wildcard := ""
	if o.wildcard > 0 {
		w, err := e.measureWildcard(wrk, o.wildcard, o.wildcardActive, o.wildcardTime)
		if err != nil {
			return fmt.Errorf("wildcard: %w", err)
		}
		wildcard = w.text()
	}
	fmt.Print(report(machine(), e.describe(), e.plainInfo, results, split, wildcard))
	return nil
}

func (e *env) describe() string {
	experiment := ""
	if len(e.o.sidecarEnv) > 0 {
		experiment = fmt.Sprintf("; EXPERIMENT: the sidecar runs with %s added to its environment", strings.Join(e.o.sidecarEnv, " "))
	}
	return fmt.Sprintf("wrk -t%d -c%d, random merchant per request on %s; %d interleaved rounds of %s per server after a %s warm-up; RSS and the Go runtime figures (admin API /debug/vars, no GC forced) read %s after start and after the token warm-up; reload = `caddy reload --force` with the registry unchanged (before the token warm-up; again after the rounds), except in the split row (one file edited)%s",
		e.o.threads, e.o.connections, benchPath, e.o.rounds, e.o.round, e.o.warmup, e.o.settle, experiment)
}

// startCaddy starts bin/caddy with the 3-route Caddyfile; registry == ""
// makes the plain Caddy.
func (e *env) startCaddy(name, registry string) (*server, error) {
	// Caddy's data and config folders in the run's folder: nothing of the
	// user's Caddy storage is read or written.
	env := []string{apiKeyEnv + "=" + apiKey, "XDG_DATA_HOME=" + filepath.Join(e.dir, "data"), "XDG_CONFIG_HOME=" + filepath.Join(e.dir, "config")}
	if registry != "" {
		env = append(env, e.o.sidecarEnv...)
	}
	return e.startServer(name, env, func(port, admin int) string {
		return caddyfile(port, admin, e.upstream, registry)
	})
}

// startServer starts bin/caddy as the process name, with env added to
// this process's environment, on two free ports (the site's and the
// admin API's); its Caddyfile, made by caddyfile for those ports, is
// e.dir/name.Caddyfile. It does not wait for Caddy to answer.
func (e *env) startServer(name string, env []string, caddyfile func(port, admin int) string) (*server, error) {
	s := &server{}
	var err error
	if s.port, err = freePort(); err != nil {
		return nil, err
	}
	if s.admin, err = freePort(); err != nil {
		return nil, err
	}
	s.config = filepath.Join(e.dir, name+".Caddyfile")
	if err := os.WriteFile(s.config, []byte(caddyfile(s.port, s.admin)), 0o644); err != nil {
		return nil, err
	}
	if s.p, err = start(e.dir, name, env, e.caddy, "run", "--config", s.config, "--adapter", "caddyfile"); err != nil {
		return nil, err
	}
	return s, nil
}

// lookWrk finds wrk, which the throughput modes drive.
func lookWrk() (string, error) {
	wrk, err := exec.LookPath("wrk")
	if err != nil {
		return "", errors.New("wrk not found in $PATH: install it (apt-get install -y wrk), as `make bench` does")
	}
	return wrk, nil
}

// newEnv makes a mode's folder (named from prefix; kept with -keep, else
// removed by cleanup) and its env, and starts the upstream (prepare).
// self is this program, which runs the helper processes.
func newEnv(o options, prefix string) (e *env, self string, cleanup func(), err error) {
	dir, err := os.MkdirTemp("", prefix)
	if err != nil {
		return nil, "", nil, err
	}
	cleanup = func() { os.RemoveAll(dir) }
	if o.keep {
		fmt.Fprintf(os.Stderr, "bench: keeping %s\n", dir)
		cleanup = func() {}
	}
	e = &env{o: o, dir: dir, caddy: filepath.Join(o.bin, "caddy"), tick: clockTick()}
	if self, err = e.prepare(); err != nil {
		cleanup()
		return nil, "", nil, err
	}
	return e, self, cleanup, nil
}

// startTokenAPI starts the token API helper (with the partner API key and
// the extra environment and arguments) and points e at it.
func (e *env) startTokenAPI(self string, environ []string, args ...string) error {
	addrFile := filepath.Join(e.dir, "tokenapi.addr")
	ta, err := start(e.dir, "tokenapi", append([]string{apiKeyEnv + "=" + apiKey}, environ...), self,
		append([]string{"tokenapi", "-addr-file", addrFile}, args...)...)
	if err != nil {
		return err
	}
	addr, err := readAddrFile(ta, addrFile, time.Minute)
	if err != nil {
		return err
	}
	e.tokenAPI = "http://" + addr
	e.tokenProc = ta
	return nil
}

// startRedis starts a redis-server (redisBin) on a free loopback port, with
// no persistence, as the process name; it returns its address.
func startRedis(dir, name, redisBin string) (*proc, string, error) {
	port, err := freePort()
	if err != nil {
		return nil, "", err
	}
	p, err := start(dir, name, nil, redisBin, "--port", strconv.Itoa(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no")
	if err != nil {
		return nil, "", err
	}
	return p, fmt.Sprintf("127.0.0.1:%d", port), nil
}

// lookRedis finds Debian's redis-server, which the fleet modes start.
func lookRedis() (string, error) {
	bin, err := exec.LookPath("redis-server")
	if err != nil {
		return "", errors.New("redis-server not found in $PATH: install it (apt-get install -y redis-server)")
	}
	return bin, nil
}

// prepare builds bin/caddy when asked (-build), resolves the paths of
// bin/caddy and of this driver, and starts the upstream helper process
// in e.dir. It returns the driver's path, for the other helpers.
func (e *env) prepare() (self string, err error) {
	if e.o.build {
		goBin := os.Getenv("GO")
		if goBin == "" {
			goBin = "go"
		}
		progress("building %s", e.caddy)
		if out, _, err := run(15*time.Minute, goBin, "build", "-o", e.caddy, "./cmd/caddy"); err != nil {
			return "", fmt.Errorf("go build ./cmd/caddy: %v\n%s", err, out)
		}
	}
	if e.caddy, err = filepath.Abs(e.caddy); err != nil {
		return "", err
	}
	if self, err = os.Executable(); err != nil {
		return "", err
	}
	addrFile := filepath.Join(e.dir, "upstream.addr")
	up, err := start(e.dir, "upstream", nil, self, "upstream", "-addr-file", addrFile)
	if err != nil {
		return "", err
	}
	e.upstream, err = readAddrFile(up, addrFile, time.Minute)
	return self, err
}

// startIdle starts a sidecar on registry and measures its start (until
// the route answers: without a merchant header the broker answers at
// once, so any answer means the listener is up with the config loaded),
// then, -settle later, its idle RSS and Go runtime figures. The caller
// stops the sidecar returned, also when err is not nil.
func (e *env) startIdle(name, registry string, start *time.Duration, rssIdle *int64, mem *memStats) (*server, error) {
	t0 := time.Now()
	side, err := e.startCaddy(name, registry)
	if err != nil {
		return nil, err
	}
	if *start, err = waitHTTP(side.p, side.url(), nil, t0, 10*time.Minute); err != nil {
		return side, err
	}
	time.Sleep(e.o.settle)
	if *rssIdle, err = rss(side.p.pid()); err != nil {
		return side, err
	}
	*mem, err = side.memStats()
	return side, err
}

// measure runs everything for n merchants with a fresh sidecar; with
// profile, it saves the sidecar's profiles after the rounds (-profile).
func (e *env) measure(n int, wrk string, profile bool) (countResult, error) {
	r := countResult{Merchants: n}
	name := fmt.Sprintf("sidecar-%d", n)
	registry := filepath.Join(e.dir, fmt.Sprintf("merchants-%d.toml", n))
	if err := os.WriteFile(registry, []byte(registryTOML(n, e.tokenAPI)), 0o644); err != nil {
		return r, err
	}
	script := filepath.Join(e.dir, fmt.Sprintf("random-%d.lua", n))
	if err := os.WriteFile(script, []byte(wrkScript(n)), 0o644); err != nil {
		return r, err
	}

	progress("%d merchants: start", n)
	side, err := e.startIdle(name, registry, &r.Start, &r.RSSIdle, &r.MemIdle)
	if side != nil {
		defer side.p.stop()
	}
	if err != nil {
		return r, err
	}

	progress("%d merchants: reload", n)
	if r.Reload, err = e.reload(side); err != nil {
		return r, err
	}
	if r.RSSAfterReload, err = rss(side.p.pid()); err != nil {
		return r, err
	}

	progress("%d merchants: token warm-up", n)
	before, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	t1 := time.Now()
	if err := warm(side.url(), n, merchantID); err != nil {
		return r, err
	}
	r.WarmTime = time.Since(t1)
	after, err := e.tokenCount()
	if err != nil {
		return r, err
	}
	r.WarmTokens = after - before
	time.Sleep(e.o.settle)
	if r.RSSWarm, err = rss(side.p.pid()); err != nil {
		return r, err
	}
	if r.MemWarm, err = side.memStats(); err != nil {
		return r, err
	}

	progress("%d merchants: wrk warm-up and %d rounds", n, e.o.rounds)
	for _, s := range []*server{side, e.plain} {
		if _, err := e.wrk(wrk, script, s, e.o.warmup); err != nil {
			return r, err
		}
	}
	if before, err = e.tokenCount(); err != nil {
		return r, err
	}
	for i := range e.o.rounds {
		order := []*server{side, e.plain}
		if i%2 == 1 { // ABBA: neither server always runs first
			order = []*server{e.plain, side}
		}
		for _, s := range order {
			rd, err := e.wrk(wrk, script, s, e.o.round)
			if err != nil {
				return r, err
			}
			if s == side {
				r.Sidecar = append(r.Sidecar, rd)
			} else {
				r.Plain = append(r.Plain, rd)
			}
		}
	}
	if after, err = e.tokenCount(); err != nil {
		return r, err
	}
	r.RoundTokens = after - before
	if profile {
		if r.Profiles, err = e.profile(wrk, script, side, n); err != nil {
			return r, err
		}
	}

	progress("%d merchants: reload with every token cached", n)
	if before, err = e.tokenCount(); err != nil {
		return r, err
	}
	if r.ReloadWarm, err = e.reload(side); err != nil {
		return r, err
	}
	r.ReloadWarmChecked = min(n, reloadCheck)
	spread := func(i int) string { return merchantID(i * (n / r.ReloadWarmChecked)) }
	if err := warm(side.url(), r.ReloadWarmChecked, spread); err != nil {
		return r, fmt.Errorf("after the reload with tokens cached: %w", err)
	}
	if after, err = e.tokenCount(); err != nil {
		return r, err
	}
	r.ReloadWarmTokens = after - before
	return r, nil
}

// reloadCheck is how many merchants, spread over the registry, are
// requested after the reload with every token cached.
const reloadCheck = 145

// reload runs `caddy reload --force` against s (Caddy skips the reload of
// an identical config without it) and returns its wall time, from the
// command to its exit.
func (e *env) reload(s *server) (time.Duration, error) {
	out, d, err := run(10*time.Minute, e.caddy, "reload", "--config", s.config, "--adapter", "caddyfile",
		"--address", fmt.Sprintf("127.0.0.1:%d", s.admin), "--force")
	if err != nil {
		return 0, fmt.Errorf("%s: caddy reload: %v\n%s", s.p.name, err, out)
	}
	return d, nil
}

// wrk runs one round against s and reads the server's CPU around it.
func (e *env) wrk(wrk, script string, s *server, d time.Duration) (round, error) {
	secs := max(1, int(d.Round(time.Second)/time.Second))
	// The memstats reads are outside the CPU reads: their work in the
	// server is not counted as the requests'.
	m0, err := s.memStats()
	if err != nil {
		return round{}, err
	}
	c0, err := cpuTicks(s.p.pid())
	if err != nil {
		return round{}, fmt.Errorf("%s: %w", s.p.name, err)
	}
	out, _, err := run(d+2*time.Minute, wrk, "-t", fmt.Sprint(e.o.threads), "-c", fmt.Sprint(e.o.connections),
		"-d", fmt.Sprintf("%ds", secs), "--timeout", "10s", "-s", script, fmt.Sprintf("http://127.0.0.1:%d", s.port))
	if err != nil {
		return round{}, fmt.Errorf("wrk against %s: %v\n%s", s.p.name, err, out)
	}
	c1, err := cpuTicks(s.p.pid())
	if err != nil {
		return round{}, fmt.Errorf("%s: %w", s.p.name, err)
	}
	m1, err := s.memStats()
	if err != nil {
		return round{}, err
	}
	rd, err := parseWrk(out)
	if err != nil {
		return round{}, fmt.Errorf("wrk against %s: %w\n%s", s.p.name, err, out)
	}
	rd.CPUTicks, rd.ClockTick = c1-c0, e.tick
	rd.Alloc, rd.GCs = m1.TotalAlloc-m0.TotalAlloc, m1.NumGC-m0.NumGC
	return rd, nil
}

// tokenCount asks the token API how many token requests it served.
func (e *env) tokenCount() (int64, error) {
	resp, err := http.Get(e.tokenAPI + tokenCountPath)
	if err != nil {
		return 0, err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		return 0, err
	}
	return parseCount(string(b))
}

// warm requests merchants id(0) … id(n-1) once each, 64 at a time, and
// fails unless each got 200.
func warm(url string, n int, id func(int) string) error {
	const workers = 64
	client := &http.Client{Timeout: time.Minute, Transport: &http.Transport{
		MaxIdleConnsPerHost: workers, MaxIdleConns: workers, DisableCompression: true}}
	defer client.CloseIdleConnections()
	var next, failed atomic.Int64
	var first atomic.Value
	var wg sync.WaitGroup
	for range workers {
		wg.Go(func() {
			for {
				i := int(next.Add(1)) - 1
				if i >= n {
					return
				}
				req, _ := http.NewRequest("GET", url, nil)
				req.Header.Set("X-Merchant-Id", id(i))
				resp, err := client.Do(req)
				if err == nil {
					io.Copy(io.Discard, resp.Body)
					resp.Body.Close()
					if resp.StatusCode != http.StatusOK {
						err = fmt.Errorf("merchant %s: status %d", id(i), resp.StatusCode)
					}
				}
				if err != nil {
					failed.Add(1)
					first.CompareAndSwap(nil, err.Error())
				}
			}
		})
	}
	wg.Wait()
	if f := failed.Load(); f > 0 {
		return fmt.Errorf("token warm-up: %d of %d requests failed, first: %v (see the sidecar's log)", f, n, first.Load())
	}
	return nil
}

func freePort() (int, error) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer l.Close()
	return l.Addr().(*net.TCPAddr).Port, nil
}

func progress(format string, args ...any) {
	fmt.Fprintf(os.Stderr, "bench %s: %s\n", time.Now().Format("15:04:05"), fmt.Sprintf(format, args...))
}

// machine describes the machine and the moment of the run.
func machine() string {
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
		load = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	return fmt.Sprintf("%d CPUs (%s), %s/%s, %s, load average %s, %s", runtime.NumCPU(), model, runtime.GOOS, runtime.GOARCH,
		runtime.Version(), load, time.Now().UTC().Format("2006-01-02 15:04 UTC"))
}
