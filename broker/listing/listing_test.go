package listing

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// listingStandIn is a Nuapay organisations list (GET /organisations,
// paged) whose pages a test shapes: pages pages of perPage organisations,
// each with a name of pad bytes; the organisation ids are prefix1,
// prefix2…
type listingStandIn struct {
	listingShape
	served atomic.Int64 // pages answered
}

// listingShape is the shape of a stand-in's list.
type listingShape struct {
	pages, perPage, pad int
	prefix              string
}

func (s *listingStandIn) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if !strings.HasSuffix(r.URL.Path, "/organisations") {
		http.NotFound(w, r)
		return
	}
	s.served.Add(1)
	page, _ := strconv.Atoi(r.URL.Query().Get("pagenumber"))
	type org struct {
		ID   string `json:"id"`
		Name string `json:"name"`
	}
	var data []org
	for i := range s.perPage {
		data = append(data, org{ID: fmt.Sprint(s.prefix, (page-1)*s.perPage+i+1), Name: strings.Repeat("x", s.pad)})
	}
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"data": data, "page": map[string]int{"totalPages": s.pages}})
}

// TestOrganisationListingBoundedInTotal: a provider answering page after
// page (150 pages of about 0.95 MB, or many pages of small entries) ends
// the reading at the limits over all pages, not at the last page: the
// error says which limit and what to change, the reading stops there (few
// pages asked for), and the last good list stays in force.
func TestOrganisationListingBoundedInTotal(t *testing.T) {
	for _, tt := range []struct {
		name      string
		hostile   listingShape
		limits    nuapay.ListLimits
		limit     string // the ListTooLargeError's Limit
		maxPages  int64  // pages the hostile reading may ask for
		wantInMsg string
	}{
		{"150 pages of 0.95 MB, fewer organisations than allowed", listingShape{pages: 150, perPage: 100, pad: 9500, prefix: "HOSTILE"},
			nuapay.ListLimits{Organisations: 20_000}, "bytes", 22, "raise max_organisations"},
		{"150 pages of 0.95 MB, a small max_organisations", listingShape{pages: 150, perPage: 100, pad: 9500, prefix: "HOSTILE"},
			nuapay.ListLimits{Organisations: 1000}, "bytes", 2, "raise max_organisations"},
		{"many small pages, organisations", listingShape{pages: 10_000, perPage: 100, pad: 10, prefix: "HOSTILE"},
			nuapay.ListLimits{Organisations: 2500}, "organisations", 26, "more than 2500 organisations"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			stand := &listingStandIn{listingShape: listingShape{pages: 3, perPage: 2, pad: 10, prefix: "ORG"}} // ORG1..ORG6
			var current atomic.Pointer[listingStandIn]
			current.Store(stand)
			ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { current.Load().ServeHTTP(w, r) }))
			t.Cleanup(ts.Close)
			src, err := nuapay.New(nuapay.Config{BaseURL: ts.URL, APIKey: broker.Secret("partner-key")})
			if err != nil {
				t.Fatal(err)
			}
			l := New("nuapay", src, tt.limits, time.Hour, zap.NewNop())
			ctx := context.Background()
			if n, err := l.Refresh(ctx); err != nil || n != 6 {
				t.Fatalf("good list: %d, %v; want 6 organisations", n, err)
			}

			hostile := &listingStandIn{listingShape: tt.hostile}
			current.Store(hostile)
			n, err := l.Refresh(ctx)
			var tooLarge *nuapay.ListTooLargeError
			if !errors.As(err, &tooLarge) || tooLarge.Limit != tt.limit || !strings.Contains(err.Error(), tt.wantInMsg) {
				t.Fatalf("hostile list: %d, %v; want a ListTooLargeError on %s saying %q", n, err, tt.limit, tt.wantInMsg)
			}
			if got := hostile.served.Load(); got > tt.maxPages {
				t.Errorf("the hostile reading asked for %d pages, want at most %d", got, tt.maxPages)
			}
			for _, tc := range []struct {
				org    string
				status int
			}{{"ORG1", 0}, {"ORG6", 0}, {"HOSTILE1", http.StatusForbidden}} {
				if code := l.Allows(tc.org); code.Status() != tc.status {
					t.Errorf("%s after the hostile list: %d %s, want %d (the last good list)", tc.org, code.Status(), code, tc.status)
				}
			}
		})
	}
}

