package fleet

import (
	"context"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// proxy is a TCP proxy to Redis that a test can cut: its connections are
// closed and new ones refused until it is restored.
type proxy struct {
	l      net.Listener
	target string
	mu     sync.Mutex
	cut    bool
	conns  []net.Conn
	wg     sync.WaitGroup
}

func newProxy(t *testing.T, target string) *proxy {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &proxy{l: l, target: target}
	p.wg.Add(1)
	go p.accept()
	t.Cleanup(func() {
		l.Close()
		p.setCut(true)
		p.wg.Wait()
	})
	return p
}

func (p *proxy) Addr() string { return p.l.Addr().String() }

func (p *proxy) accept() {
	defer p.wg.Done()
	for {
		c, err := p.l.Accept()
		if err != nil {
			return
		}
		p.mu.Lock()
		if p.cut {
			p.mu.Unlock()
			c.Close()
			continue
		}
		up, err := net.Dial("tcp", p.target)
		if err != nil {
			p.mu.Unlock()
			c.Close()
			continue
		}
		p.conns = append(p.conns, c, up)
		p.mu.Unlock()
		p.wg.Add(2)
		go func() { defer p.wg.Done(); io.Copy(up, c); up.Close() }()
		go func() { defer p.wg.Done(); io.Copy(c, up); c.Close() }()
	}
}

// setCut closes every connection and refuses new ones (true), or accepts
// them again (false).
func (p *proxy) setCut(cut bool) {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.cut = cut
	if cut {
		for _, c := range p.conns {
			c.Close()
		}
		p.conns = nil
	}
}

// TestPurgeMissedWhileDisconnected: a node's connection to Redis is cut
// while another node purges a token it has cached, so the announcement
// never reaches it. Once it reconnects, it reads the purge back from the
// purge log and drops the token rather than serve it until it expires.
func TestPurgeMissedWhileDisconnected(t *testing.T) {
	purgeMissedWhileDisconnected(t)
}

// TestPurgeMissedWhileDisconnectedRedis60 is
// TestPurgeMissedWhileDisconnected with a Redis older than 6.2, whose
// XRANGE has no exclusive bounds ("(id"): the node reads the purge log
// back all the same.
func TestPurgeMissedWhileDisconnectedRedis60(t *testing.T) {
	purgeMissedWhileDisconnected(t, redis60{})
}

// redis60 makes a client answer as Redis before 6.2 does to an XRANGE
// with an exclusive bound.
type redis60 struct{}

func (redis60) DialHook(next redis.DialHook) redis.DialHook { return next }

func (redis60) ProcessHook(next redis.ProcessHook) redis.ProcessHook {
	return func(ctx context.Context, cmd redis.Cmder) error {
		if cmd.Name() == "xrange" {
			for _, arg := range cmd.Args()[2:] {
				if s, _ := arg.(string); strings.HasPrefix(s, "(") {
					err := errors.New("ERR Invalid stream ID specified as stream command argument")
					cmd.SetErr(err)
					return err
				}
			}
		}
		return next(ctx, cmd)
	}
}

func (redis60) ProcessPipelineHook(next redis.ProcessPipelineHook) redis.ProcessPipelineHook {
	return next
}

// purgeMissedWhileDisconnected runs TestPurgeMissedWhileDisconnected with
// hooks on the client of the node that misses the announcement.
func purgeMissedWhileDisconnected(t *testing.T, hooks ...redis.Hook) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	px := newProxy(t, r.Addr())
	a := newNode(t, r, keys, nil)
	b := newNodeAt(t, px.Addr(), keys, nil)
	for _, h := range hooks {
		b.Client().AddHook(h)
	}
	ctx := testCtx(t)
	tok, heard := sharedToken(t, a, b, &minter{})
	px.setCut(true)
	if err := a.Purge(ctx, testKey, tok.Fingerprint()); err != nil {
		t.Fatal(err)
	}
	heardPurge(t, heard, "", 200*time.Millisecond) // through a cut connection
	px.setCut(false)
	heardPurge(t, heard, tok.Fingerprint(), 20*time.Second)
}

// sharedToken has a mint (with m) the token of testKey and b adopt it;
// heard receives the fingerprint of each purge b hears.
func sharedToken(t *testing.T, a, b *node, m *minter) (tok broker.Token, heard <-chan string) {
	t.Helper()
	ch := make(chan string, 10)
	b.OnPurge(func(_, fp string) { ch <- fp })
	ctx := testCtx(t)
	tok, _, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	if _, adopted, err := b.Fetch(ctx, testKey, usable, m.mint); err != nil || !adopted {
		t.Fatalf("b: adopted=%v err=%v; want a's token", adopted, err)
	}
	return tok, ch
}

// heardPurge waits up to within for a purge on heard, and fails the test
// unless it is the purge of want ("": unless none comes).
func heardPurge(t *testing.T, heard <-chan string, want string, within time.Duration) {
	t.Helper()
	select {
	case fp := <-heard:
		if fp != want {
			t.Fatalf("a purge of %q heard; want %q", fp, want)
		}
	case <-time.After(within):
		if want != "" {
			t.Fatalf("the purge of %s not heard within %s", want, within)
		}
	}
}

// TestPurgeFailedIsNotAdoptedBack: a node purges a token (the token API
// or the upstream rejected it) while it cannot reach Redis, so the token
// stays stored there. Once Redis is reachable again, the node's next
// lookup of the key must not adopt the token it purged: it mints a new
// one.
func TestPurgeFailedIsNotAdoptedBack(t *testing.T) {
	r := startRedis(t)
	p := newProxy(t, r.Addr())
	a := newNodeAt(t, p.Addr(), testKeys(t, 1), func(o *Options) { o.Timeout = 200 * time.Millisecond })
	ctx := testCtx(t)
	var m minter
	old, _, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	p.setCut(true)
	if err := a.Purge(ctx, testKey, old.Fingerprint()); err == nil {
		t.Fatal("Purge with Redis cut off succeeded")
	}
	p.setCut(false)
	a.clock.Add(BreakerCooldown)
	tok, adopted, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	if tok.Value == old.Value || adopted {
		t.Fatalf("after a purge that could not reach Redis, the node adopted the purged token back (adopted=%v)", adopted)
	}
}

// TestPurgeRefusedIsStillAnnounced: a node purges a token while Redis
// refuses writes (a read-only replica after a failover, maxmemory, an ACL
// without writes), so the token stays stored there. Redis still takes the
// announcement: the other nodes drop the token, and once Redis takes
// writes again they do not adopt it back.
func TestPurgeRefusedIsStillAnnounced(t *testing.T) {
	for _, tc := range writeRefusals {
		t.Run(tc.name, func(t *testing.T) {
			r := startRedis(t)
			keys := testKeys(t, 1)
			a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
			ctx := testCtx(t)
			var m minter
			rejected, heard := sharedToken(t, a, b, &m)
			r.CLI(tc.refuse...)
			if err := a.Purge(ctx, testKey, rejected.Fingerprint()); err == nil {
				t.Fatal("Purge with writes refused succeeded")
			}
			heardPurge(t, heard, rejected.Fingerprint(), 5*time.Second)
			r.CLI(tc.allow...)
			b.clock.Add(BreakerCooldown)
			tok, adopted, err := b.Fetch(ctx, testKey, usable, m.mint)
			if err != nil {
				t.Fatal(err)
			}
			if adopted || tok.Value == rejected.Value {
				t.Fatalf("b adopted the token a purged back from Redis (adopted=%v)", adopted)
			}
		})
	}
}
