package fleet

import (
	"errors"
	"net"
	"runtime"
	"sync"
	"sync/atomic"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// callTimeout is the bound of each Redis call, adapted to how fast Redis
// answers (RFC 6298's retransmission timer): a smoothed latency of the
// calls that succeeded plus four times its mean deviation, doubled after
// a call timed out until one succeeds again, never below the configured
// floor nor above the ceiling. A call that queues for one of the client's
// pool connections behind others gets one more such bound per full pool
// ahead of it, so a burst of calls does not time out in the client's own
// queue. Safe for concurrent use.
type callTimeout struct {
	floor, ceiling time.Duration
	poolSize       int64

	inflight atomic.Int64

	mu      sync.Mutex
	srtt    time.Duration // smoothed latency of successful calls; zero before the first
	rttvar  time.Duration // its smoothed mean deviation
	backoff time.Duration // after a timeout: twice that call's base bound; zero after a success
}

func newCallTimeout(floor, ceiling time.Duration, poolSize int) *callTimeout {
	return &callTimeout{floor: floor, ceiling: max(floor, ceiling), poolSize: int64(max(poolSize, 1))}
}

// call is one Redis call under way.
type call struct {
	// base is the bound the latency alone gives; bound adds the queue.
	base, bound time.Duration
}

// start counts a call under way and returns its bounds.
func (t *callTimeout) start() call {
	ahead := t.inflight.Add(1) - 1
	t.mu.Lock()
	base := max(t.floor, t.backoff)
	if t.srtt > 0 {
		base = max(base, t.srtt+4*t.rttvar)
	}
	t.mu.Unlock()
	base = min(base, t.ceiling)
	return call{base: base, bound: min(t.ceiling, base*time.Duration(1+ahead/t.poolSize))}
}

// succeeded ends c, which Redis answered after took.
func (t *callTimeout) succeeded(took time.Duration) {
	t.inflight.Add(-1)
	t.mu.Lock()
	defer t.mu.Unlock()
	if t.srtt == 0 {
		t.srtt, t.rttvar = took, took/2
	} else {
		t.rttvar = (3*t.rttvar + (t.srtt - took).Abs()) / 4
		t.srtt = (7*t.srtt + took) / 8
	}
	t.backoff = 0
}

// timedOut ends c, which Redis did not answer within its bound: later
// calls get twice c's base bound until one succeeds.
func (t *callTimeout) timedOut(c call) {
	t.inflight.Add(-1)
	t.mu.Lock()
	defer t.mu.Unlock()
	t.backoff = max(t.backoff, min(2*c.base, t.ceiling))
}

// ended ends a call that taught nothing about Redis's speed (it failed,
// or its caller gave up).
func (t *callTimeout) ended() { t.inflight.Add(-1) }

// poolSize is the number of connections client keeps per Redis node
// (go-redis's default when it is not one of go-redis's clients).
func poolSize(client redis.UniversalClient) int {
	switch c := client.(type) {
	case *redis.Client:
		return c.Options().PoolSize
	case *redis.ClusterClient:
		return c.Options().PoolSize
	case *redis.Ring:
		return c.Options().PoolSize
	}
	return 10 * runtime.GOMAXPROCS(0)
}

// isSlow reports whether err, the error of a Redis call that was given a
// deadline of its own, says that the call ran out of its bound: Redis, or
// the wait for one of the pool's connections, was slower than the bound.
// Any other error is a failure: Redis could not be reached (refused,
// reset, no route, closed connection, a failed dial) or answered with an
// error. A dial that timed out is a failure: nothing answers at that
// address.
func isSlow(err error) bool {
	if op := (*net.OpError)(nil); errors.As(err, &op) && op.Op == "dial" {
		return false
	}
	return broker.IsTimeout(err) || errors.Is(err, redis.ErrPoolTimeout)
}
