// Package reload keeps a token broker across config reloads: the broker
// of the config being replaced hands its tokens to the next one, to be
// revoked at shutdown, and a provider whose secret changed between two
// configs has its remembered failures forgotten. The objects kept across
// reloads log through the running config's logger (Logger).
package reload

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
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
	inherited []*broker.Entry          // tokens of the brokers that reloads replaced
	seen      map[string]*seenProvider // by provider ID, while a config that showed it is not released
	// revokeTimeout bounds Revoke; zero: the constant revokeTimeout.
	revokeTimeout time.Duration
}

// Owner is a config that shows the broker its registries (SecretsSeen)
// until it is released (Release). Owners are compared by identity (the
// field keeps two *Owner from being equal, as zero-size values may be).
type Owner struct{ _ byte }

// SecretsSeen records, for the config owner, the secret version and the
// source of every provider of reg: Revoke falls back on the source last
// seen for an ID whose credential is refused. The failure policy forgets
// the providers whose secret changed since they were last seen
// (broker.ForgetSource), logged with logger, the config's.
func (p *Broker) SecretsSeen(owner *Owner, reg *config.Registry, logger *zap.Logger) {
	if reg == nil {
		return
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.seen == nil {
		p.seen = map[string]*seenProvider{}
	}
	for name, pv := range reg.Providers {
		sp := p.seen[pv.ID]
		if sp == nil {
			sp = &seenProvider{secretVersion: pv.SecretVersion}
			p.seen[pv.ID] = sp
		}
		if sp.secretVersion != pv.SecretVersion {
			n := p.ForgetSource(pv.ID)
			logger.Info("provider secret changed: its remembered failures are forgotten",
				zap.String("provider", name), zap.String("source", pv.ID), zap.Int("keys", n))
		}
		sp.secretVersion, sp.source = pv.SecretVersion, pv.Source
		if !slices.Contains(sp.owners, owner) {
			sp.owners = append(sp.owners, owner)
		}
	}
}

// Release forgets what the config owner showed (SecretsSeen) and no
// other config still shows, in the failure policy too
// (broker.ForgetSource): a provider a later config adds back is called
// at once.
func (p *Broker) Release(owner *Owner) {
	p.mu.Lock()
	defer p.mu.Unlock()
	for id, sp := range p.seen {
		if sp.owners = slices.DeleteFunc(sp.owners, func(o *Owner) bool { return o == owner }); len(sp.owners) == 0 {
			delete(p.seen, id)
			p.ForgetSource(id)
		}
	}
}

// Inherit takes over the tokens of a broker that a reload replaced, to
// revoke them at shutdown if still valid then.
func (p *Broker) Inherit(entries []*broker.Entry) {
	p.mu.Lock()
	defer p.mu.Unlock()
	now := p.Now()
	p.inherited = slices.DeleteFunc(p.inherited, func(e *broker.Entry) bool { return !e.Token().ValidAt(now, 0) })
	p.inherited = append(p.inherited, entries...)
}

// Tokens are the broker's cached tokens and the inherited ones still valid.
func (p *Broker) Tokens() []*broker.Entry {
	p.mu.Lock()
	defer p.mu.Unlock()
	out := p.Entries()
	now := p.Now()
	for _, e := range p.inherited {
		if e.Token().ValidAt(now, 0) {
			out = append(out, e)
		}
	}
	return out
}

// Bounds of Revoke: revocations at once, overall and per source (one
// slow provider does not use up the others' time); the time of all; how
// a provider's answers hold or stop its next revocations (revocations).
const (
	revokeWorkers   = 16
	revokePerSource = 4
	revokeTimeout   = 10 * time.Second
	revokeFailures  = 3           // 5xx or timeouts in a row that stop a provider's revocations
	revoke429Wait   = time.Second // the hold after a 429 without a wait, doubled at each 429 in a row
)

// Revoke revokes entries at their providers, revokeWorkers at a time and
// revokePerSource at a time per source, within revokeTimeout, and logs
// each result in the entries' order. A token whose source the failure
// policy keeps from being called (breaker open, backoff) is not revoked;
// its log says why. A provider whose answers stop its revocations
// (revocations) gets one more log: its name and how many of its tokens
// were not revoked.
func (p *Broker) Revoke(entries []*broker.Entry) {
	timeout := p.revokeTimeout
	if timeout == 0 {
		timeout = revokeTimeout
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	deadline := p.Now().Add(timeout)
	results := make([]adminapi.RevokeResult, len(entries))
	bySource := map[string][]int{}
	for i, e := range entries {
		id := e.Binding().SourceID
		bySource[id] = append(bySource[id], i)
	}
	slots := make(chan struct{}, revokeWorkers)
	var wg sync.WaitGroup
	states := map[string]*revocations{}
	for id, queue := range bySource {
		var next atomic.Int64
		rv := &revocations{deadline: deadline}
		states[id] = rv
		for range min(revokePerSource, len(queue)) {
			wg.Go(func() {
				for j := int(next.Add(1)) - 1; j < len(queue); j = int(next.Add(1)) - 1 {
					results[queue[j]] = p.revokeHeld(ctx, rv, entries[queue[j]], slots)
				}
			})
		}
	}
	wg.Wait()
	for _, res := range results {
		p.Logger.Info("token revoked at shutdown", zap.String("merchant", res.Merchant),
			zap.String("fingerprint", res.Fingerprint), zap.Bool("revoked", res.Revoked), zap.String("error", res.Error))
	}
	for id, rv := range states {
		if rv.stopped == "" {
			continue
		}
		n := 0
		for _, i := range bySource[id] {
			if !results[i].Revoked {
				n++
			}
		}
		p.Logger.Warn("revocations at shutdown stopped for a provider", zap.String("provider", config.ProviderName(id)),
			zap.Int("not_revoked", n), zap.String("reason", rv.stopped))
	}
}

// revokeHeld revokes e once rv lets it be sent, holding one of slots
// per call, and sends it again after a 429 whose hold ends before the
// deadline.
func (p *Broker) revokeHeld(ctx context.Context, rv *revocations, e *broker.Entry, slots chan struct{}) adminapi.RevokeResult {
	for {
		round, reason := rv.ready(ctx, p.Now, p.Sleep)
		if reason != "" {
			return adminapi.NotRevoked(e, reason)
		}
		slots <- struct{}{}
		res, last := p.revoke(ctx, e)
		<-slots
		if (res.Revoked || last != nil) && rv.answered(last, round, p.Now()) {
			continue
		}
		return res
	}
}

// revocations is the state of one provider's revocations at shutdown,
// apart from the failure policy of its token requests. A 429 holds them
// for its Retry-After (without one revoke429Wait, doubled at each 429 in
// a row), then its revocation is sent again; a hold that would end at
// the deadline or later stops them, and so do revokeFailures 5xx or
// timeouts in a row. A revocation revoked resets the count and the
// doubling. Its methods are safe for concurrent use.
type revocations struct {
	deadline time.Time
	waiting  sync.Mutex // held by the one worker that waits for the hold's end

	mu       sync.Mutex
	until    time.Time // no revocation is sent before
	round    int       // holds begun; a 429 to a revocation sent before the last one began does not change it
	held     int       // holds in a row
	failures int       // 5xx or timeouts in a row
	stopped  string    // why the provider's next revocations are not sent; "" while they are
}

// ready waits (now, sleep) until the next revocation may be sent, and
// returns the round it is sent in, or why it is not sent.
func (r *revocations) ready(ctx context.Context, now func() time.Time, sleep func(context.Context, time.Duration) error) (round int, reason string) {
	r.waiting.Lock()
	defer r.waiting.Unlock()
	for {
		r.mu.Lock()
		until, round, stopped := r.until, r.round, r.stopped
		r.mu.Unlock()
		if stopped != "" {
			return 0, stopped
		}
		d := until.Sub(now())
		if d <= 0 {
			return round, ""
		}
		if sleep(ctx, d) != nil {
			return 0, "not revoked: the shutdown's time ran out while the provider's 429 held its revocations"
		}
	}
}

// answered notes at now the answer of a revocation sent in round (err:
// the last call's error, nil once revoked), and reports whether the
// revocation is to be sent again once the hold is over.
func (r *revocations) answered(err error, round int, now time.Time) (again bool) {
	r.mu.Lock()
	defer r.mu.Unlock()
	wait, limited := adminapi.RateLimited(err)
	switch {
	case limited:
		if round < r.round {
			return r.stopped == "" // sent before the hold began, which its 429 is part of
		}
		r.round++
		r.held++
		if wait <= 0 {
			wait = revoke429Wait << min(r.held-1, 16)
		}
		if r.until = now.Add(wait); !r.until.Before(r.deadline) {
			r.stopped = cmp.Or(r.stopped, fmt.Sprintf("not revoked: the provider answered 429 to a revocation, asking to wait %s, past the shutdown's deadline", wait))
		}
		return r.stopped == ""
	case err == nil:
		r.failures, r.held = 0, 0
	case serverFailed(err):
		if r.failures++; r.failures >= revokeFailures {
			r.stopped = cmp.Or(r.stopped, fmt.Sprintf("not revoked: %d revocations in a row failed (5xx or timeout)", r.failures))
		}
	}
	return false
}

// serverFailed reports whether err, a revocation's, is a 5xx, a timeout
// or a failed connection. Unlike broker.IsTemporary, other 4xx and the
// source's own refusals (a token without an id) do not count.
func serverFailed(err error) bool {
	if ae, ok := errors.AsType[*broker.APIError](err); ok {
		return ae.StatusCode >= http.StatusInternalServerError
	}
	_, ok := errors.AsType[net.Error](err)
	return ok || broker.IsTimeout(err)
}

// source returns the source last seen for the provider ID id (nil: none).
func (p *Broker) source(id string) broker.Source {
	p.mu.Lock()
	defer p.mu.Unlock()
	if sp := p.seen[id]; sp != nil {
		return sp.source
	}
	return nil
}

// seenProvider is what Broker keeps of a provider it was last shown
// (SecretsSeen), and the configs that showed it.
type seenProvider struct {
	secretVersion string
	source        broker.Source
	owners        []*Owner
}

// revoke revokes e's token at its provider (adminapi.RevokeEntry, whose
// last it returns), unless the failure policy keeps a source that can
// revoke from being called, and purges it from the fleet's shared tier
// once revoked: a token not revoked is still served.
func (p *Broker) revoke(ctx context.Context, e *broker.Entry) (adminapi.RevokeResult, error) {
	if _, ok := e.Binding().Source.(broker.Revoker); ok {
		h := p.SourceHealth(e.Binding().SourceID)
		switch {
		case h.Breaker == broker.BreakerOpen:
			return adminapi.NotRevoked(e, "not revoked: the provider's circuit breaker is open after repeated failures"), nil
		case !h.BackoffUntil.IsZero():
			return adminapi.NotRevoked(e, fmt.Sprintf("not revoked: the provider is not called until %s (Retry-After or a refused credential)",
				h.BackoffUntil.UTC().Format(time.RFC3339))), nil
		}
	}
	res, last := adminapi.RevokeEntry(ctx, e, p.source)
	if res.Revoked {
		p.Purge(ctx, []*broker.Entry{e})
	}
	return res, last
}
