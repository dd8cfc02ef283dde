package fleet

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// redisServer is a real redis-server started by a test on a free loopback
// port, stopped by its pid.
type redisServer struct {
	t    *testing.T
	port int
	cmd  *exec.Cmd
	exit chan struct{}
}

// startRedis starts Debian's redis-server on a free 127.0.0.1 port, without
// persistence, and stops it when the test ends. The test is skipped when
// redis-server is not installed, except under CI, where it fails.
func startRedis(t *testing.T) *redisServer {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("redis-server is not installed (apt-get install -y redis-server): %v", err)
		}
		t.Skipf("redis-server is not installed (apt-get install -y redis-server; make test does it): %v", err)
	}
	r := &redisServer{t: t}
	t.Cleanup(r.kill)
	var err error
	for attempt := 0; attempt < 5; attempt++ {
		l, lerr := net.Listen("tcp", "127.0.0.1:0")
		if lerr != nil {
			t.Fatal(lerr)
		}
		r.port = l.Addr().(*net.TCPAddr).Port
		l.Close()
		if err = r.start(); err == nil {
			return r
		}
	}
	t.Fatalf("starting redis-server: %v", err)
	return nil
}

// Addr is the server's address.
func (r *redisServer) Addr() string { return "127.0.0.1:" + strconv.Itoa(r.port) }

// start runs redis-server on r.port and waits until it answers.
func (r *redisServer) start() error {
	cmd := exec.Command("redis-server", "--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning")
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	exit := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exit) }()
	r.cmd, r.exit = cmd, exit
	c := redis.NewClient(&redis.Options{Addr: r.Addr(), MaxRetries: -1})
	defer c.Close()
	deadline := time.Now().Add(15 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case <-exit:
			r.cmd = nil
			return fmt.Errorf("redis-server on port %d exited (port taken?)", r.port)
		default:
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		err := c.Ping(ctx).Err()
		cancel()
		if err == nil {
			return nil
		}
		time.Sleep(20 * time.Millisecond) // polling a starting process, not a timing assertion
	}
	r.kill()
	return fmt.Errorf("redis-server on port %d did not answer within 15s", r.port)
}

// kill stops the server by its pid and waits for it to exit.
func (r *redisServer) kill() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.exit
	r.cmd = nil
}

// restart starts the server again on the same port.
func (r *redisServer) restart() {
	r.t.Helper()
	var err error
	for attempt := 0; attempt < 20; attempt++ {
		if err = r.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond) // the port may linger briefly
	}
	r.t.Fatalf("restarting redis-server on port %d: %v", r.port, err)
}

// client returns a raw client on r, closed when the test ends.
func (r *redisServer) client() *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: r.Addr()})
	r.t.Cleanup(func() { c.Close() })
	return c
}
