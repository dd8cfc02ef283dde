package oauth

// The callback's code exchange when the bank's token endpoint fails:
// against zitadel's OP (integration/optest), its failures made by a
// gateway in front of it (optest.Server.TokenStatus), by no connection
// made, by the server dropping the connection, or by the answer getting
// lost or cut short on the way back.

import (
	"bytes"
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/optest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop/dpoptest"
)

// retryHost is the callback host of the consent tests.
const retryHost = "cb.partner.example"

// faultyBank is a consent fixture whose bank can be made to fail its next
// token request: no connection is made to it; the server holds the
// request until the client times out, or drops its connection, before
// zitadel sees it; or zitadel answers it and the answer is lost on the
// way back, or cut short. It can also be made to take a second more.
type faultyBank struct {
	*consentFixture
	// each fails (slow: slows) the next token request once
	nodial, hang, drop, lose, cut, slow atomic.Bool
}

// newFaultyBank starts the fixture with its faults (none on yet).
func newFaultyBank(t *testing.T) *faultyBank {
	t.Helper()
	f := &faultyBank{consentFixture: newConsentFixture(t, optest.Options{}, ClientSecretBasic, false)}
	f.op.BeforeToken = func(r *http.Request) {
		switch {
		case f.hang.CompareAndSwap(true, false):
			<-r.Context().Done() // the client gave up
			panic(http.ErrAbortHandler)
		case f.drop.CompareAndSwap(true, false):
			panic(http.ErrAbortHandler) // the connection is cut, no answer
		case f.slow.CompareAndSwap(true, false):
			time.Sleep(time.Second) // the bank is slow (TokenStatus then answers)
		}
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	closed := ln.Addr().String() // nothing listens there
	ln.Close()
	next := f.src.cfg.Client.Transport
	f.src.cfg.Client.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == "/oauth/token" && f.nodial.CompareAndSwap(true, false) {
			_, err := net.Dial("tcp", closed)
			return nil, cmp.Or(err, errors.New("dialled a closed port"))
		}
		resp, err := next.RoundTrip(r)
		switch {
		case err != nil || r.URL.Path != "/oauth/token":
		case f.lose.CompareAndSwap(true, false):
			resp.Body.Close()
			return nil, errors.New("read: connection reset by peer")
		case f.cut.CompareAndSwap(true, false):
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body[:len(body)/2]), iotest.ErrReader(io.ErrUnexpectedEOF)))
		}
		return resp, err
	})
	return f
}

// start starts a consent of acme bound to browser and approves it at the
// bank: it returns the callback's query and the consent link.
func (f *faultyBank) start(t *testing.T, browser Browser) (url.Values, string) {
	t.Helper()
	id := newLinkID(t, f.flow, "acme")
	authURL, _, err := f.flow.Start(context.Background(), id, retryHost, browser)
	if err != nil {
		t.Fatal(err)
	}
	return approve(t, f.op, authURL), id
}

// exchanges is how many code exchanges reached the bank.
func (f *faultyBank) exchanges() int64 { return f.op.Count("authorization_code") }

// reasonOf is err's *ConsentError reason, "" for none.
func reasonOf(err error) string {
	var ce *ConsentError
	if errors.As(err, &ce) {
		return ce.Reason
	}
	return ""
}

