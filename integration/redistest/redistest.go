// Package redistest starts a real redis-server (Debian's) for tests, on a
// free 127.0.0.1 port and without persistence, and stops it by its process
// id when the test ends. `make test` installs redis-server when missing.
package redistest

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
)

// Server is a redis-server started by a test.
type Server struct {
	t      testing.TB
	port   int
	socket string // the unix socket it also listens on; "" for none
	cmd    *exec.Cmd
	exit   chan struct{}
}

// Start starts redis-server on a free loopback port and stops it when the
// test ends. Without redis-server the test is skipped, except under CI (env
// CI set), where it fails.
func Start(t testing.TB) *Server {
	t.Helper()
	return start(t, "")
}

// StartSocket is Start with the server listening on a unix socket as
// well, whose path Socket returns.
func StartSocket(t testing.TB) *Server {
	t.Helper()
	// A short folder: a socket's path has at most about 100 bytes, and a
	// test's TempDir can be longer.
	dir, err := os.MkdirTemp("", "redistest")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	return start(t, filepath.Join(dir, "redis.sock"))
}

// start starts the server, on socket too unless it is "".
func start(t testing.TB, socket string) *Server {
	t.Helper()
	if _, err := exec.LookPath("redis-server"); err != nil {
		if os.Getenv("CI") != "" {
			t.Fatalf("redis-server is not installed (apt-get install -y redis-server): %v", err)
		}
		t.Skipf("redis-server is not installed (apt-get install -y redis-server; make test does it): %v", err)
	}
	r := &Server{t: t, socket: socket}
	t.Cleanup(r.Kill)
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

// Addr is the server's address, 127.0.0.1:port.
func (r *Server) Addr() string { return "127.0.0.1:" + strconv.Itoa(r.port) }

// Socket is the path of the server's unix socket (StartSocket).
func (r *Server) Socket() string { return r.socket }

// start runs redis-server on r.port (and r.socket) and waits until it
// answers.
func (r *Server) start() error {
	args := []string{"--port", strconv.Itoa(r.port), "--bind", "127.0.0.1",
		"--save", "", "--appendonly", "no", "--daemonize", "no", "--loglevel", "warning"}
	if r.socket != "" {
		args = append(args, "--unixsocket", r.socket, "--unixsocketperm", "700")
	}
	cmd := exec.Command("redis-server", args...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Start(); err != nil {
		return err
	}
	exit := make(chan struct{})
	go func() { _ = cmd.Wait(); close(exit) }()
	r.cmd, r.exit = cmd, exit
	c := redis.NewClient(&redis.Options{Addr: r.Addr(), MaxRetries: -1})
	defer c.Close()
	for deadline := time.Now().Add(15 * time.Second); time.Now().Before(deadline); time.Sleep(20 * time.Millisecond) {
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
	}
	r.Kill()
	return fmt.Errorf("redis-server on port %d did not answer within 15s", r.port)
}

// Kill stops the server by its pid (SIGKILL: a crash) and waits for it.
func (r *Server) Kill() {
	if r.cmd == nil {
		return
	}
	_ = r.cmd.Process.Kill()
	<-r.exit
	r.cmd = nil
}

// Restart starts the server again on the same port.
func (r *Server) Restart() {
	r.t.Helper()
	var err error
	for attempt := 0; attempt < 50; attempt++ {
		if err = r.start(); err == nil {
			return
		}
		time.Sleep(100 * time.Millisecond) // the port may linger briefly
	}
	r.t.Fatalf("restarting redis-server on port %d: %v", r.port, err)
}

// Client returns a raw client on the server, closed when the test ends.
func (r *Server) Client() *redis.Client {
	c := redis.NewClient(&redis.Options{Addr: r.Addr()})
	r.t.Cleanup(func() { c.Close() })
	return c
}

// CLI runs redis-cli against the server and returns its output.
func (r *Server) CLI(args ...string) string {
	r.t.Helper()
	out, err := exec.Command("redis-cli", append([]string{"-p", strconv.Itoa(r.port)}, args...)...).CombinedOutput()
	if err != nil {
		r.t.Fatalf("redis-cli %v: %v\n%s", args, err, out)
	}
	return string(out)
}