// TestListingFailedReadRetriedSooner: a failed read of the list is tried
// again after a backoff that starts at firstRetry and doubles up to the
// refresh interval, or after the provider's Retry-After when that is
// longer, not only a refresh interval later: wildcard merchants are not
// refused for a whole interval because the provider was down when the
// listing started. A good read brings back the refresh interval, and the
// backoff to its start.
func TestListingFailedReadRetriedSooner(t *testing.T) {
	type answer struct {
		status     int
		retryAfter string
	}
	steps := []struct {
		answer answer
		wait   time.Duration // before the next read
	}{
		{answer{http.StatusServiceUnavailable, ""}, 5 * time.Second},
		{answer{http.StatusInternalServerError, ""}, 10 * time.Second},
		{answer{http.StatusServiceUnavailable, "45"}, 45 * time.Second}, // longer than the backoff's 20 s
		{answer{http.StatusServiceUnavailable, ""}, 40 * time.Second},
		{answer{http.StatusTooManyRequests, ""}, time.Minute},           // 80 s, cut to the interval
		{answer{http.StatusServiceUnavailable, "120"}, 2 * time.Minute}, // the provider's wait, past the interval
		{answer{http.StatusOK, ""}, time.Minute},
		{answer{http.StatusServiceUnavailable, ""}, 5 * time.Second},
	}
	var current atomic.Pointer[answer]
	current.Store(&steps[0].answer)
	good := &listingStandIn{listingShape: listingShape{pages: 1, perPage: 2, pad: 1, prefix: "ORG"}}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		a := current.Load()
		if a.status == http.StatusOK {
			good.ServeHTTP(w, r)
			return
		}
		if a.retryAfter != "" {
			w.Header().Set("Retry-After", a.retryAfter)
		}
		w.WriteHeader(a.status)
	}))
	t.Cleanup(ts.Close)
	src, err := nuapay.New(nuapay.Config{BaseURL: ts.URL, APIKey: broker.Secret("partner-key")})
	if err != nil {
		t.Fatal(err)
	}
	l := New("nuapay", src, nuapay.ListLimits{Organisations: 10}, time.Minute, zap.NewNop())
	waits, wake := steppedClock(l)
	l.Start()
	t.Cleanup(func() { _ = l.Destruct() })
	for i, step := range steps {
		got := nextWait(t, waits)
		if got != step.wait {
			t.Fatalf("step %d (%d %q): the next read in %s, want %s", i, step.answer.status, step.answer.retryAfter, got, step.wait)
		}
		want := errcode.OrganisationsUnavailable
		if i >= 6 { // the good list, kept after a failed read
			want = 0
		}
		if code := l.Allows("ORG1"); code != want {
			t.Fatalf("step %d: ORG1 %s, want %s", i, code, want)
		}
		wantRetry := step.wait
		if step.answer.status == http.StatusOK {
			wantRetry = 0
		}
		if ra := l.RetryAfter(); ra != wantRetry {
			t.Fatalf("step %d: RetryAfter %s, want %s", i, ra, wantRetry)
		}
		if i+1 < len(steps) {
			current.Store(&steps[i+1].answer)
		}
		wake <- struct{}{}
	}
}