// TestCallbackKeepsTheStateWhenTheExchangeFails: a code exchange whose
// failure says that the bank did not process it (no connection made, 408,
// 425, 429, 503) did not redeem the code: the callback gets
// ReasonRetryCallback without a Result (the page asking for a reload),
// its state stays, and the reload once the bank answers exchanges the
// same code again and stores the consent; the state is spent then. A
// failure after which the bank may have redeemed the code (500, 502, 504,
// a timeout or a connection cut once the request was sent, the answer
// lost or cut short), and the bank's refusal of the code, spend the state
// at once (ReasonExchangeFailed, with the Result): the reload is refused
// without an exchange, and the consent link is usable again.
func TestCallbackKeepsTheStateWhenTheExchangeFails(t *testing.T) {
	ctx := context.Background()
	status := func(code int) func(*faultyBank, url.Values) {
		return func(f *faultyBank, _ url.Values) { f.op.TokenStatus.Store(int32(code)) }
	}
	for _, tc := range []struct {
		name string
		fail func(f *faultyBank, q url.Values) // the first exchange fails
		kept bool                              // the first callback leaves its state
		// unsent: the first exchange does not reach the bank.
		unsent bool
	}{
		{name: "503", kept: true, fail: status(http.StatusServiceUnavailable)},
		{name: "429", kept: true, fail: status(http.StatusTooManyRequests)},
		{name: "425", kept: true, fail: status(http.StatusTooEarly)},
		{name: "408", kept: true, fail: status(http.StatusRequestTimeout)},
		{name: "no connection is made", kept: true, unsent: true,
			fail: func(f *faultyBank, _ url.Values) { f.nodial.Store(true) }},
		{name: "500", fail: status(http.StatusInternalServerError)},
		{name: "502", fail: status(http.StatusBadGateway)},
		{name: "504", fail: status(http.StatusGatewayTimeout)},
		{name: "the exchange times out once sent",
			fail: func(f *faultyBank, _ url.Values) {
				f.src.cfg.Client.Timeout = 500 * time.Millisecond
				f.hang.Store(true)
			}},
		{name: "the connection is cut once the request is sent",
			fail: func(f *faultyBank, _ url.Values) { f.drop.Store(true) }},
		{name: "the answer is lost after the bank redeemed the code",
			fail: func(f *faultyBank, _ url.Values) { f.lose.Store(true) }},
		{name: "the answer is cut short after the bank redeemed the code",
			fail: func(f *faultyBank, _ url.Values) { f.cut.Store(true) }},
		{name: "the bank refuses the code",
			fail: func(_ *faultyBank, q url.Values) { q.Set("code", "not-the-code") }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFaultyBank(t)
			browser := NewBrowser()
			q, link := f.start(t, browser)
			tc.fail(f, q)
			res, err := f.flow.Callback(ctx, retryHost, q, browser)
			checkNoSecrets(t, err, q.Get("code"), q.Get("state"))
			switch {
			case tc.kept && (reasonOf(err) != ReasonRetryCallback || res != Result{}):
				t.Fatalf("Callback = %+v, %v; want %s and no Result", res, err, ReasonRetryCallback)
			case !tc.kept && (reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme"):
				t.Fatalf("Callback = %+v, %v; want %s for acme", res, err, ReasonExchangeFailed)
			}
			sent := int64(1)
			if tc.unsent {
				sent = 0
			}
			if f.exchanges() != sent || f.store.Saves() != 0 {
				t.Fatalf("%d exchanges, %d refresh tokens saved; want %d and none", f.exchanges(), f.store.Saves(), sent)
			}

			f.op.TokenStatus.Store(0)
			f.clock.Add(exchangeRetry)
			res, err = f.flow.Callback(ctx, retryHost, q, browser)
			if !tc.kept {
				if reasonOf(err) != ReasonUnknownState || f.exchanges() != sent {
					t.Fatalf("the reloaded callback = %v (%d exchanges); want %s without an exchange: the state is spent", err, f.exchanges(), ReasonUnknownState)
				}
				if _, err := f.flow.CheckLink(ctx, link, retryHost); err != nil {
					t.Errorf("the consent link after the spent state: %v, want it usable", err)
				}
				return
			}
			if err != nil || res.Merchant != "acme" || f.store.Saves() != 1 || f.exchanges() != sent+1 {
				t.Fatalf("the reloaded callback = %+v, %v (%d saves, %d exchanges); want the consent, the same code exchanged once more", res, err, f.store.Saves(), f.exchanges())
			}
			if _, err := f.flow.Callback(ctx, retryHost, q, browser); reasonOf(err) != ReasonUnknownState || f.exchanges() != sent+1 {
				t.Errorf("the callback once more = %v (%d exchanges); want %s: the state is spent", err, f.exchanges(), ReasonUnknownState)
			}
		})
	}
}

