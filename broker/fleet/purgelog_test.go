package fleet

import (
	"io"
	"net"
	"sync"
	"testing"
	"time"
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
	r := startRedis(t)
	keys := testKeys(t, 1)
	px := newProxy(t, r.Addr())
	a := newNode(t, r, keys, nil)
	b := newNodeAt(t, px.Addr(), keys, nil)
	heard := make(chan string, 4)
	b.OnPurge(func(_, fp string) { heard <- fp })
	ctx := testCtx(t)
	var m minter
	tok, _, err := a.Fetch(ctx, testKey, usable, m.mint)
	if err != nil {
		t.Fatal(err)
	}
	if _, adopted, err := b.Fetch(ctx, testKey, usable, m.mint); err != nil || !adopted {
		t.Fatalf("b: adopted=%v err=%v", adopted, err)
	}
	px.setCut(true)
	if err := a.Purge(ctx, testKey, tok.Fingerprint()); err != nil {
		t.Fatal(err)
	}
	select {
	case fp := <-heard:
		t.Fatalf("b heard the purge of %s through a cut connection", fp)
	case <-time.After(200 * time.Millisecond):
	}
	px.setCut(false)
	select {
	case fp := <-heard:
		if fp != tok.Fingerprint() {
			t.Fatalf("b heard a purge of %s; want %s", fp, tok.Fingerprint())
		}
	case <-time.After(20 * time.Second):
		t.Fatal("b did not learn of the purge announced while its connection was down")
	}
}