// steppedClock gives l a clock that a test moves: each wait of l's
// schedule is sent on waits, and ends, moving the clock by the wait, when
// the test sends on wake (or when the schedule ends).
func steppedClock(l *Listing) (waits <-chan time.Duration, wake chan<- struct{}) {
	w, k := make(chan time.Duration), make(chan struct{})
	clock := clocktest.New(time.Unix(1_700_000_000, 0))
	l.now = clock.Now
	l.sleep = func(ctx context.Context, d time.Duration) error {
		select {
		case w <- d:
		case <-ctx.Done():
			return ctx.Err()
		}
		select {
		case <-k:
			clock.Add(d)
			return nil
		case <-ctx.Done():
			return ctx.Err()
		}
	}
	return w, k
}

// nextWait returns the next wait of a schedule given a steppedClock.
func nextWait(t *testing.T, waits <-chan time.Duration) time.Duration {
	t.Helper()
	select {
	case d := <-waits:
		return d
	case <-time.After(10 * time.Second):
		t.Fatal("the schedule waits for no next read")
		return 0
	}
}

// TestListingDestructStopsARead: Destruct (a config reload that drops the
// listing) does not wait for a read the provider is slow to answer: the
// read is cancelled, and its cancellation is neither logged as a failed
// read nor kept as the listing's status.
func TestListingDestructStopsARead(t *testing.T) {
	l, logs, cancelled := unansweredListing(t)
	destructed := make(chan struct{})
	go func() {
		_ = l.Destruct()
		close(destructed)
	}()
	select {
	case <-destructed:
	case <-time.After(10 * time.Second):
		t.Fatal("Destruct waits for the read in flight")
	}
	<-cancelled
	for _, e := range logs.All() {
		t.Errorf("logged %q after Destruct cancelled the read", e.Message)
	}
	if st := l.Status(); st.Err != nil || !st.FailedAt.IsZero() {
		t.Errorf("status after Destruct cancelled the read: %+v, want no failed read", st)
	}
}

// TestListingRefreshWaitEndsWithItsRequest: while the scheduled read
// waits for a provider that does not answer, a Refresh (the admin API's
// POST) gives up when its own context ends, not when that read does, and
// its giving up is not logged as a failed read of the provider.
func TestListingRefreshWaitEndsWithItsRequest(t *testing.T) {
	l, logs, _ := unansweredListing(t)
	t.Cleanup(func() { _ = l.Destruct() })
	ctx, cancel := context.WithTimeout(context.Background(), 50*time.Millisecond)
	defer cancel()
	done := make(chan error, 1)
	go func() {
		_, err := l.Refresh(ctx)
		done <- err
	}()
	select {
	case err := <-done:
		if !errors.Is(err, context.DeadlineExceeded) {
			t.Errorf("Refresh: %v, want its context's deadline", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("Refresh waits for the scheduled read past its own context's end")
	}
	for _, e := range logs.All() {
		t.Errorf("logged %q for a Refresh that gave up waiting", e.Message)
	}
}

// unansweredListing starts the listing of a provider that answers no
// read until the read is cancelled (then cancelled is closed) or the test
// ends, and returns it once its first read reached the provider, with
// its warnings' log.
func unansweredListing(t *testing.T) (l *Listing, logs *observer.ObservedLogs, cancelled <-chan struct{}) {
	t.Helper()
	arrived, release, gone := make(chan struct{}), make(chan struct{}), make(chan struct{})
	var arrivedOnce, goneOnce sync.Once
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		arrivedOnce.Do(func() { close(arrived) })
		select {
		case <-r.Context().Done():
			goneOnce.Do(func() { close(gone) })
		case <-release:
		}
	}))
	t.Cleanup(func() {
		close(release)
		ts.Close()
	})
	src, err := nuapay.New(nuapay.Config{BaseURL: ts.URL, APIKey: broker.Secret("partner-key"), Client: &http.Client{}})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.WarnLevel)
	l = New("nuapay", src, nuapay.ListLimits{Organisations: 10}, time.Hour, zap.New(core))
	l.Start()
	<-arrived
	return l, logs, gone
}

// deadlineLister records the deadline of the context each read gets.
type deadlineLister struct{ deadline chan time.Duration }

