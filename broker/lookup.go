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
// once and one background refresh is started (unless the key's last
// refresh failed and its backoff has not ended, or its budget refused it
// less than a second ago). Without a usable cached token, Get
// waits for the one fetch in flight for the binding's key (starting it if
// needed) or for ctx to end, whichever comes first; a caller giving up does
// not cancel the fetch for the others.
//
// A hit takes no lock, reads no shared map and allocates nothing.
func (br *Broker) Get(ctx context.Context, b *Binding) (*Entry, Result, error) {
	now := br.opts.Now()
	// The binding remembers the entry it was last served: on the hot path
	// no shared map is read and no lock is taken. An entry replaced by a
	// newer token or purged is marked stale, and the cache is asked again.
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
		// Its budget deferred its refresh and no lookup came before it
		// could no longer be served: the refresh is behind.
		br.refreshBehind(b, e)
	}
	// A lookup can join a fetch that started earlier (a background
	// refresh, say); its token is checked again like a cached one, and if
	// it is no longer usable the lookup waits for one more fetch.
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

// await waits for the fetch of b's key in flight, or for one it starts
// (forced by force when not nil), until the fetch ends or ctx does; the
// caller counts itself as waiting for it (waitFor). A fetch joined that
// ended by a rule of the request that started it is not an answer
// (notAnswer): await asks once more. Its error, when ctx ended first,
// names what was awaited; the fetch's outcome is then not read.
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

// refresh starts the background refresh of e. It goes through the same
// singleflight and the same policy as a foreground fetch.
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
// another request started, ended by a rule of that request, not of the
// caller waiting for it on ctx since start: the fetch gave up its wait for
// budget, as its lookups had left (context.Canceled); or its budget
// refused it as a refresh-ahead, which never waits (budget.Background),
// where a caller waits its turn; or refused a caller's turn that this
// caller's own wait (budgetBy) reaches, which the deadline of the request
// that started the fetch cut short.
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
