package oauth

// The callback's code exchange when the bank's token endpoint fails:
// against zitadel's OP (integration/optest), its failures made by a
// gateway in front of it (optest.Server.TokenStatus), by no connection
// made, by the server dropping the connection, by its answer lost to a
// TCP reset or cut short on the way back, or by the endpoints to be
// discovered again failing.

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// retryHost is the callback host of the consent tests.
const retryHost = "cb.partner.example"

// faultyBank is a consent fixture whose bank can be made to fail its next
// token request: the request goes, through the client's own transport, to
// a port nothing listens on (no connection is made); the server holds the
// request until the client times out, or drops its connection, before
// zitadel sees it; zitadel answers it and the server resets the
// connection (TCP RST) instead of sending the answer, or the answer is
// cut short on the way back; or, once the callback has taken its state,
// the endpoints are to be discovered again (as after another request's
// failure) and the discovery document answers rediscover. It notes when
// the server got the last token request.
type faultyBank struct {
	*consentFixture
	// each fails the next token request once
	nodial, hang, drop, reset, cut atomic.Bool
	// rediscover, when not 0, is the discovery document's status once the
	// next callback has taken its state
	rediscover atomic.Int32
	// tokenAt is when the server got the last token request, before it
	// answered
	tokenAt atomic.Pointer[time.Time]
}

// newFaultyBank starts the fixture with its faults (none on yet).
func newFaultyBank(t *testing.T) *faultyBank {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	rl := &resetListener{Listener: ln}
	f := &faultyBank{consentFixture: newConsentFixture(t, optest.Options{Listener: rl}, ClientSecretBasic, false)}
	f.op.BeforeToken = func(r *http.Request) {
		now := time.Now()
		f.tokenAt.Store(&now)
		switch {
		case f.hang.CompareAndSwap(true, false):
			<-r.Context().Done() // the client gave up
			panic(http.ErrAbortHandler)
		case f.drop.CompareAndSwap(true, false):
			panic(http.ErrAbortHandler) // the connection is cut, no answer
		case f.reset.CompareAndSwap(true, false):
			rl.resetAnswer(r) // zitadel redeems the code; its answer is a TCP reset
		}
	}
	f.pend.Store = &takeHook{PendingStore: f.pend.Store, before: func() {
		if st := f.rediscover.Swap(0); st != 0 {
			f.src.ep.invalidate() // as another request's failure does
			f.op.DiscoveryStatus.Store(st)
		}
	}}
	closed := freeAddr(t)
	next := f.src.cfg.Client.Transport
	f.src.cfg.Client.Transport = roundTripFunc(func(r *http.Request) (*http.Response, error) {
		if r.URL.Path == "/oauth/token" && f.nodial.CompareAndSwap(true, false) {
			r = r.Clone(r.Context())
			r.URL.Host = closed
		}
		resp, err := next.RoundTrip(r)
		if err == nil && r.URL.Path == "/oauth/token" && f.cut.CompareAndSwap(true, false) {
			body, _ := io.ReadAll(resp.Body)
			resp.Body.Close()
			resp.Body = io.NopCloser(io.MultiReader(bytes.NewReader(body[:len(body)/2]), iotest.ErrReader(io.ErrUnexpectedEOF)))
		}
		return resp, err
	})
	return f
}

// freeAddr returns an address on 127.0.0.1 that nothing listens on: a
// port the system gave and that was closed again.
func freeAddr(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	return ln.Addr().String()
}

// resetListener is a TCP listener that can make a connection answer a
// request it read with a TCP reset instead of the answer.
type resetListener struct {
	net.Listener
	conns sync.Map // remote address -> *resetConn
}

// Accept accepts a connection and notes it by its remote address.
func (l *resetListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	rc := &resetConn{TCPConn: c.(*net.TCPConn)}
	l.conns.Store(c.RemoteAddr().String(), rc)
	return rc, nil
}

