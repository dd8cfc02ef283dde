// Package reload keeps a token broker across config reloads: the broker
// of the config being replaced hands its tokens to the next one, to be
// revoked at shutdown, and a provider whose secret changed between two
// configs has its remembered failures forgotten.
package reload

import (
	"context"
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
	// Logger logs the forgotten failures and the revocations. Required.
	Logger *zap.Logger

	mu        sync.Mutex
	inherited []*broker.Entry // tokens of the brokers that reloads replaced
	// secretVersions is the config.Provider.SecretVersion last seen per
	// provider ID, so that a reload with a rotated secret (same ID)
	// forgets the failures of the old one.
	secretVersions map[string]string
}

// SecretsSeen records the secret version of every provider of reg and
// forgets the failure policy's memory of those whose secret changed since
// the broker last saw them (see broker.ForgetSource).
func (p *Broker) SecretsSeen(reg *config.Registry) {
	if reg == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.secretVersions == nil {
		p.secretVersions = map[string]string{}
	}
	for name, pv := range reg.Providers {
		old, seen := p.secretVersions[pv.ID]
		p.secretVersions[pv.ID] = pv.SecretVersion
		if seen && old != pv.SecretVersion {
			n := p.ForgetSource(pv.ID)
			p.Logger.Info("provider secret changed: its remembered failures are forgotten",
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

// revokeWorkers is how many revocations Revoke runs at once: one slow
// provider answer must not use up the time of all the others.
const revokeWorkers = 16

// Revoke revokes entries at their providers, revokeWorkers at a time,
// within 10 seconds, and logs each result.
func (p *Broker) Revoke(entries []*broker.Entry) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	results := make([]adminapi.RevokeResult, len(entries))
	var next atomic.Int64
	var wg sync.WaitGroup
	for range min(revokeWorkers, len(entries)) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1)) - 1
				if i >= len(entries) {
					return
				}
				results[i] = adminapi.Revoke(ctx, entries[i:i+1])[0]
			}
		}()
	}
	wg.Wait()
	for _, res := range results {
		p.Logger.Info("token revoked at shutdown", zap.String("merchant", res.Merchant),
			zap.String("fingerprint", res.Fingerprint), zap.Bool("revoked", res.Revoked), zap.String("error", res.Error))
	}
}