// TestCallbackExchangeTriedThreeTimes: while the bank keeps failing, the
// same callback exchanges its code three times in all, each at least
// exchangeRetry after the last failure (or the bank's Retry-After, when
// longer); a reload sooner gets ReasonRetryCallback without asking the
// bank. The third failure spends the state (ReasonExchangeFailed, with
// the Result), and the consent link is usable again.
func TestCallbackExchangeTriedThreeTimes(t *testing.T) {
	ctx := context.Background()
	f := newFaultyBank(t)
	next := f.src.cfg.Client.Transport
	f.src.cfg.Client.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
		resp, err := next.RoundTrip(r)
		if err == nil && resp.StatusCode == http.StatusServiceUnavailable {
			resp.Header.Set("Retry-After", "20") // the bank's wait
		}
		return resp, err
	})
	q, link := f.start(t, "")
	f.op.TokenStatus.Store(http.StatusServiceUnavailable)
	for i := int64(1); i <= 3; i++ {
		res, err := f.flow.Callback(ctx, retryHost, q)
		if i < 3 && (reasonOf(err) != ReasonRetryCallback || res != Result{}) || i == 3 && (reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme") {
			t.Fatalf("callback %d = %+v, %v", i, res, err)
		}
		if f.exchanges() != i {
			t.Fatalf("after callback %d: %d exchanges", i, f.exchanges())
		}
		if i == 3 {
			break
		}
		for _, wait := range []time.Duration{0, exchangeRetry} { // sooner than the bank's Retry-After
			f.clock.Add(wait)
			if _, err := f.flow.Callback(ctx, retryHost, q); reasonOf(err) != ReasonRetryCallback || f.exchanges() != i {
				t.Fatalf("a reload %v after failure %d = %v (%d exchanges); want %s without an exchange", wait, i, err, f.exchanges(), ReasonRetryCallback)
			}
		}
		f.clock.Add(20*time.Second - exchangeRetry)
	}
	if _, err := f.flow.Callback(ctx, retryHost, q); reasonOf(err) != ReasonUnknownState || f.exchanges() != 3 {
		t.Errorf("the callback after the third failure = %v (%d exchanges); want %s", err, f.exchanges(), ReasonUnknownState)
	}
	if _, err := f.flow.CheckLink(ctx, link, retryHost); err != nil {
		t.Errorf("the consent link after the failed consent: %v, want it usable", err)
	}
}

// TestCallbackRetryOnlyFromItsBrowserWithItsCode: a state kept after a
// failed exchange is still its browser's: another browser's callback, or
// one without the cookie, is refused (ReasonWrongBrowser) without an
// exchange and leaves it; the right browser's reload then stores the
// consent. A callback of the right browser with another code than the
// one whose exchange failed is refused without an exchange, and spends
// the state.
func TestCallbackRetryOnlyFromItsBrowserWithItsCode(t *testing.T) {
	ctx := context.Background()
	for _, otherCode := range []bool{false, true} {
		t.Run(map[bool]string{false: "its code", true: "another code"}[otherCode], func(t *testing.T) {
			f := newFaultyBank(t)
			browser := NewBrowser()
			q, _ := f.start(t, browser)
			f.op.TokenStatus.Store(http.StatusServiceUnavailable)
			if _, err := f.flow.Callback(ctx, retryHost, q, browser); reasonOf(err) != ReasonRetryCallback {
				t.Fatalf("Callback while the bank fails = %v", err)
			}
			f.op.TokenStatus.Store(0)
			f.clock.Add(exchangeRetry)
			for _, b := range []Browser{"", NewBrowser()} {
				if _, err := f.flow.Callback(ctx, retryHost, q, b); reasonOf(err) != ReasonWrongBrowser || f.exchanges() != 1 {
					t.Fatalf("the kept state's callback from another browser = %v (%d exchanges); want %s and no exchange", err, f.exchanges(), ReasonWrongBrowser)
				}
			}
			if otherCode {
				other := url.Values{"state": q["state"], "code": {"a-code-of-another-consent"}}
				if _, err := f.flow.Callback(ctx, retryHost, other, browser); reasonOf(err) != ReasonExchangeFailed || f.exchanges() != 1 {
					t.Fatalf("the kept state with another code = %v (%d exchanges); want %s and no exchange", err, f.exchanges(), ReasonExchangeFailed)
				}
				if _, err := f.flow.Callback(ctx, retryHost, q, browser); reasonOf(err) != ReasonUnknownState || f.exchanges() != 1 {
					t.Errorf("the reload after another code = %v (%d exchanges); want %s", err, f.exchanges(), ReasonUnknownState)
				}
				return
			}
			if res, err := f.flow.Callback(ctx, retryHost, q, browser); err != nil || res.Merchant != "acme" || f.exchanges() != 2 {
				t.Fatalf("the right browser's reload = %+v, %v (%d exchanges); want the consent", res, err, f.exchanges())
			}
		})
	}
}

