package oauth

import (
	"context"
	"errors"
	"fmt"
	"net/url"
	"runtime"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// TestReturnURLAllowList: return URLs as a browser (WHATWG URL parsing)
// and the app's server resolve them; a hostile one that would leave the
// allowed path in either is refused.
func TestReturnURLAllowList(t *testing.T) {
	allow := []string{"https://app.partner.example/app/consent/", "https://app.partner.example/exact"}
	rows := []struct {
		name, u string
		ok      bool
	}{
		{"under the allowed path", "https://app.partner.example/app/consent/done", true},
		{"with a query", "https://app.partner.example/app/consent/done?x=1&y=%2F", true},
		{"a query with the outcome", "https://app.partner.example/app/consent/done?outcome=ok", false},
		{"a query with the merchant", "https://app.partner.example/app/consent/done?x=1&merchant=globex", false},
		{"a query with the error", "https://app.partner.example/app/consent/done?error=", false},
		{"a query with the outcome encoded", "https://app.partner.example/app/consent/done?%6Futcome=ok", false},
		{"a query with semicolons", "https://app.partner.example/app/consent/done?x=1;outcome=ok", false},
		{"the allowed path itself", "https://app.partner.example/app/consent/", true},
		{"an exact entry", "https://app.partner.example/exact", true},
		{"upper-case scheme and host", "HTTPS://APP.partner.example/app/consent/done", true},
		{"the host without path", "https://app.partner.example", false},
		{"backslash dot dot", `https://app.partner.example/app/consent/..\x`, false},
		{"backslash dot dot slash", `https://app.partner.example/app/consent/..\..\admin`, false},
		{"dot dot semicolon", "https://app.partner.example/app/consent/..;/x", false},
		{"semicolon parameter", "https://app.partner.example/app/consent/x;jsessionid=1", false},
		{"encoded semicolon", "https://app.partner.example/app/consent/..%3b/x", false},
		{"dot dot", "https://app.partner.example/app/consent/../x", false},
		{"single dot", "https://app.partner.example/app/consent/./x", false},
		{"encoded dot dot", "https://app.partner.example/app/consent/%2e%2e/x", false},
		{"encoded dot dot, upper case", "https://app.partner.example/app/consent/%2E%2E/x", false},
		{"mixed dot dot", "https://app.partner.example/app/consent/.%2E/x", false},
		{"encoded single dot", "https://app.partner.example/app/consent/%2e/x", false},
		{"encoded backslash", "https://app.partner.example/app/consent/..%5cx", false},
		{"encoded slash", "https://app.partner.example/app/consent/..%2fx", false},
		{"encoded slash, upper case", "https://app.partner.example/app/consent/..%2Fx", false},
		{"double-encoded dot dot", "https://app.partner.example/app/consent/%252e%252e/x", true}, // a literal "%2e%2e" segment to both
		{"tab inside the dots", "https://app.partner.example/app/consent/.\t./x", false},
		{"newline inside the dots", "https://app.partner.example/app/consent/.\n./x", false},
		{"carriage return", "https://app.partner.example/app/consent/.\r./x", false},
		{"leading space", " https://app.partner.example/app/consent/x", false},
		{"encoded NUL", "https://app.partner.example/app/consent/x%00", false},
		{"backslash in the authority", `https://app.partner.example\@evil.example/app/consent/`, false},
		{"user info", "https://evil@app.partner.example/app/consent/x", false},
		{"fragment", "https://app.partner.example/app/consent/x#y", false},
		{"empty fragment", "https://app.partner.example/app/consent/x#", false},
		{"another host", "https://evil.example/app/consent/x", false},
		{"a host that ends like it", "https://app.partner.example.evil.example/app/consent/x", false},
		{"another scheme", "http://app.partner.example/app/consent/x", false},
		{"javascript", "javascript:alert(1)//app.partner.example/app/consent/", false},
		{"no slashes after the scheme", "https:app.partner.example/app/consent/x", false},
		{"protocol-relative", "//app.partner.example/app/consent/x", false},
		{"triple slash", "https:///app.partner.example/app/consent/x", false},
		{"explicit default port", "https://app.partner.example:443/app/consent/x", false},
		{"another port", "https://app.partner.example:8443/app/consent/x", false},
		{"outside the path", "https://app.partner.example/app/consentx", false},
		{"under an exact entry", "https://app.partner.example/exact/x", false},
		{"too long", "https://app.partner.example/app/consent/" + strings.Repeat("a", MaxReturnURLLength), false},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			err := checkReturnURL(allow, tc.u)
			if (err == nil) != tc.ok {
				t.Errorf("checkReturnURL(%.120q) = %v, want allowed %v", tc.u, err, tc.ok)
			}
		})
	}
}