// resetAnswer makes the connection r came on reset (SO_LINGER 0, then
// close) instead of writing r's answer.
func (l *resetListener) resetAnswer(r *http.Request) {
	c, _ := l.conns.Load(r.RemoteAddr)
	c.(*resetConn).reset.Store(true)
}

// resetConn is a server's connection whose next write, once reset is
// set, closes it with a TCP reset instead.
type resetConn struct {
	*net.TCPConn
	reset atomic.Bool
}

// Write writes b, or resets the connection.
func (c *resetConn) Write(b []byte) (int, error) {
	if c.reset.CompareAndSwap(true, false) {
		c.SetLinger(0)
		c.Close()
		return 0, net.ErrClosed
	}
	return c.TCPConn.Write(b)
}

// takeHook is a PendingStore that calls before before each Take.
type takeHook struct {
	PendingStore
	before func()
}

// Take calls before, then takes key.
func (s *takeHook) Take(ctx context.Context, key string) ([]byte, error) {
	s.before()
	return s.PendingStore.Take(ctx, key)
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

// spentCauses are what a failed exchange that spends its state, of a
// kind the provider did not process, names as the cause: the callbacks
// used up, the provider's wait, the state's expiry.
var spentCauses = map[string]string{
	"tries":  "callbacks failed to exchange the code",
	"wait":   "the provider asks to wait",
	"expiry": "the authorization state expires first",
}

// checkSpentFor checks that err names the cause (a key of spentCauses)
// that spent the state, and no other.
func checkSpentFor(t *testing.T, err error, cause string) {
	t.Helper()
	for c, text := range spentCauses {
		if named := strings.Contains(err.Error(), text); named != (c == cause) {
			t.Errorf("the error names %q: %v; want only the cause %q named: %v", text, named, spentCauses[cause], err)
		}
	}
}

// TestCallbackKeepsTheStateWhenTheExchangeFails: a code exchange whose
// failure says that the bank very likely did not process it (no
// connection made, 408, 425, 429, 503, endpoints that could not be
// discovered again now) did not redeem the code: the callback gets
// ReasonRetryCallback without a Result (the page asking for a reload),
// its state stays, and the reload once the bank answers exchanges the
// same code again and stores the consent; the state is spent then. A
// failure after which the bank may have redeemed the code (500, 502, 504,
// a timeout or a connection cut once the request was sent, the answer
// lost to a TCP reset or cut short), a discovery that trying again does
// not mend, and the bank's refusal of the code, spend the state at once
// (ReasonExchangeFailed, with the Result): the reload is refused without
// an exchange, and the consent link is usable again. The failures of the
// connection are real ones, through the client's own transport.
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
		{name: "discovered again, the document answers 503", kept: true, unsent: true,
			fail: func(f *faultyBank, _ url.Values) { f.rediscover.Store(http.StatusServiceUnavailable) }},
		{name: "discovered again, the document answers 403", unsent: true,
			fail: func(f *faultyBank, _ url.Values) { f.rediscover.Store(http.StatusForbidden) }},
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
		{name: "the answer is lost to a TCP reset after the bank redeemed the code",
			fail: func(f *faultyBank, _ url.Values) { f.reset.Store(true) }},
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
			f.op.DiscoveryStatus.Store(0)
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
		if i == 3 {
			checkSpentFor(t, err, "tries")
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
				checkSpentFor(t, err, "wait")
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
// many Puts it got and the earliest deadline of their contexts (zero when
// one had none).
type deadlineStore struct {
	PendingStore
	noting   atomic.Bool
	mu       sync.Mutex
	puts     int
	earliest time.Time
}

// Put notes ctx's deadline and stores val.
func (s *deadlineStore) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	if s.noting.Load() {
		dl, _ := ctx.Deadline()
		s.mu.Lock()
		if s.puts++; s.puts == 1 || dl.Before(s.earliest) {
			s.earliest = dl
		}
		s.mu.Unlock()
	}
	return s.PendingStore.Put(ctx, key, val, expires)
}

// TestCallbackPutsBackWithTimeOfItsOwn: the put-backs after a failed
// code exchange (the consent link; the state kept for a reload) are
// bounded by SaveTimeout of their own, from the failure on, not by what
// the exchange left of the callback's: each deadline is at least
// SaveTimeout after the bank got the token request, which was before the
// exchange failed (and after the callback's own SaveTimeout began).
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
			f.op.TokenStatus.Store(int32(tc.status))
			ds.noting.Store(true)
			if _, err := f.flow.Callback(ctx, retryHost, q); reasonOf(err) != tc.reason {
				t.Fatalf("Callback = %v, want %s", err, tc.reason)
			}
			ds.noting.Store(false)
			ds.mu.Lock()
			defer ds.mu.Unlock()
			got := f.tokenAt.Load()
			if got == nil {
				t.Fatal("the bank got no token request")
			}
			if want := got.Add(SaveTimeout); ds.puts != tc.puts || ds.earliest.Before(want) {
				t.Errorf("%d put-backs, the earliest deadline %v after the bank got the token request; want %d, none sooner than %v",
					ds.puts, ds.earliest.Sub(*got), tc.puts, SaveTimeout)
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
			case !tc.kept && (reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme"):
				t.Fatalf("Callback = %+v, %v; want %s for acme: the state expires first", res, err, ReasonExchangeFailed)
			case !tc.kept:
				checkSpentFor(t, err, "expiry")
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

// TestCallbackNonceChallenges: a code exchange the bank refuses with
// use_dpop_nonce did not redeem the code. When the key now holds a nonce
// other than the one the refused request carried (the bank sent a new one
// with each challenge, the one the exchange answered itself and the next),
// the code sent again carries it: the callback keeps its state
// (ReasonRetryCallback), and its reload, once the bank takes the nonce,
// stores the consent. Without a new nonce (the one sent again, none, or
// no DPoP key to carry one) the code sent again would be refused again:
// the callback spends its state (ReasonExchangeFailed, with the Result),
// and its reload is refused without a request.
func TestCallbackNonceChallenges(t *testing.T) {
	ctx := context.Background()
	for _, tc := range []struct {
		name  string
		nonce func(n int64) string // the DPoP-Nonce of the nth challenge, "" none
		noKey bool                 // the provider has no DPoP key
		kept  bool
		sent  int64 // the first callback's token requests
	}{
		{name: "a new nonce with each challenge", nonce: func(n int64) string { return fmt.Sprint("front-", n) }, kept: true, sent: 2},
		{name: "the same nonce again", nonce: func(int64) string { return "front" }, sent: 2},
		{name: "no nonce", nonce: func(int64) string { return "" }, sent: 1},
		{name: "no DPoP key", nonce: func(n int64) string { return fmt.Sprint("front-", n) }, noKey: true, sent: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			as := newDPoPAS(t, "post", nil)
			var challenging atomic.Bool
			var requests atomic.Int64
			front := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.URL.Path == "/token" {
					n := requests.Add(1)
					if challenging.Load() {
						if nonce := tc.nonce(n); nonce != "" {
							w.Header().Set("DPoP-Nonce", nonce)
						}
						fail(w, http.StatusBadRequest, "use_dpop_nonce")
						return
					}
				}
				as.gate.ServeHTTP(w, r)
			}))
			t.Cleanup(front.Close)
			clock := newClock()
			store := &savingStore{}
			cfg := Config{Name: "bank", TokenURL: front.URL + "/token", ClientID: as.clientID, ClientSecret: secretValue, AuthMethod: ClientSecretPost}
			if !tc.noKey {
				cfg.DPoP = dpoptest.NewKey(t)
			}
			_, flow := newFlow(t, cfg, store,
				AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"offline_access"}, AuthorizationURL: front.URL + "/authorize"},
				&Pendings{Store: &MemoryPendingStore{}, Now: clock.Now})
			authURL, host, err := startLink(t, flow, "m1")
			if err != nil {
				t.Fatal(err)
			}
			q, _ := as.authorize(t, authURL)
			challenging.Store(true)
			res, err := flow.Callback(ctx, host, q)
			switch {
			case tc.kept && (reasonOf(err) != ReasonRetryCallback || res != Result{}):
				t.Fatalf("Callback = %+v, %v; want %s and no Result", res, err, ReasonRetryCallback)
			case !tc.kept && (reasonOf(err) != ReasonExchangeFailed || res.Merchant != "m1"):
				t.Fatalf("Callback = %+v, %v; want %s for m1: the state spent", res, err, ReasonExchangeFailed)
			}
			if n := requests.Load(); n != tc.sent {
				t.Errorf("%d token requests, want %d", n, tc.sent)
			}
			challenging.Store(false)
			clock.Add(exchangeRetry)
			res, err = flow.Callback(ctx, host, q)
			if !tc.kept {
				if reasonOf(err) != ReasonUnknownState || requests.Load() != tc.sent {
					t.Errorf("the reload = %v (%d token requests); want %s without a request", err, requests.Load(), ReasonUnknownState)
				}
				return
			}
			if err != nil || res.Merchant != "m1" || store.saves.Load() != 1 {
				t.Errorf("the reload = %+v, %v (%d saves); want the consent", res, err, store.saves.Load())
			}
		})
	}
}

