package broker

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/budget"
)

// Get returns the cache entry holding a valid token for the binding and how
// it was served. A cached token past its planned refresh is returned at
// once and one background refresh is started, unless the policy defers it.
// Without a usable cached token, Get waits for the fetch of the binding's
// key (starting it if needed) or for ctx to end; a caller giving up does
// not cancel the fetch for the others. A hit takes no lock, reads no
// shared map and allocates nothing.
func (br *Broker) Get(ctx context.Context, b *Binding) (*Entry, Result, error) {
	now := br.opts.Now()
	// The entry the binding was last served, unless stale: else the cache.
	e := b.current.Load()
	last := e
	if e == nil || e.stale.Load() || !e.validAt(now, br.opts.Leeway) {
		e = nil
		if v, ok := br.cache.Get(b.key); ok {
			e = v.(*Entry)
			e.servedTo(b)
			b.current.Store(e)
		}
	}
	if e != nil && e.validAt(now, br.opts.Leeway) {
		r := Hit
		if !now.Before(e.RefreshAt()) && e.refreshing.CompareAndSwap(false, true) {
			if br.pol.refreshDue(b, now) {
				r = RefreshAhead
				br.refresh(ctx, b, e)
			} else {
				e.refreshing.Store(false)
			}
		}
		br.observe(b, r)
		return e, r, nil
	}
	if e == nil {
		e = last
	}
	if e != nil && e.deferred.Load() && !e.stale.Load() {
		// Its budget deferred its refresh until too late.
		br.refreshBehind(b, e)
	}
	// A token from a joined fetch is checked like a cached one; when no
	// longer usable, the lookup waits for one more fetch.
	defer br.waitFor(b.key)()
	for attempt := 0; ; attempt++ {
		got, err := br.await(ctx, b, nil, "a token")
		if err == nil {
			err = got.err
		}
		if err != nil {
			return nil, Miss, err
		}
		e := got.entry
		if !e.validAt(br.opts.Now(), br.opts.Leeway) {
			if got.joined && attempt == 0 {
				continue
			}
			return nil, Miss, fmt.Errorf("merchant %q: %w", b.Merchant, ErrExpiredToken)
		}
		r := Miss
		switch {
		case got.joined:
			e.servedTo(b)
			r = Shared
		case got.cached:
			r = Hit
		case e.adopted:
			r = Adopted
		}
		br.observe(b, r)
		return e, r, nil
	}
}

// awaited is the outcome of a fetch that a lookup or a check waited for.
type awaited struct {
	entry  *Entry // nil when err is set
	err    error
	joined bool // the fetch was in flight: another caller started it
	// cached: this caller's fetch found a token cached by a fetch that
	// ended after the caller's own cache lookup, and fetched nothing.
	cached bool
}

// await waits for the fetch of b's key in flight, or one it starts (forced
// when force is not nil), until the fetch or ctx ends. A joined fetch that
// ended by a rule of the request that started it (notAnswer) is asked
// once more. When ctx ends first, the error names what was awaited.
func (br *Broker) await(ctx context.Context, b *Binding, force *forced, what string) (awaited, error) {
	start := br.opts.Now()
	for attempt := 0; ; attempt++ {
		// Set by this call's own fetch only, read after the channel.
		started, cached := false, false
		ch := br.group.DoChan(b.key, func() (any, error) {
			started = true
			if force == nil {
				if e := br.cachedFresh(b, nil); e != nil {
					cached = true
					return e, nil
				}
			}
			return br.fetch(ctx, b, nil, force)
		})
		select {
		case res := <-ch:
			if !started && attempt == 0 && ctx.Err() == nil && br.notAnswer(ctx, b, start, res.Err) {
				continue
			}
			e, _ := res.Val.(*Entry)
			return awaited{entry: e, err: res.Err, joined: !started, cached: cached}, nil
		case <-ctx.Done():
			return awaited{}, fmt.Errorf("merchant %q: waiting for %s: %w", b.Merchant, what, context.Cause(ctx))
		}
	}
}

// refresh starts the background refresh of e.
func (br *Broker) refresh(ctx context.Context, b *Binding, e *Entry) {
	go func() {
		defer e.refreshing.Store(false)
		br.group.Do(b.key, func() (any, error) {
			if fresh := br.cachedFresh(b, e); fresh != nil {
				return fresh, nil
			}
			return br.fetch(ctx, b, e, nil)
		})
	}()
}

func (br *Broker) observe(b *Binding, r Result) {
	if b.Observer != nil {
		b.Observer.Lookup(b, r)
	}
}

// notAnswer reports whether err, the outcome of a fetch of b's key that
// another request started, ended by a rule of that request rather than of
// the caller waiting on ctx since start: a canceled wait for budget, a
// refresh-ahead's refusal, or a refused turn within this caller's own
// wait (budgetBy).
func (br *Broker) notAnswer(ctx context.Context, b *Binding, start time.Time, err error) bool {
	if errors.Is(err, context.Canceled) {
		return true
	}
	var ex *budget.ExhaustedError
	if !refusedByBudgetOnly(err) || !errors.As(err, &ex) {
		return false
	}
	return ex.Priority == budget.Background || !br.opts.Now().Add(ex.RetryAfter).After(br.budgetBy(ctx, b, start))
}