// TestCallbackRetriedConcurrently: callbacks of one state at once, while
// the bank fails and again once it answers, exchange its code once each
// time: the others are refused (ReasonUnknownState while it is out, or
// ReasonRetryCallback) without asking the bank; one consent is stored.
func TestCallbackRetriedConcurrently(t *testing.T) {
	const n = 8
	ctx := context.Background()
	f := newFaultyBank(t)
	q, _ := f.start(t, "")
	all := func(want string) {
		t.Helper()
		errs := make([]error, n)
		var wg sync.WaitGroup
		for i := range n {
			wg.Go(func() { _, errs[i] = f.flow.Callback(ctx, retryHost, q) })
		}
		wg.Wait()
		got := 0
		for _, err := range errs {
			switch r := reasonOf(err); {
			case err == nil && want == "", r != "" && r == want:
				got++
			case r != ReasonUnknownState && r != ReasonRetryCallback:
				t.Errorf("a callback = %v", err)
			}
		}
		if got < 1 || want == "" && got != 1 {
			t.Errorf("%d callbacks got %q, want one", got, want)
		}
	}
	f.op.TokenStatus.Store(http.StatusServiceUnavailable)
	all(ReasonRetryCallback)
	if f.exchanges() != 1 {
		t.Fatalf("%d exchanges while the bank fails, want 1", f.exchanges())
	}
	f.op.TokenStatus.Store(0)
	f.clock.Add(exchangeRetry)
	all("")
	if f.exchanges() != 2 || f.store.Saves() != 1 {
		t.Errorf("%d exchanges, %d saves; want 2 and 1", f.exchanges(), f.store.Saves())
	}
	if rt, err := f.store.Load(ctx, f.src.StoreKey("acme")); err != nil || !f.op.Storage.RefreshTokenValid(rt.Reveal()) {
		t.Errorf("stored refresh token: %v", err)
	}
}

// TestCallbackPutsBackAnExpiredLink: a consent link that expires between
// the start and the callback is put back as it was when the consent does
// not complete. The reload of a callback kept for a retry claims it again
// and completes the consent: the link made at t0 and started at
// t0+9m30s, the first exchange answered 503 at t0+10m30s, the reload 5 s
// later (exchangeRetry). After a failure that spends the state (the bank refuses the
// code, the save fails), the link is refused as expired, not as used.
func TestCallbackPutsBackAnExpiredLink(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name   string
		fail   func(f *faultyBank, q url.Values) // the first callback fails
		reason string                            // the first callback's
	}{
		{name: "the bank answers 503", reason: ReasonRetryCallback,
			fail: func(f *faultyBank, _ url.Values) { f.op.TokenStatus.Store(http.StatusServiceUnavailable) }},
		{name: "the bank refuses the code", reason: ReasonExchangeFailed,
			fail: func(_ *faultyBank, q url.Values) { q.Set("code", "not-the-code") }},
		{name: "the save fails", reason: ReasonStoreFailure,
			fail: func(f *faultyBank, _ url.Values) { f.store.failing.Store(true) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFaultyBank(t)
			browser := NewBrowser()
			id := newLinkID(t, f.flow, "acme")
			f.clock.Add(9*time.Minute + 30*time.Second)
			authURL, _, err := f.flow.Start(ctx, id, retryHost, browser)
			if err != nil {
				t.Fatal(err)
			}
			q := approve(t, f.op, authURL)
			f.clock.Add(time.Minute) // the link expired 30 s ago
			tc.fail(f, q)
			if _, err := f.flow.Callback(ctx, retryHost, q, browser); reasonOf(err) != tc.reason {
				t.Fatalf("Callback = %v, want %s", err, tc.reason)
			}
			if tc.reason != ReasonRetryCallback {
				if _, err := f.flow.CheckLink(ctx, id, retryHost); reasonOf(err) != ReasonExpired {
					t.Errorf("the link after the failed consent: %v, want %s", err, ReasonExpired)
				}
				return
			}
			f.op.TokenStatus.Store(0)
			f.clock.Add(exchangeRetry)
			if res, err := f.flow.Callback(ctx, retryHost, q, browser); err != nil || res.Merchant != "acme" || f.store.Saves() != 1 {
				t.Fatalf("the reload 5 s later = %+v, %v (%d saves); want the consent", res, err, f.store.Saves())
			}
			if _, err := f.flow.CheckLink(ctx, id, retryHost); reasonOf(err) != ReasonUnknownState {
				t.Errorf("the link after the consent: %v, want it used (%s)", err, ReasonUnknownState)
			}
		})
	}
}

