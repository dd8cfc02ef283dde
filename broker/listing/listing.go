// Package listing keeps the list of organisations a provider says the
// partner may act for, which restricts the wildcard merchant entry when it
// sets only_listed_organisations. It has no Caddy import: the module keeps
// listings across config reloads, package adminapi serves their admin view
// and package probe their part of the health answer.
package listing

import (
	"context"
	"fmt"
	"sync/atomic"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
)

// OrganisationLister reads the organisations a provider says the partner
// may act for (*nuapay.Source). Safe for concurrent use.
type OrganisationLister interface {
	// EachOrganisation calls visit for each organisation; past limits it
	// fails, and what visit saw must not be used.
	EachOrganisation(ctx context.Context, limits nuapay.ListLimits, visit func(nuapay.Organisation)) error
}

// Listing is the list of organisations a provider says the partner may act
// for (for Nuapay, GET /organisations, every page), read on a schedule
// (Start) and on demand (Refresh). It keeps only the organisation ids,
// within limits over all pages (nuapay.ListLimits). A failed read, one
// past the limits included, keeps the last good list; before the first
// good list every organisation is refused with 503
// (organisations_unavailable). Safe for concurrent use.
type Listing struct {
	provider string                             // the provider's name, for logs and the admin API
	list     atomic.Pointer[OrganisationLister] // what the reads go through (UseLister)
	limits   nuapay.ListLimits
	every    time.Duration
	bound    time.Duration // bounds one read, all its pages (readBound)
	logger   *zap.Logger
	now      func() time.Time                                 // time.Now; tests inject their own
	sleep    func(ctx context.Context, d time.Duration) error // budget.Sleep; tests inject their own

	reads    atomic.Pointer[reads] // nil before the first read ends
	nextRead atomic.Int64          // Unix nanoseconds (l.now) of the schedule's read after a failed one; 0 after a good read
	turn     chan struct{}         // semaphore of one: one read at a time
	stop     context.CancelFunc    // ends the schedule and cancels its read; nil before Start
	done     chan struct{}         // closed when the schedule has ended
}

// reads is what the last reads left, replaced as one by each read: the
// list in force (nil before the first good read) and its Status.
type reads struct {
	orgs   map[string]struct{}
	status Status
}

// New returns the listing of a provider, read every every once started
// (sooner after a failed read: Start), logging its reads to logger.
func New(provider string, list OrganisationLister, limits nuapay.ListLimits, every time.Duration, logger *zap.Logger) *Listing {
	l := &Listing{provider: provider, limits: limits, every: every, bound: readBound(limits), logger: logger,
		now: time.Now, sleep: budget.Sleep, turn: make(chan struct{}, 1)}
	l.list.Store(&list)
	return l
}

// UseLister has the next reads go through list (the provider's source
// in the config loaded last), keeping the list in force and the schedule.
func (l *Listing) UseLister(list OrganisationLister) { l.list.Store(&list) }

// Provider is the name of the listed provider.
func (l *Listing) Provider() string { return l.provider }

// readBound bounds one read of the list within limits, all its pages:
// pageTime for each page the limits allow, at least minReadTime, so that
// a long list read at a provider's pace is not cut short.
func readBound(limits nuapay.ListLimits) time.Duration {
	return max(minReadTime, time.Duration(limits.Pages())*pageTime)
}

// Times of the reads (readBound, Start).
const (
	minReadTime = time.Minute
	pageTime    = time.Second
	firstRetry  = 5 * time.Second // the wait before a failed read is tried again, doubled at each failure in a row
)

// Start reads the list now and then l.every after each good read, each
// read bounded by readBound, until Destruct. A failed read is tried
// again after firstRetry, doubled after each failed read that follows up
// to l.every, or after the provider's Retry-After when that is longer.
func (l *Listing) Start() {
	ctx, stop := context.WithCancel(context.Background())
	l.stop, l.done = stop, make(chan struct{})
	go func() {
		defer close(l.done)
		backoff := min(firstRetry, l.every)
		for {
			readCtx, cancel := context.WithTimeout(ctx, l.bound)
			_, err := l.read(readCtx, ctx)
			cancel()
			wait := l.every
			if err != nil {
				wait = max(backoff, broker.RetryAfterOf(err))
				backoff = min(2*backoff, l.every)
				l.nextRead.Store(l.now().Add(wait).UnixNano())
			} else {
				backoff = min(firstRetry, l.every)
				l.nextRead.Store(0)
			}
			if l.sleep(ctx, wait) != nil {
				return
			}
		}
	}()
}