func (d deadlineLister) EachOrganisation(ctx context.Context, _ nuapay.ListLimits, visit func(nuapay.Organisation)) error {
	dl, _ := ctx.Deadline()
	d.deadline <- time.Until(dl)
	visit(nuapay.Organisation{ID: "o1"})
	return nil
}

// TestListingReadBoundGrowsWithTheList: a read of the organisations list
// may take a second per page the limits allow (at the smallest page size
// Gatekeeper serves), at least a minute, so that a long list read at a
// real provider's pace, page after page, is not cut before its end.
func TestListingReadBoundGrowsWithTheList(t *testing.T) {
	for _, tc := range []struct {
		limits nuapay.ListLimits
		want   time.Duration
	}{
		{nuapay.ListLimits{Organisations: 10}, time.Minute},
		{nuapay.ListLimits{Organisations: 1000}, time.Minute},
		{nuapay.ListLimits{Organisations: 20_000}, 1002 * time.Second}, // 1 000 pages of 20, the first again, an empty last
		{nuapay.ListLimits{}, 5002 * time.Second},                      // the default 100 000: about 83 minutes
	} {
		t.Run(fmt.Sprint(tc.limits.Organisations), func(t *testing.T) {
			src := deadlineLister{deadline: make(chan time.Duration, 1)}
			l := New("nuapay", src, tc.limits, time.Hour, zap.NewNop())
			if _, err := l.Refresh(context.Background()); err != nil {
				t.Fatal(err)
			}
			// The deadline was read an instant after it was set: allow a
			// few seconds of a loaded machine.
			if got := <-src.deadline; got > tc.want || got < tc.want-5*time.Second {
				t.Fatalf("a read within %+v is bounded to %s, want %s", tc.limits, got, tc.want)
			}
		})
	}
}

// orgsLister lists fixed organisations, or fails with err.
type orgsLister struct {
	ids []string
	err error
}

func (o orgsLister) EachOrganisation(_ context.Context, _ nuapay.ListLimits, visit func(nuapay.Organisation)) error {
	if o.err != nil {
		return o.err
	}
	for _, id := range o.ids {
		visit(nuapay.Organisation{ID: id})
	}
	return nil
}

// TestListingUseLister: a listing given the lister of a newer config
// (UseLister, a reload that rotated the key) keeps the list in force until
// a read with the new lister replaces it, and keeps it when that read
// fails.
func TestListingUseLister(t *testing.T) {
	l := New("nuapay", orgsLister{ids: []string{"org-old"}}, nuapay.ListLimits{}, time.Hour, zap.NewNop())
	if _, err := l.Refresh(context.Background()); err != nil {
		t.Fatal(err)
	}
	steps := []struct {
		name      string
		lister    OrganisationLister // nil: none given
		read      bool
		allowed   []string
		refused   []string
		wantReadE bool
	}{
		{"new lister, before its read", orgsLister{ids: []string{"org-new"}}, false, []string{"org-old"}, []string{"org-new"}, false},
		{"after its read", nil, true, []string{"org-new"}, []string{"org-old"}, false},
		{"a failing lister", orgsLister{err: errors.New("401")}, true, []string{"org-new"}, nil, true},
	}
	for _, st := range steps {
		if st.lister != nil {
			l.UseLister(st.lister)
		}
		if st.read {
			if _, err := l.Refresh(context.Background()); (err != nil) != st.wantReadE {
				t.Fatalf("%s: read error %v, want one %t", st.name, err, st.wantReadE)
			}
		}
		for _, id := range st.allowed {
			if c := l.Allows(id); c != 0 {
				t.Errorf("%s: %s refused (%s), want it allowed", st.name, id, c)
			}
		}
		for _, id := range st.refused {
			if c := l.Allows(id); c == 0 {
				t.Errorf("%s: %s allowed, want it refused", st.name, id)
			}
		}
	}
}