// TestCallbackWaitsAsTheBankAsks: the bank's Retry-After to a failed
// exchange (503) sets when the kept callback exchanges its code again
// (exchangeRetry at least), and the callback says how long is left
// (ConsentError.RetryAfter, which the page sends as its Retry-After); a
// wait over maxExchangeWait (30 s) spends the state at once, without an
// exchange after it: the code would be dead by then.
func TestCallbackWaitsAsTheBankAsks(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		retryAfter int32 // seconds, 0 for none
		kept       bool
	}{
		{0, true}, {20, true}, {30, true}, {31, false}, {120, false},
	} {
		t.Run(fmt.Sprint("Retry-After ", tc.retryAfter), func(t *testing.T) {
			f := newFaultyBank(t)
			q, _ := f.start(t, "")
			f.op.TokenStatus.Store(http.StatusServiceUnavailable)
			f.op.TokenRetryAfter.Store(tc.retryAfter)
			res, err := f.flow.Callback(ctx, retryHost, q)
			if !tc.kept {
				if reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme" {
					t.Fatalf("Callback = %+v, %v; want %s for acme: the state spent", res, err, ReasonExchangeFailed)
				}
				f.op.TokenStatus.Store(0)
				f.clock.Add(time.Duration(tc.retryAfter) * time.Second)
				if _, err := f.flow.Callback(ctx, retryHost, q); reasonOf(err) != ReasonUnknownState || f.exchanges() != 1 {
					t.Errorf("the reload = %v (%d exchanges); want %s without an exchange", err, f.exchanges(), ReasonUnknownState)
				}
				return
			}
			wait := max(exchangeRetry, time.Duration(tc.retryAfter)*time.Second)
			if ce, _ := errors.AsType[*ConsentError](err); reasonOf(err) != ReasonRetryCallback || ce.RetryAfter != wait {
				t.Fatalf("Callback = %v; want %s, RetryAfter %v", err, ReasonRetryCallback, wait)
			}
			f.op.TokenStatus.Store(0)
			f.clock.Add(wait - 2*time.Second)
			if _, err := f.flow.Callback(ctx, retryHost, q); reasonOf(err) != ReasonRetryCallback || f.exchanges() != 1 {
				t.Fatalf("the reload 2 s early = %v (%d exchanges); want %s without an exchange", err, f.exchanges(), ReasonRetryCallback)
			} else if ce, _ := errors.AsType[*ConsentError](err); ce.RetryAfter != 2*time.Second {
				t.Errorf("the reload 2 s early: RetryAfter %v, want 2s", ce.RetryAfter)
			}
			f.clock.Add(2 * time.Second)
			if res, err := f.flow.Callback(ctx, retryHost, q); err != nil || res.Merchant != "acme" || f.exchanges() != 2 {
				t.Errorf("the reload on time = %+v, %v (%d exchanges); want the consent", res, err, f.exchanges())
			}
		})
	}
}

// deadlineStore is a PendingStore that notes, while noting is set, how
// many Puts it got and the least time their contexts had left (none for
// a context without a deadline).
type deadlineStore struct {
	PendingStore
	noting atomic.Bool
	mu     sync.Mutex
	puts   int
	least  time.Duration
}

// Put notes ctx's time left and stores val.
func (s *deadlineStore) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	if s.noting.Load() {
		var left time.Duration
		if dl, ok := ctx.Deadline(); ok && ctx.Err() == nil {
			left = time.Until(dl)
		}
		s.mu.Lock()
		if s.puts++; s.puts == 1 || left < s.least {
			s.least = left
		}
		s.mu.Unlock()
	}
	return s.PendingStore.Put(ctx, key, val, expires)
}

