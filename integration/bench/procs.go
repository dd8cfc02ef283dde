package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"
)

// proc is a process the driver started; stop ends it by its pid.
type proc struct {
	name    string
	cmd     *exec.Cmd
	log     string // file holding its stdout and stderr
	done    chan struct{}
	waitErr error
}

// procs are the running processes, stopped on exit, interrupt or timeout.
var procs struct {
	sync.Mutex
	list []*proc
}

// start runs bin with args as a separate process, its output in
// dir/name.log. The child is killed if the driver dies (Pdeathsig).
func start(dir, name string, env []string, bin string, args ...string) (*proc, error) {
	logPath := filepath.Join(dir, name+".log")
	f, err := os.Create(logPath)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	cmd := exec.Command(bin, args...)
	cmd.Stdout, cmd.Stderr = f, f
	cmd.Env = append(os.Environ(), env...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s (%s): %w", name, bin, err)
	}
	p := &proc{name: name, cmd: cmd, log: logPath, done: make(chan struct{})}
	go func() { p.waitErr = cmd.Wait(); close(p.done) }()
	procs.Lock()
	procs.list = append(procs.list, p)
	procs.Unlock()
	return p, nil
}

func (p *proc) pid() int { return p.cmd.Process.Pid }

// exited reports whether the process has ended.
func (p *proc) exited() bool {
	select {
	case <-p.done:
		return true
	default:
		return false
	}
}

// stop sends SIGTERM to the process's pid, then SIGKILL after 10 s.
func (p *proc) stop() {
	if p.exited() {
		return
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case <-p.done:
	case <-time.After(10 * time.Second):
		p.cmd.Process.Kill()
		<-p.done
	}
	procs.Lock()
	for i, q := range procs.list {
		if q == p {
			procs.list = append(procs.list[:i], procs.list[i+1:]...)
			break
		}
	}
	procs.Unlock()
}

// stopAll stops every process still running, each by its pid.
func stopAll() {
	procs.Lock()
	list := append([]*proc(nil), procs.list...)
	procs.Unlock()
	for _, p := range list {
		p.stop()
	}
}

// tail is the end of the process's log, for error messages.
func (p *proc) tail() string {
	b, _ := os.ReadFile(p.log)
	if len(b) > 2000 {
		b = b[len(b)-2000:]
	}
	return string(b)
}

// readAddrFile waits up to timeout for the helper to write its address.
func readAddrFile(p *proc, path string, timeout time.Duration) (string, error) {
	deadline := time.Now().Add(timeout)
	for time.Now().Before(deadline) {
		if b, err := os.ReadFile(path); err == nil && len(b) > 0 {
			return string(b), nil
		}
		if p.exited() {
			return "", fmt.Errorf("%s exited before listening (log %s):\n%s", p.name, p.log, p.tail())
		}
		time.Sleep(10 * time.Millisecond)
	}
	return "", fmt.Errorf("%s did not write %s within %s (log %s)", p.name, path, timeout, p.log)
}

// waitHTTP polls url until any HTTP response arrives (the listener answers
// with the loaded config) and returns the time since since.
func waitHTTP(p *proc, url string, header map[string]string, since time.Time, timeout time.Duration) (time.Duration, error) {
	client := &http.Client{Timeout: 2 * time.Second}
	deadline := since.Add(timeout)
	for time.Now().Before(deadline) {
		req, _ := http.NewRequest("GET", url, nil)
		for k, v := range header {
			req.Header.Set(k, v)
		}
		if resp, err := client.Do(req); err == nil {
			io.Copy(io.Discard, resp.Body)
			resp.Body.Close()
			return time.Since(since), nil
		}
		if p.exited() {
			return 0, fmt.Errorf("%s exited before answering %s (log %s):\n%s", p.name, url, p.log, p.tail())
		}
		time.Sleep(5 * time.Millisecond)
	}
	return 0, fmt.Errorf("%s did not answer %s within %s (log %s)", p.name, url, timeout, p.log)
}

// cpuTicks is utime+stime of pid in clock ticks.
func cpuTicks(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	return parseStatCPU(string(b))
}

// rss is VmRSS of pid in bytes.
func rss(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	return parseVmRSS(string(b))
}

// clockTick is 1/CLK_TCK from getconf; 10 ms (USER_HZ 100, Linux's value
// on every common architecture) if getconf is missing.
func clockTick() time.Duration {
	out, err := exec.Command("getconf", "CLK_TCK").Output()
	if err == nil {
		if hz, err := strconv.Atoi(strings.TrimSpace(string(out))); err == nil && hz > 0 {
			return time.Second / time.Duration(hz)
		}
	}
	return 10 * time.Millisecond
}

// run runs a short command to completion within timeout and returns its
// combined output and wall time.
func run(timeout time.Duration, bin string, args ...string) (string, time.Duration, error) {
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, bin, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGKILL}
	t0 := time.Now()
	out, err := cmd.CombinedOutput()
	d := time.Since(t0)
	if ctx.Err() != nil {
		err = errors.Join(err, fmt.Errorf("%s: timed out after %s", filepath.Base(bin), timeout))
	}
	return string(out), d, err
}