// newLimitFlow is a consent flow on an in-memory store with the clock
// clock, without discovery (links only).
func newLimitFlow(t *testing.T, clock *clocktest.Clock, limits LinkLimits) (*AuthCode, *MemoryPendingStore) {
	t.Helper()
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: "https://bank.example/token", ClientID: "c", ClientSecret: "s", Now: clock.Now}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	store := &MemoryPendingStore{Now: clock.Now}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, ReturnURLs: []string{"https://app.partner.example/consent/"},
		AuthorizationURL: "https://bank.example/authorize", Scopes: []string{"offline_access"}, Limits: limits}, &Pendings{Store: store, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return flow, store
}

// TestLinkLimits: the pending links of a merchant, the links per merchant
// and per provider per minute are bounded; a refusal says when to ask
// again, and a used or expired link frees its place.
func TestLinkLimits(t *testing.T) {
	ctx := context.Background()
	type step struct {
		merchant string
		advance  time.Duration
		use      bool   // open the link just made
		reason   string // "" for a link
		retry    time.Duration
	}
	rows := []struct {
		name   string
		limits LinkLimits
		steps  []step
	}{
		{"pending links per merchant", LinkLimits{MaxPending: 2, MerchantPerMinute: 100, PerMinute: 100}, []step{
			{merchant: "acme"}, {merchant: "acme", advance: time.Minute},
			{merchant: "acme", reason: ReasonTooManyLinks, retry: DefaultLinkTTL - time.Minute},
			{merchant: "globex"}, // another merchant is not limited
			{merchant: "acme", advance: DefaultLinkTTL - time.Minute}, // the first expired
			{merchant: "acme", reason: ReasonTooManyLinks, retry: time.Minute},
		}},
		{"a used link frees its place", LinkLimits{MaxPending: 1, MerchantPerMinute: 100, PerMinute: 100}, []step{
			{merchant: "acme", use: true}, {merchant: "acme"}, {merchant: "acme", reason: ReasonTooManyLinks, retry: DefaultLinkTTL},
		}},
		{"links per merchant per minute", LinkLimits{MaxPending: 100, MerchantPerMinute: 2, PerMinute: 100}, []step{
			{merchant: "acme", use: true}, {merchant: "acme", use: true},
			{merchant: "acme", reason: ReasonLinkRate, retry: 30 * time.Second},
			{merchant: "globex"},
			{merchant: "acme", advance: 30 * time.Second},
		}},
		{"links per minute for the provider", LinkLimits{MaxPending: 100, MerchantPerMinute: 100, PerMinute: 3}, []step{
			{merchant: "a"}, {merchant: "b"}, {merchant: "c"},
			{merchant: "d", reason: ReasonLinkRate, retry: 20 * time.Second},
			{merchant: "d", advance: 20 * time.Second},
			{merchant: "e", reason: ReasonLinkRate, retry: 20 * time.Second},
		}},
		{"defaults", LinkLimits{}, []step{
			{merchant: "acme", use: true}, {merchant: "acme", use: true}, {merchant: "acme", use: true}, {merchant: "acme", use: true}, {merchant: "acme", use: true},
			{merchant: "acme", reason: ReasonLinkRate, retry: 12 * time.Second},
		}},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			clock := newClock()
			flow, _ := newLimitFlow(t, clock, tc.limits)
			for i, s := range tc.steps {
				clock.Add(s.advance)
				link, err := flow.NewLink(ctx, s.merchant, "", "")
				if s.reason == "" {
					if err != nil {
						t.Fatalf("step %d (%s): %v", i, s.merchant, err)
					}
					if s.use {
						u, _ := url.Parse(link.URL)
						if _, _, err := flow.Start(ctx, u.Query().Get("link"), u.Host); err != nil {
							t.Fatalf("step %d: Start: %v", i, err)
						}
					}
					continue
				}
				var ce *ConsentError
				var le *LinkLimitError
				if !errors.As(err, &ce) || ce.Reason != s.reason || !errors.As(err, &le) {
					t.Fatalf("step %d (%s): err = %v, want %s", i, s.merchant, err, s.reason)
				}
				if le.RetryAfter != s.retry {
					t.Errorf("step %d: retry after %s, want %s", i, le.RetryAfter, s.retry)
				}
			}
		})
	}
}