// Destruct stops the schedule, cancelling its read in flight.
func (l *Listing) Destruct() error {
	if l.stop != nil {
		l.stop()
		<-l.done
	}
	return nil
}

// Refresh reads the list now, bounded by readBound, and returns how
// many organisations it holds; on failure the last good list stays in
// force. While another read runs, it waits for it as long as ctx allows.
func (l *Listing) Refresh(ctx context.Context) (int, error) {
	ctx, cancel := context.WithTimeout(ctx, l.bound)
	defer cancel()
	return l.read(ctx, context.Background())
}

// read reads the list with ctx, as Refresh does. A read that fails once
// schedule is done (Destruct) is neither logged nor kept in the status:
// the listing is being dropped, and its provider did not fail.
func (l *Listing) read(ctx, schedule context.Context) (int, error) {
	select {
	case l.turn <- struct{}{}:
		defer func() { <-l.turn }()
	case <-ctx.Done():
		return 0, fmt.Errorf("waiting for the read in progress of provider %q's organisations: %w", l.provider, ctx.Err())
	}
	m := make(map[string]struct{})
	err := (*l.list.Load()).EachOrganisation(ctx, l.limits, func(o nuapay.Organisation) { m[o.ID] = struct{}{} })
	if err != nil && schedule.Err() != nil {
		return 0, err
	}
	if err != nil {
		var next reads
		if last := l.reads.Load(); last != nil {
			next = *last
		}
		next.status.Err, next.status.FailedAt = err, l.now()
		l.reads.Store(&next)
		kept := "none yet: wildcard merchants are refused with 503"
		if next.orgs != nil {
			kept = fmt.Sprintf("the last good list (%d organisations)", len(next.orgs))
		}
		l.logger.Warn("listing the organisations failed; keeping "+kept, zap.String("provider", l.provider), zap.Error(err))
		return 0, err
	}
	l.reads.Store(&reads{orgs: m, status: Status{Read: true, Organisations: len(m), ReadAt: l.now()}})
	l.logger.Info("organisations listed", zap.String("provider", l.provider), zap.Int("organisations", len(m)))
	return len(m), nil
}

// Status is what a listing knows of its reads.
type Status struct {
	// Read says a good list was read at least once.
	Read bool
	// Organisations is the size of the list in force.
	Organisations int
	// ReadAt is when the list in force was read.
	ReadAt time.Time
	// Err is the last read's error when it failed, else nil.
	Err error
	// FailedAt is when the last read failed, when it did.
	FailedAt time.Time
}

// Status returns what the listing knows of its reads.
func (l *Listing) Status() Status {
	if r := l.reads.Load(); r != nil {
		return r.status
	}
	return Status{}
}

// RetryAfter is how long until the schedule reads the list again after a
// failed read: 0 when the last read did not fail or the next is due.
func (l *Listing) RetryAfter() time.Duration {
	next := l.nextRead.Load()
	if next == 0 {
		return 0
	}
	return max(time.Unix(0, next).Sub(l.now()), 0)
}

// Allows says whether org is listed: a zero code when it is, 403
// unlisted_organisation when not, 503 organisations_unavailable when no
// list was ever read.
func (l *Listing) Allows(org string) errcode.Code {
	r := l.reads.Load()
	if r == nil || r.orgs == nil {
		return errcode.OrganisationsUnavailable
	}
	if _, ok := r.orgs[org]; !ok {
		return errcode.UnlistedOrganisation
	}
	return 0
}

// Interface guard.
var _ OrganisationLister = (*nuapay.Source)(nil)
