package module

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// orgListing is the list of organisations a Nuapay provider says the
// partner may act for (GET /organisations, every page), which restricts
// the wildcard merchant entry when it sets only_listed_organisations. It
// is read on a schedule and on demand from the admin API, keeping only the
// organisation ids, within limits over all pages (the wildcard's
// max_organisations, and bytes in proportion: nuapay.ListLimits). A failed
// read, one past the limits included, keeps the last good list; before
// the first good list every wildcard merchant is refused with 503
// (organisations_unavailable).
//
// Listings live in a caddy.UsagePool keyed by the provider's ID, so that a
// config reload keeps the last good list and its schedule.
type orgListing struct {
	provider string // the provider's name, for logs and the admin API
	list     organisationLister
	limits   nuapay.ListLimits
	every    time.Duration
	logger   *zap.Logger

	orgs    atomic.Pointer[map[string]struct{}]
	good    atomic.Int64                   // unix nanoseconds of the last good read
	failed  atomic.Pointer[listingFailure] // the last read, if it failed
	refresh sync.Mutex                     // one read at a time
	stop    chan struct{}
	done    chan struct{}
}

// listings are the organisation listings shared across reloads.
var listings = caddy.NewUsagePool()

// organisationLister reads a provider's organisations within limits,
// calling visit for each one (nuapay.Source.EachOrganisation).
type organisationLister func(ctx context.Context, limits nuapay.ListLimits, visit func(nuapay.Organisation)) error

func newOrgListing(provider string, list organisationLister, limits nuapay.ListLimits, every time.Duration, logger *zap.Logger) *orgListing {
	return &orgListing{provider: provider, list: list, limits: limits, every: every, logger: logger}
}

// loadListing returns the pooled listing of the registry's wildcard
// entry, starting it if it is new, and the pool key to release; nil when
// the wildcard is not restricted.
func loadListing(reg *config.Registry, logger *zap.Logger) (*orgListing, string, error) {
	if reg == nil || reg.Wildcard == nil || !reg.Wildcard.OnlyListed {
		return nil, "", nil
	}
	p := reg.Providers[reg.Wildcard.Provider]
	np, ok := p.Source.(*nuapay.Source)
	if !ok {
		return nil, "", fmt.Errorf("token_broker: %s: merchant \"*\": field only_listed_organisations: provider %q cannot list its organisations", reg.Path, p.Name)
	}
	key := fmt.Sprintf("organisations %s every=%s max=%d", p.ID, reg.Wildcard.OrganisationsRefresh, reg.Wildcard.MaxOrganisations)
	v, _, err := listings.LoadOrNew(key, func() (caddy.Destructor, error) {
		limits := nuapay.ListLimits{Organisations: reg.Wildcard.MaxOrganisations}
		l := newOrgListing(p.Name, np.EachOrganisation, limits, reg.Wildcard.OrganisationsRefresh, logger)
		l.start()
		return l, nil
	})
	if err != nil {
		return nil, "", err
	}
	return v.(*orgListing), key, nil
}

// start reads the list now and then every l.every, until Destruct.
func (l *orgListing) start() {
	l.stop, l.done = make(chan struct{}), make(chan struct{})
	go func() {
		defer close(l.done)
		t := time.NewTicker(l.every)
		defer t.Stop()
		for {
			ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
			_, _ = l.Refresh(ctx)
			cancel()
			select {
			case <-l.stop:
				return
			case <-t.C:
			}
		}
	}()
}

// Destruct stops the schedule (caddy.Destructor).
func (l *orgListing) Destruct() error {
	if l.stop != nil {
		close(l.stop)
		<-l.done
	}
	return nil
}

// Refresh reads the list now. On failure the last good list stays in
// force and the error is returned (and logged).
func (l *orgListing) Refresh(ctx context.Context) (int, error) {
	l.refresh.Lock()
	defer l.refresh.Unlock()
	m := make(map[string]struct{})
	err := l.list(ctx, l.limits, func(o nuapay.Organisation) { m[o.ID] = struct{}{} })
	if err != nil {
		l.failed.Store(&listingFailure{err: err, at: time.Now()})
		if l.logger != nil {
			kept := "none yet: wildcard merchants are refused with 503"
			if m := l.orgs.Load(); m != nil {
				kept = fmt.Sprintf("the last good list (%d organisations)", len(*m))
			}
			l.logger.Warn("listing the organisations failed; keeping "+kept, zap.String("provider", l.provider), zap.Error(err))
		}
		return 0, err
	}
	l.orgs.Store(&m)
	l.good.Store(time.Now().UnixNano())
	l.failed.Store(nil)
	if l.logger != nil {
		l.logger.Info("organisations listed", zap.String("provider", l.provider), zap.Int("organisations", len(m)))
	}
	return len(m), nil
}

// listingFailure is a failed read of the organisations list.
type listingFailure struct {
	err error
	at  time.Time
}

// allows says whether org is listed: a zero status when it is, 403
// unlisted_organisation when not, 503 organisations_unavailable when no
// list was ever read.
func (l *orgListing) allows(org string) errcode.Code {
	m := l.orgs.Load()
	if m == nil {
		return errcode.OrganisationsUnavailable
	}
	if _, ok := (*m)[org]; !ok {
		return errcode.UnlistedOrganisation
	}
	return 0
}