// TestLinkStartsBounded: without a shared count (a Store that is not a
// StartCounter), one link is started at most MaxStartsPerLink times at an
// instance; a start beyond is refused with too_many_starts, says it was
// counted at this instance and stores no state; the count goes when the
// link's record does.
func TestLinkStartsBounded(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	flow, store := newLimitFlow(t, clock, LinkLimits{})
	id := newLinkID(t, flow, "acme")
	for i := range MaxStartsPerLink {
		if _, _, err := flow.Start(ctx, id, "cb.partner.example"); err != nil {
			t.Fatalf("start %d: %v", i+1, err)
		}
	}
	before := stored(store)
	_, _, err := flow.Start(ctx, id, "cb.partner.example")
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonTooManyStarts || ce.Merchant != "acme" || !strings.Contains(err.Error(), "times at this instance,") {
		t.Fatalf("start %d = %v, want too_many_starts at this instance", MaxStartsPerLink+1, err)
	}
	checkNoSecrets(t, err, id)
	if n := stored(store); n != before {
		t.Errorf("%d records stored after the refused start, %d before", n, before)
	}
	kept := func() bool {
		flow.starts.local.mu.Lock()
		defer flow.starts.local.mu.Unlock()
		_, ok := flow.starts.local.m[flow.pend.storeKey(kindLink, id)]
		return ok
	}
	rows := []struct {
		name    string
		advance time.Duration
		kept    bool
	}{
		{"the link expired, its record kept", DefaultLinkTTL, true},
		{"its record dropped", linkKept, false},
	}
	for i, row := range rows {
		clock.Add(row.advance)
		// The next use of the count drops what has expired.
		flow.starts.local.count(fmt.Sprint("another link ", i), clock.Now().Add(time.Hour))
		if got := kept(); got != row.kept {
			t.Errorf("%s: the link's start count kept %v, want %v", row.name, got, row.kept)
		}
	}
}

// TestMemoryPendingStoreDropsExpired: expired values go at the next use
// after PendingSweepInterval; unexpired ones stay.
func TestMemoryPendingStoreDropsExpired(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	s := &MemoryPendingStore{Now: clock.Now}
	for i := range 100 {
		ttl := time.Minute
		if i%2 == 0 {
			ttl = time.Hour
		}
		if err := s.Put(ctx, fmt.Sprint(i), []byte("v"), clock.Now().Add(ttl)); err != nil {
			t.Fatal(err)
		}
	}
	clock.Add(2 * time.Minute)
	if _, err := s.Get(ctx, "0"); err != nil {
		t.Fatal(err)
	}
	if n := stored(s); n != 50 {
		t.Errorf("%d values after the short ones expired, want 50", n)
	}
	clock.Add(time.Hour)
	if _, err := s.Get(ctx, "0"); !errors.Is(err, ErrUnknownPending) {
		t.Fatalf("Get of a value swept = %v, want ErrUnknownPending", err)
	}
	if n := stored(s); n != 0 {
		t.Errorf("%d values after all expired, want 0", n)
	}
}