// TestCallbackPutsBackWithTimeOfItsOwn: the put-backs after a failed
// code exchange (the consent link; the state kept for a reload) are
// bounded by SaveTimeout of their own, from the failure on, not by what
// the exchange left of the callback's: after an exchange that took a
// second, they still have (nearly) the whole of it.
func TestCallbackPutsBackWithTimeOfItsOwn(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		status int
		reason string
		puts   int
	}{
		{http.StatusServiceUnavailable, ReasonRetryCallback, 2},   // the link and the state
		{http.StatusInternalServerError, ReasonExchangeFailed, 1}, // the link
	} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			f := newFaultyBank(t)
			ds := &deadlineStore{PendingStore: f.pend.Store}
			f.pend.Store = ds
			q, _ := f.start(t, "")
			f.slow.Store(true)
			f.op.TokenStatus.Store(int32(tc.status))
			ds.noting.Store(true)
			if _, err := f.flow.Callback(ctx, retryHost, q); reasonOf(err) != tc.reason {
				t.Fatalf("Callback = %v, want %s", err, tc.reason)
			}
			ds.noting.Store(false)
			ds.mu.Lock()
			defer ds.mu.Unlock()
			if ds.puts != tc.puts || ds.least < SaveTimeout-500*time.Millisecond || ds.least > SaveTimeout {
				t.Errorf("%d put-backs, the least time left %v; want %d, each with about %v", ds.puts, ds.least, tc.puts, SaveTimeout)
			}
		})
	}
}

// TestCallbackNotKeptPastItsState: a failed exchange (503) keeps the
// state for a reload only when the reload is let through (exchangeRetry,
// or the bank's Retry-After, after the failure) before the state expires;
// otherwise it spends the state at once (ReasonExchangeFailed, with the
// Result), rather than ask for a reload that could only find it expired.
func TestCallbackNotKeptPastItsState(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name       string
		left       time.Duration // the state's time left at the callback
		retryAfter int32         // the bank's, in seconds
		kept       bool
	}{
		{name: "the reload due before the state expires", left: exchangeRetry + time.Second, kept: true},
		{name: "the reload due when it expires", left: exchangeRetry},
		{name: "the reload due after it expires", left: exchangeRetry - time.Second},
		{name: "the bank's wait ends before it expires", left: 21 * time.Second, retryAfter: 20, kept: true},
		{name: "the bank's wait ends after it expires", left: 19 * time.Second, retryAfter: 20},
	} {
		t.Run(tc.name, func(t *testing.T) {
			f := newFaultyBank(t)
			q, _ := f.start(t, "")
			f.clock.Add(StateTTL - tc.left)
			f.op.TokenStatus.Store(http.StatusServiceUnavailable)
			f.op.TokenRetryAfter.Store(tc.retryAfter)
			res, err := f.flow.Callback(ctx, retryHost, q)
			switch {
			case tc.kept && reasonOf(err) != ReasonRetryCallback:
				t.Fatalf("Callback = %+v, %v; want %s", res, err, ReasonRetryCallback)
			case !tc.kept && (reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme" || !strings.Contains(err.Error(), "the authorization state expires first")):
				t.Fatalf("Callback = %+v, %v; want %s for acme: the state expires first", res, err, ReasonExchangeFailed)
			}
			f.op.TokenStatus.Store(0)
			f.clock.Add(max(exchangeRetry, time.Duration(tc.retryAfter)*time.Second))
			res, err = f.flow.Callback(ctx, retryHost, q)
			if tc.kept && (err != nil || res.Merchant != "acme") || !tc.kept && (reasonOf(err) != ReasonUnknownState || f.exchanges() != 1) {
				t.Errorf("the reload = %+v, %v (%d exchanges)", res, err, f.exchanges())
			}
		})
	}
}

