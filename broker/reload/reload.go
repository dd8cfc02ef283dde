// Package reload keeps a token broker across config reloads: the broker
// of the config being replaced hands its tokens to the next one, to be
// revoked at shutdown, and a provider whose secret changed between two
// configs has its remembered failures forgotten. The objects kept across
// reloads log through the running config's logger (Logger).
package reload

import (
	"context"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Broker is a broker.Broker kept across config reloads. Its methods are
// safe for concurrent use.
type Broker struct {
	*broker.Broker
	// Logger logs the revocations: a Logger.Zap that follows the running
	// config's logger, since the broker outlives the config that made it.
	// Required.
	Logger *zap.Logger

	mu        sync.Mutex
	inherited []*broker.Entry // tokens of the brokers that reloads replaced
	// seen is the provider last seen per provider ID: its
	// config.Provider.SecretVersion, so that a reload with a rotated
	// secret (same ID) forgets the failures of the old one, and its
	// source, which revokes the tokens of that ID whose own source's
	// credential is refused (adminapi.Revoke).
	seen map[string]seenProvider
	// revokeTimeout bounds Revoke; zero: the constant revokeTimeout.
	revokeTimeout time.Duration
}

// SecretsSeen records the secret version and the source of every
// provider of reg (Revoke falls back on the source last seen for its ID)
// and forgets the failure policy's memory of those whose secret
// changed since the broker last saw them (see broker.ForgetSource),
// logging it with logger: the logger of the config that loads reg.
func (p *Broker) SecretsSeen(reg *config.Registry, logger *zap.Logger) {
	if reg == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen == nil {
		p.seen = map[string]seenProvider{}
	}
	for name, pv := range reg.Providers {
		old, seen := p.seen[pv.ID]
		p.seen[pv.ID] = seenProvider{secretVersion: pv.SecretVersion, source: pv.Source}
		if seen && old.secretVersion != pv.SecretVersion {
			n := p.ForgetSource(pv.ID)
			logger.Info("provider secret changed: its remembered failures are forgotten",
				zap.String("provider", name), zap.String("source", pv.ID), zap.Int("keys", n))
		}
	}
}

// Inherit takes over the tokens of a broker that a reload replaced, so
// that they are revoked at shutdown (if still valid then) like this
// broker's own.
func (p *Broker) Inherit(entries []*broker.Entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := time.Now()
	p.inherited = slices.DeleteFunc(p.inherited, func(e *broker.Entry) bool { return !e.Token().ValidAt(now, 0) })
	p.inherited = append(p.inherited, entries...)
}

// Tokens are the broker's cached tokens and the inherited ones still valid.
func (p *Broker) Tokens() []*broker.Entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.Entries()
	now := time.Now()
	for _, e := range p.inherited {
		if e.Token().ValidAt(now, 0) {
			out = append(out, e)
		}
	}
	return out
}

// Bounds of Revoke: how many revocations run at once, overall and per
// source, so that one slow provider answer does not use up the time of
// all the others and no provider gets more than a few at a time.
const (
	revokeWorkers   = 16
	revokePerSource = 4
	revokeTimeout   = 10 * time.Second
)

// Revoke revokes entries at their providers, revokeWorkers at a time and
// revokePerSource at a time per source, within revokeTimeout, and logs
// each result in the entries' order. A token whose source the failure
// policy keeps from being called (its breaker is open, or it is in
// backoff after a 429 or a bad credential) is not revoked; its log says
// why.
func (p *Broker) Revoke(entries []*broker.Entry) {
	timeout := p.revokeTimeout
	if timeout == 0 {
		timeout = revokeTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	results := make([]adminapi.RevokeResult, len(entries))
	bySource := map[string][]int{}
	for i, e := range entries {
		id := e.Binding().SourceID
		bySource[id] = append(bySource[id], i)
	}
	slots := make(chan struct{}, revokeWorkers)
	var wg sync.WaitGroup
	for _, queue := range bySource {
		var next atomic.Int64
		for range min(revokePerSource, len(queue)) {
			wg.Add(1)
			go func() {
				defer wg.Done()
				for {
					j := int(next.Add(1)) - 1
					if j >= len(queue) {
						return
					}
					slots <- struct{}{}
					results[queue[j]] = p.revoke(ctx, entries[queue[j]])
					<-slots
				}
			}()
		}
	}
	wg.Wait()
	for _, res := range results {
		p.Logger.Info("token revoked at shutdown", zap.String("merchant", res.Merchant),
			zap.String("fingerprint", res.Fingerprint), zap.Bool("revoked", res.Revoked), zap.String("error", res.Error))
	}
}

// source returns the source last seen for the provider ID id (nil: none).
func (p *Broker) source(id string) broker.Source {
	p.mu.Lock()
	defer p.mu.Unlock()
	return p.seen[id].source
}

// seenProvider is what Broker keeps of a provider it was last shown.
type seenProvider struct {
	secretVersion string
	source        broker.Source
}

// revoke revokes e's token at its provider, unless the failure policy
// keeps its source from being called now, and purges it from the fleet's
// shared tier once revoked: a token that was not revoked is still served.
// A source that cannot revoke is reported so by adminapi.Revoke, whatever
// its failure policy.
func (p *Broker) revoke(ctx context.Context, e *broker.Entry) adminapi.RevokeResult {
	if _, ok := e.Binding().Source.(broker.Revoker); ok {
		h := p.SourceHealth(e.Binding().SourceID)
		switch {
		case h.Breaker == broker.BreakerOpen:
			return adminapi.NotRevoked(e, "not revoked: the provider's circuit breaker is open after repeated failures")
		case !h.BackoffUntil.IsZero():
			return adminapi.NotRevoked(e, fmt.Sprintf("not revoked: the provider is not called until %s (Retry-After or a refused credential)",
				h.BackoffUntil.UTC().Format(time.RFC3339)))
		}
	}
	res := adminapi.Revoke(ctx, []*broker.Entry{e}, p.source)[0]
	if res.Revoked {
		// No node of the fleet serves it any longer; until the purge is
		// heard, a node whose call is refused retries with a new token.
		p.Purge(ctx, []*broker.Entry{e})
	}
	return res
}