// heapInUse is the live heap after a full collection.
func heapInUse() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// TestConsentLinkFloodHeapBound: 20 000 consent links with 1 KiB return
// URLs (limits raised so that every one is stored) take memory until they
// expire; once they are gone from the store (StateTTL after their
// expiry) the store and the limiter drop them and the heap is
// back within a fixed bound.
func TestConsentLinkFloodHeapBound(t *testing.T) {
	const links, merchants = 20_000, 200
	const bound = 4 << 20
	ctx := context.Background()
	clock := newClock()
	flow, store := newLimitFlow(t, clock, LinkLimits{MaxPending: links, MerchantPerMinute: links, PerMinute: links})
	ret := "https://app.partner.example/consent/" + strings.Repeat("r", 1024)
	base := heapInUse()
	for i := range links {
		if _, err := flow.NewLink(ctx, fmt.Sprintf("merchant-%d", i%merchants), ret, ""); err != nil {
			t.Fatalf("link %d: %v", i, err)
		}
	}
	if grown := int64(heapInUse()) - int64(base); grown < bound {
		t.Fatalf("the heap grew by %d bytes with %d links pending: the measure cannot tell", grown, links)
	}
	// A link is kept StateTTL past its expiry, for the states started
	// from it (AuthCode.Callback consumes it).
	clock.Add(DefaultLinkTTL + StateTTL + PendingSweepInterval)
	if _, err := flow.NewLink(ctx, "merchant-0", "", ""); err != nil { // the next use sweeps
		t.Fatal(err)
	}
	if n := stored(store); n != 1 {
		t.Errorf("%d links stored after expiry, want 1", n)
	}
	if n := heldMerchants(flow.limits); n != 1 {
		t.Errorf("the limiter holds %d merchants after expiry, want 1", n)
	}
	if grown := int64(heapInUse()) - int64(base); grown > bound {
		t.Errorf("the heap is %d bytes above its start after expiry, bound %d", grown, bound)
	}
	runtime.KeepAlive(flow)
}

// TestCallbackRefusesAnotherBrowser: a state started in one browser (the
// attacker's) and completed by another (the victim's, another cookie) is
// refused with wrong_browser, stores no refresh token and is not used up:
// the browser that started it can still complete it. A callback without
// the browser secret is refused too.
func TestCallbackRefusesAnotherBrowser(t *testing.T) {
	ctx := context.Background()
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
	attacker, victim := NewBrowser(), NewBrowser()
	link, err := f.flow.NewLink(ctx, "acme", "https://app.partner.example/consent/done", "")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	authURL, _, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host, attacker)
	if err != nil {
		t.Fatal(err)
	}
	q := approve(t, f.op, authURL)
	for _, b := range []struct {
		name    string
		browser []StepOption
	}{{"another browser", []StepOption{victim}}, {"no cookie", []StepOption{Browser("")}}, {"no browser secret", nil}} {
		res, err := f.flow.Callback(ctx, u.Host, q, b.browser...)
		var ce *ConsentError
		if !errors.As(err, &ce) || ce.Reason != ReasonWrongBrowser {
			t.Fatalf("%s: err = %v, want %s", b.name, err, ReasonWrongBrowser)
		}
		if res != (Result{}) {
			t.Errorf("%s: result %+v, want none (no redirect to the app)", b.name, res)
		}
		if f.store.Saves() != 0 {
			t.Fatalf("%s: a refresh token was stored", b.name)
		}
		if n := f.op.Count("authorization_code"); n != 0 {
			t.Fatalf("%s: the code was exchanged", b.name)
		}
	}
	res, err := f.flow.Callback(ctx, u.Host, q, attacker)
	if err != nil || res.Merchant != "acme" || f.store.Saves() != 1 {
		t.Fatalf("the starting browser: %+v, %v", res, err)
	}
}