// TestCallbackNotKeptForARefusedNonce: a code exchange whose DPoP nonce
// challenge brought a nonce the key refuses (over dpop.MaxNonce bytes)
// did not redeem the code, but its proofs sent again would carry the
// nonce refused again: the callback spends the state
// (ReasonExchangeFailed, the message naming the nonce's size, never the
// nonce), and the code is sent once; its reload is refused without an
// exchange.
func TestCallbackNotKeptForARefusedNonce(t *testing.T) {
	ctx := context.Background()
	as := newDPoPAS(t, "post", nil)
	store := &savingStore{}
	_, flow := newFlow(t, Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID, ClientSecret: secretValue,
		AuthMethod: ClientSecretPost, DPoP: dpoptest.NewKey(t)}, store,
		AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"offline_access"}, AuthorizationURL: as.srv.URL + "/authorize"},
		&Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
	authURL, host, err := startLink(t, flow, "m1")
	if err != nil {
		t.Fatal(err)
	}
	q, _ := as.authorize(t, authURL)
	nonce := strings.Repeat("N", dpop.MaxNonce) + "z"
	as.gate.Nonce = nonce
	res, err := flow.Callback(ctx, host, q)
	if ne, _ := errors.AsType[*dpop.NonceError](err); reasonOf(err) != ReasonExchangeFailed || res.Merchant != "m1" || ne == nil {
		t.Fatalf("Callback = %+v, %v; want %s for m1, with the *dpop.NonceError", res, err, ReasonExchangeFailed)
	}
	checkNonceMessage(t, err, len(nonce), as.srv.URL, nonce)
	if c := as.gate.Challenges.Load(); c != 1 {
		t.Errorf("%d nonce challenges, want 1: the code sent once", c)
	}
	if _, err := flow.Callback(ctx, host, q); reasonOf(err) != ReasonUnknownState || as.gate.Challenges.Load() != 1 {
		t.Errorf("the reload = %v (%d challenges); want %s without an exchange", err, as.gate.Challenges.Load(), ReasonUnknownState)
	}
}

// takeHook is a PendingStore that runs hook before the first Take once
// armed.
type takeHook struct {
	PendingStore
	armed atomic.Bool
	hook  func()
}

// Take runs the hook once armed, then takes key.
func (s *takeHook) Take(ctx context.Context, key string) ([]byte, error) {
	if s.armed.CompareAndSwap(true, false) {
		s.hook()
	}
	return s.PendingStore.Take(ctx, key)
}

// TestCallbackExchangeDiscoveryFails: when the endpoints the callback
// read are forgotten before its code exchange (a failed token request of
// the provider meanwhile) and the exchange's discovery fails, the code
// was not sent: a discovery the server answered 500, 502, 503 or 504
// (transient, whatever the status would mean for a code exchange) keeps
// the state (ReasonRetryCallback, no Result), and the reload once the
// server answers again exchanges the code and stores the consent; a
// discovery that trying again does not mend (no document: 404 for both)
// spends it.
func TestCallbackExchangeDiscoveryFails(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		status int
		kept   bool
	}{
		{http.StatusInternalServerError, true},
		{http.StatusBadGateway, true},
		{http.StatusServiceUnavailable, true},
		{http.StatusGatewayTimeout, true},
		{http.StatusNotFound, false},
	} {
		t.Run(fmt.Sprint(tc.status), func(t *testing.T) {
			f := newFaultyBank(t)
			hook := &takeHook{PendingStore: f.pend.Store, hook: func() {
				f.src.ep.invalidate()
				f.op.DiscoveryStatus.Store(int32(tc.status))
			}}
			f.pend.Store = hook
			browser := NewBrowser()
			q, _ := f.start(t, browser)
			hook.armed.Store(true)
			res, err := f.flow.Callback(ctx, retryHost, q, browser)
			if de, _ := errors.AsType[*DiscoveryError](err); de == nil {
				t.Fatalf("Callback = %v, want the exchange's *DiscoveryError", err)
			}
			switch {
			case tc.kept && (reasonOf(err) != ReasonRetryCallback || res != Result{}):
				t.Fatalf("Callback = %+v, %v; want %s and no Result: the code was not sent", res, err, ReasonRetryCallback)
			case !tc.kept && (reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme"):
				t.Fatalf("Callback = %+v, %v; want %s for acme", res, err, ReasonExchangeFailed)
			}
			if f.exchanges() != 0 {
				t.Fatalf("%d exchanges, want none", f.exchanges())
			}

			f.op.DiscoveryStatus.Store(0)
			f.clock.Add(exchangeRetry)
			res, err = f.flow.Callback(ctx, retryHost, q, browser)
			if !tc.kept {
				if reasonOf(err) != ReasonUnknownState || f.exchanges() != 0 {
					t.Fatalf("the reloaded callback = %v (%d exchanges); want %s: the state is spent", err, f.exchanges(), ReasonUnknownState)
				}
				return
			}
			if err != nil || res.Merchant != "acme" || f.store.Saves() != 1 || f.exchanges() != 1 {
				t.Fatalf("the reloaded callback = %+v, %v (%d saves, %d exchanges); want the consent, the code exchanged once", res, err, f.store.Saves(), f.exchanges())
			}
		})
	}
}
