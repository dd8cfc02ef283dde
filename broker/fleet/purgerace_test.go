package fleet_test

import (
	"bytes"
	"context"
	"fmt"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
)

// countingSource mints distinct tokens valid for an hour.
type countingSource struct{ n atomic.Int64 }

func (s *countingSource) Token(context.Context, broker.Request) (broker.Token, error) {
	n := s.n.Add(1)
	now := time.Now()
	return broker.Token{Value: broker.Secret(fmt.Sprintf("fleet-token-%d-abcdef", n)), Type: "Bearer", Expiry: now.Add(time.Hour), IssuedAt: now}, nil
}

// pausedFetch is a node's real shared tier with a pause after Fetch: the
// token is read from Redis, and not yet cached by the broker.
type pausedFetch struct {
	*fleet.Cache
	fetched chan struct{} // receives when a Fetch has its token
	resume  chan struct{} // the Fetch returns when this is closed
}

func (p *pausedFetch) Fetch(ctx context.Context, key string, usable func(broker.Token) bool, mint func(context.Context) (broker.Token, error)) (broker.Token, bool, error) {
	tok, adopted, err := p.Cache.Fetch(ctx, key, usable, mint)
	if p.fetched != nil {
		p.fetched <- struct{}{}
		<-p.resume
	}
	return tok, adopted, err
}