// TestExpiredStateOfAnotherBrowserStays: an expired authorization state
// presented by a browser other than the one that started it is refused as
// another browser's, without a Result (neither the merchant nor the
// return URL), and left for the starting browser, which is told it has
// expired and sent back to the app.
func TestExpiredStateOfAnotherBrowserStays(t *testing.T) {
	ctx := context.Background()
	f := newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)
	starter, other := NewBrowser(), NewBrowser()
	link, err := f.flow.NewLink(ctx, "acme", "https://app.partner.example/consent/done", "")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	authURL, _, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host, starter)
	if err != nil {
		t.Fatal(err)
	}
	au, _ := url.Parse(authURL)
	q := url.Values{"state": {au.Query().Get("state")}, "code": {"code-never-exchanged"}}
	f.clock.Add(StateTTL)
	for _, b := range []struct {
		name    string
		browser []StepOption
	}{{"another browser", []StepOption{other}}, {"no cookie", []StepOption{Browser("")}}, {"no browser secret", nil}} {
		res, err := f.flow.Callback(ctx, u.Host, q, b.browser...)
		var ce *ConsentError
		if !errors.As(err, &ce) || ce.Reason != ReasonWrongBrowser {
			t.Errorf("%s: err = %v, want %s", b.name, err, ReasonWrongBrowser)
		}
		if res != (Result{}) {
			t.Errorf("%s: result %+v, want none (no merchant, no redirect to the app)", b.name, res)
		}
	}
	res, err := f.flow.Callback(ctx, u.Host, q, starter)
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonExpired || res.Merchant != "acme" || res.ReturnURL == "" {
		t.Fatalf("the starting browser: %+v, %v; want %s with its merchant and return URL", res, err, ReasonExpired)
	}
	if n := f.op.Count("authorization_code"); n != 0 {
		t.Errorf("the code of an expired state was exchanged %d times", n)
	}
}

// TestLinkLimiterKeepsNoStateForRefusals: a flood over many merchants
// that the provider's rate refuses leaves nothing in the limiter.
// heldMerchants returns how many merchants the limiter holds state for.
func heldMerchants(l *linkLimiter) int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return len(l.m)
}

func TestLinkLimiterKeepsNoStateForRefusals(t *testing.T) {
	clock := newClock()
	l := newLinkLimiter(LinkLimits{PerMinute: 2})
	for i := range 1000 {
		_, err := l.admit(fmt.Sprint("merchant-", i), clock.Now())
		if (err == nil) != (i < 2) {
			t.Fatalf("merchant %d: %v", i, err)
		}
	}
	if n := heldMerchants(l); n != 2 {
		t.Errorf("the limiter holds %d merchants, want the 2 admitted", n)
	}
}

// downPendingStore is a PendingStore whose writes fail while down is set.
type downPendingStore struct {
	*MemoryPendingStore
	down atomic.Bool
}

// Put implements PendingStore.
func (s *downPendingStore) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	if s.down.Load() {
		return errors.New("storage unreachable")
	}
	return s.MemoryPendingStore.Put(ctx, key, val, expires)
}

// TestLinkNotStoredSpendsNoLimit: a link that the consent store fails to
// keep is not handed out, so it spends neither the merchant's nor the
// provider's link rate: once the store is back, the merchant gets its
// link at once.
func TestLinkNotStoredSpendsNoLimit(t *testing.T) {
	ctx := context.Background()
	clock := newClock()
	flow, mem := newLimitFlow(t, clock, LinkLimits{MerchantPerMinute: 1, PerMinute: 1})
	store := &downPendingStore{MemoryPendingStore: mem}
	flow.pend.Store = store
	store.down.Store(true)
	for i := range 3 {
		_, err := flow.NewLink(ctx, "acme", "", "")
		var ce *ConsentError
		if !errors.As(err, &ce) || ce.Reason != ReasonStoreFailure {
			t.Fatalf("NewLink %d with the store down = %v, want %s", i, err, ReasonStoreFailure)
		}
	}
	store.down.Store(false)
	if _, err := flow.NewLink(ctx, "acme", "", ""); err != nil {
		t.Fatalf("NewLink with the store back = %v, want a link", err)
	}
}