// armedTakeHook is a PendingStore that runs hook before the first Take once
// armed.
type armedTakeHook struct {
	PendingStore
	armed atomic.Bool
	hook  func()
}

// Take runs the hook once armed, then takes key.
func (s *armedTakeHook) Take(ctx context.Context, key string) ([]byte, error) {
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
			hook := &armedTakeHook{PendingStore: f.pend.Store, hook: func() {
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

// linkPutFails is a PendingStore whose puts of consent links fail once
// armed (a storage error).
type linkPutFails struct {
	PendingStore
	armed atomic.Bool
}

// Put fails for a link once armed, else stores val.
func (s *linkPutFails) Put(ctx context.Context, key string, val []byte, expires time.Time) error {
	if s.armed.Load() && strings.HasPrefix(key, kindLink+"/") {
		return errors.New("storage unavailable")
	}
	return s.PendingStore.Put(ctx, key, val, expires)
}

// TestCallbackSpentWhenTheLinkIsNotPutBack: a code exchange the bank very
// likely did not process keeps its state for the reload only when the
// consent link could be put back: the reload must claim it. When the
// link's put-back fails, the state is spent at once (ReasonExchangeFailed,
// the error saying to ask for a new link), not kept for a reload bound to
// fail as "already used".
func TestCallbackSpentWhenTheLinkIsNotPutBack(t *testing.T) {
	ctx := context.Background()
	f := newFaultyBank(t)
	store := &linkPutFails{PendingStore: f.pend.Store}
	f.pend.Store = store
	browser := NewBrowser()
	q, _ := f.start(t, browser)
	f.op.TokenStatus.Store(http.StatusServiceUnavailable)
	store.armed.Store(true)
	res, err := f.flow.Callback(ctx, retryHost, q, browser)
	if reasonOf(err) != ReasonExchangeFailed || res.Merchant != "acme" || !strings.Contains(err.Error(), "could not be put back") {
		t.Fatalf("Callback = %+v, %v; want %s for acme, saying the link could not be put back", res, err, ReasonExchangeFailed)
	}
	store.armed.Store(false)
	f.op.TokenStatus.Store(0)
	f.clock.Add(exchangeRetry)
	if _, err := f.flow.Callback(ctx, retryHost, q, browser); reasonOf(err) != ReasonUnknownState || f.exchanges() != 1 {
		t.Fatalf("the reload = %v (%d exchanges); want %s without an exchange: the state is spent", err, f.exchanges(), ReasonUnknownState)
	}
}