func newCache(t *testing.T, r *redistest.Server) *fleet.Cache {
	t.Helper()
	keys, err := seal.New(bytes.Repeat([]byte{7}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	uo := &redis.UniversalOptions{Addrs: []string{r.Addr()}}
	fleet.ClientOptions(uo, 5*time.Second, 0)
	rdb := redis.NewUniversalClient(uo)
	c, err := fleet.New(fleet.Options{Client: rdb, Keys: keys, Timeout: 5 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close(); rdb.Close() })
	return c
}

// TestPurgeReachesFetchInFlight is the purge race of a fleet, made
// deterministic: node B adopts the fleet's token from Redis; before B
// caches it, node A purges it, and B hears the purge (and finds nothing to
// drop yet). B must not cache the purged token afterwards: it fetches once
// more, and the lookup that was waiting gets a new token. Before, B kept
// serving the purged token until it expired.
func TestPurgeReachesFetchInFlight(t *testing.T) {
	for _, tt := range []struct {
		name  string
		purge func(a *broker.Broker, b *broker.Binding, tok broker.Token)
	}{
		{"admin purge", func(a *broker.Broker, b *broker.Binding, _ broker.Token) {
			a.PurgeMatching(func(x *broker.Binding) bool { return x.Merchant == b.Merchant })
		}},
		{"upstream rejection", func(a *broker.Broker, b *broker.Binding, tok broker.Token) {
			if got := a.Reject(b, tok.Value); got != broker.RejectionPurged {
				t.Fatalf("Reject = %s; want purged", got)
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := redistest.Start(t)
			src := &countingSource{}
			ca, cb := newCache(t, r), newCache(t, r)
			pb := &pausedFetch{Cache: cb}
			a, b := broker.New(broker.Options{Shared: ca}), broker.New(broker.Options{Shared: pb})
			t.Cleanup(a.Close)
			t.Cleanup(b.Close)
			heard := make(chan string, 4)
			cb.OnPurge(func(_, fp string) { heard <- fp }) // after B's broker: its drop is done
			req := broker.Request{Merchant: "acme", Organisation: "org-1", Scopes: []string{"payments"}}
			ba, bb := brokertest.NewBinding("nuapay", src, req), brokertest.NewBinding("nuapay", src, req)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()

			old, err := brokertest.Token(ctx, a, ba)
			if err != nil {
				t.Fatal(err)
			}
			pb.fetched, pb.resume = make(chan struct{}, 1), make(chan struct{})
			type result struct {
				tok broker.Token
				err error
			}
			got := make(chan result, 1)
			go func() {
				tok, err := brokertest.Token(ctx, b, bb)
				got <- result{tok, err}
			}()
			<-pb.fetched // B has read the token from Redis
			tt.purge(a, ba, old)
			select {
			case fp := <-heard:
				if fp != old.Fingerprint() {
					t.Fatalf("B heard a purge of %s; want %s", fp, old.Fingerprint())
				}
			case <-ctx.Done():
				t.Fatal("B did not hear the purge")
			}
			pb.fetched = make(chan struct{}, 4) // the fetch once more is not paused
			close(pb.resume)
			res := <-got
			if res.err != nil {
				t.Fatal(res.err)
			}
			if res.tok.Value == old.Value {
				t.Errorf("the lookup waiting on B got the token purged while it was fetched")
			}
			for _, e := range b.Entries() {
				if e.Fingerprint() == old.Fingerprint() {
					t.Fatalf("B caches the purged token %s", old.Fingerprint())
				}
			}
			if tok, err := brokertest.Token(ctx, b, bb); err != nil || tok.Value == old.Value {
				t.Fatalf("B serves the purged token (err %v)", err)
			}
			if n := src.n.Load(); n != 2 {
				t.Errorf("token requests = %d; want 2 (the purged token and one replacement)", n)
			}
		})
	}
}

// pausedPurge is a node's real shared tier with a pause before Purge: the
// broker has dropped the token from memory, Redis still holds it.
type pausedPurge struct {
	*fleet.Cache
	purging chan struct{} // receives when a Purge starts
	resume  chan struct{} // the Purge goes on when this is closed
}

func (p *pausedPurge) Purge(ctx context.Context, key, fingerprint string) error {
	p.purging <- struct{}{}
	<-p.resume
	return p.Cache.Purge(ctx, key, fingerprint)
}

// TestPurgerDoesNotAdoptItsPurgedToken: a node purges a token (admin
// purge, upstream rejection); before Redis has deleted it, a lookup on the
// same node misses memory and reads Redis. It must not adopt the token
// being purged: it mints a new one, and the node never caches the purged
// token again. Before, the node adopted its own purged token back and
// served it until it expired.
func TestPurgerDoesNotAdoptItsPurgedToken(t *testing.T) {
	for _, tt := range []struct {
		name  string
		purge func(a *broker.Broker, b *broker.Binding, tok broker.Token)
	}{
		{"admin purge", func(a *broker.Broker, b *broker.Binding, _ broker.Token) {
			a.PurgeMatching(func(x *broker.Binding) bool { return x.Merchant == b.Merchant })
		}},
		{"purge", func(a *broker.Broker, b *broker.Binding, tok broker.Token) {
			if a.Reject(b, tok.Value) != broker.RejectionPurged {
				t.Error("Purge found nothing to purge")
			}
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := redistest.Start(t)
			src := &countingSource{}
			pa := &pausedPurge{Cache: newCache(t, r), purging: make(chan struct{}, 1), resume: make(chan struct{})}
			a := broker.New(broker.Options{Shared: pa})
			t.Cleanup(a.Close)
			req := broker.Request{Merchant: "acme", Organisation: "org-1", Scopes: []string{"payments"}}
			ba, other := brokertest.NewBinding("nuapay", src, req), brokertest.NewBinding("nuapay", src, req)
			ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
			defer cancel()
			old, err := brokertest.Token(ctx, a, ba)
			if err != nil {
				t.Fatal(err)
			}
			purged := make(chan struct{})
			go func() {
				defer close(purged)
				tt.purge(a, ba, old)
			}()
			<-pa.purging // dropped from memory, still in Redis
			tok, err := brokertest.Token(ctx, a, other)
			if err != nil {
				t.Fatal(err)
			}
			if tok.Value == old.Value {
				t.Errorf("a lookup during the purge got the token being purged")
			}
			close(pa.resume)
			<-purged
			for _, e := range a.Entries() {
				if e.Fingerprint() == old.Fingerprint() {
					t.Fatalf("the node caches the token it purged")
				}
			}
			if tok, err := brokertest.Token(ctx, a, ba); err != nil || tok.Value == old.Value {
				t.Fatalf("the node serves the token it purged (err %v)", err)
			}
		})
	}
}