// TestLinkOnUnknownCallbackHostNamesTheHosts: a link asked for a callback
// host that no redirect URI is on is refused with the hosts that are, so
// that the app can pick one.
func TestLinkOnUnknownCallbackHostNamesTheHosts(t *testing.T) {
	flow, _ := newLimitFlow(t, newClock(), LinkLimits{})
	_, err := flow.NewLink(context.Background(), "acme", "", "cb9.partner.example")
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonWrongCallback || !strings.Contains(err.Error(), "cb.partner.example") {
		t.Fatalf("NewLink on another host = %v, want %s naming the hosts of the redirect_uris", err, ReasonWrongCallback)
	}
}

// TestLinkOfRemovedRedirectURIRefused: a consent link made for a redirect
// URI that a reload then removed from the provider's redirect_uris is
// refused at its start (wrong_callback), before the browser is sent to
// the bank with a redirect_uri the operator no longer has.
func TestLinkOfRemovedRedirectURIRefused(t *testing.T) {
	ctx := context.Background()
	before, store := newLimitFlow(t, newClock(), LinkLimits{})
	link, err := before.NewLink(ctx, "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	cfg := before.cfg
	cfg.RedirectURIs = []string{"https://cb.partner.example/consent/bank/callback"}
	after, err := NewAuthCode(before.src, cfg, &Pendings{Store: store, Now: before.pend.Now})
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	authURL, _, err := after.Start(ctx, u.Query().Get("link"), u.Host)
	var ce *ConsentError
	if !errors.As(err, &ce) || ce.Reason != ReasonWrongCallback || !strings.Contains(err.Error(), "redirect_uris") {
		t.Fatalf("Start = %.80q, %v; want %s naming redirect_uris", authURL, err, ReasonWrongCallback)
	}
}

// TestReturnURLRemovedByReloadIsDropped: a return URL that a reload took
// off the allow-list (a partner domain given up) is no longer where the
// browser goes: a link made before starts without it, and a state
// started before comes back without it, so the browser ends on the
// consent site's own page.
func TestReturnURLRemovedByReloadIsDropped(t *testing.T) {
	ctx := context.Background()
	const returnURL = "https://app.partner.example/consent/done"
	before, store := newLimitFlow(t, newClock(), LinkLimits{})
	cfg := before.cfg
	cfg.ReturnURLs = []string{"https://new-app.partner.example/consent/"}
	after, err := NewAuthCode(before.src, cfg, &Pendings{Store: store, Now: before.pend.Now})
	if err != nil {
		t.Fatal(err)
	}
	start := func(flow *AuthCode) (string, Pending) {
		t.Helper()
		link, err := before.NewLink(ctx, "acme", returnURL, "")
		if err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(link.URL)
		authURL, rec, err := flow.Start(ctx, u.Query().Get("link"), u.Host)
		if err != nil {
			t.Fatal(err)
		}
		au, _ := url.Parse(authURL)
		return au.Query().Get("state"), rec
	}
	if _, rec := start(after); rec.ReturnURL != "" {
		t.Errorf("a link started after the reload keeps the return URL %q", rec.ReturnURL)
	}
	state, _ := start(before)
	cb, _ := url.Parse(callbackURL)
	res, _ := after.Callback(ctx, cb.Host, url.Values{"state": {state}, "error": {"access_denied"}})
	if res.Merchant != "acme" || res.ReturnURL != "" {
		t.Errorf("Callback after the reload = %+v, want merchant acme without return URL", res)
	}
}
