package outbound

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	"net/http/httptest"
	"net/url"
	"reflect"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// entry is a token as the retry sees it.
type entry struct{ tok broker.Token }

func (e entry) Header() string      { return "Bearer " + string(e.tok.Value) }
func (e entry) Token() broker.Token { return e.tok }
func (e entry) ATH() string         { return wantATH(string(e.tok.Value)) }

// dpopEntry is a DPoP-bound token as the retry sees it.
type dpopEntry struct{ entry }

func (e dpopEntry) Header() string { return "DPoP " + string(e.tok.Value) }

// fakeTokens records what the retry reports and hands out fresh.
type fakeTokens struct {
	fresh    Entry
	err      error
	events   []string
	accepted broker.Secret
}

func (f *fakeTokens) Get(context.Context, *broker.Binding) (Entry, error) {
	f.events = append(f.events, "get")
	return f.fresh, f.err
}
func (f *fakeTokens) Purge(_ *broker.Binding, t broker.Token) {
	f.events = append(f.events, "purge "+string(t.Value))
}
func (f *fakeTokens) Kept(_ *broker.Binding, t broker.Token) {
	f.events = append(f.events, "kept "+string(t.Value))
}
func (f *fakeTokens) Accepted(_ *broker.Binding, v broker.Secret) { f.accepted = v }

// upstream answers 401 invalid_token to the token bad, of any scheme (any
// request when bad is "*"), and 200 otherwise; alter changes the request
// first.
type upstream struct {
	bad    string
	plain  bool   // the 401 has no WWW-Authenticate
	scheme string // of the 401's challenge; default Bearer
	nonce  int    // the first nonce requests are answered use_dpop_nonce
	// nonceValue is the DPoP-Nonce of those answers; default n-1.
	nonceValue string
	alter      func(*http.Request)
	// answered, when set, sees each request and its answer's header
	// before the status is written, as a transport does.
	answered func(*http.Request, http.Header)
	seen     []string
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	if u.alter != nil {
		u.alter(r)
	}
	u.seen = append(u.seen, r.Header.Get("Authorization"))
	if u.nonce > 0 {
		u.nonce--
		w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`)
		w.Header().Set("DPoP-Nonce", cmp.Or(u.nonceValue, "n-1"))
		if u.answered != nil {
			u.answered(r, w.Header())
		}
		w.WriteHeader(http.StatusUnauthorized)
		return nil
	}
	_, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if u.bad == "*" || token == u.bad {
		if !u.plain {
			scheme := u.scheme
			if scheme == "" {
				scheme = "Bearer"
			}
			w.Header().Set("WWW-Authenticate", scheme+` error="invalid_token"`)
		}
		w.WriteHeader(http.StatusUnauthorized)
		return nil
	}
	w.WriteHeader(http.StatusOK)
	return nil
}

// TestRetryForward: what the retry sends, answers and reports for each
// upstream answer and broker outcome.
func TestRetryForward(t *testing.T) {
	old := entry{broker.Token{Value: "old"}}
	young := entry{broker.Token{Value: "old", IssuedAt: time.Now()}}
	fresh := entry{broker.Token{Value: "new"}}
	consent := &oauth.ConsentRequiredError{}
	for _, tt := range []struct {
		name       string
		mode       string
		first      Entry  // default old
		body       string // default "body"
		up         *upstream
		fresh      Entry
		err        error
		wantStatus int // with no wantErr
		wantSeen   []string
		wantEvents []string
		wantErr    any
		wantOK     broker.Secret // Accepted
		wantNonce  int           // NonceChallenged calls
	}{
		{name: "accepted", up: &upstream{bad: "none"}, wantStatus: 200, wantSeen: []string{"Bearer old"}},
		{name: "rejected, retried with a fresh token", up: &upstream{bad: "old"}, fresh: fresh, wantStatus: 200,
			wantSeen: []string{"Bearer old", "Bearer new"}, wantEvents: []string{"purge old", "get"}, wantOK: "new"},
		{name: "rejected, no better token", up: &upstream{bad: "old"}, fresh: old, wantStatus: 401,
			wantSeen: []string{"Bearer old"}, wantEvents: []string{"purge old", "get"}},
		{name: "rejected, fresh rejected too", up: &upstream{bad: "*"}, fresh: fresh, wantStatus: 401,
			wantSeen: []string{"Bearer old", "Bearer new"}, wantEvents: []string{"purge old", "get", "purge new"}},
		{name: "rejected, consent required", up: &upstream{bad: "old"}, err: consent,
			wantSeen: []string{"Bearer old"}, wantEvents: []string{"purge old", "get"}, wantErr: new(*Refusal)},
		{name: "401 without the token: kept", up: &upstream{bad: "*", alter: func(r *http.Request) { r.Header.Del("Authorization") }},
			wantStatus: 401, wantSeen: []string{""}, wantEvents: []string{"kept old"}},
		{name: "off", mode: "off", up: &upstream{bad: "old"}, wantStatus: 401, wantSeen: []string{"Bearer old"}},
		{name: "plain 401: not about the token", up: &upstream{bad: "old", plain: true}, fresh: fresh, wantStatus: 401,
			wantSeen: []string{"Bearer old"}},
		{name: "any: plain 401 purges and retries", mode: "any", up: &upstream{bad: "old", plain: true}, fresh: fresh,
			wantStatus: 200, wantSeen: []string{"Bearer old", "Bearer new"}, wantEvents: []string{"purge old", "get"}, wantOK: "new"},
		{name: "any: a token younger than minPurgeAge is not purged", mode: "any", first: young,
			up: &upstream{bad: "old", plain: true}, fresh: fresh, wantStatus: 200,
			wantSeen: []string{"Bearer old", "Bearer new"}, wantEvents: []string{"get"}, wantOK: "new"},
		{name: "DPoP invalid_token purges and retries", up: &upstream{bad: "old", scheme: "DPoP"}, fresh: fresh, wantStatus: 200,
			wantSeen: []string{"Bearer old", "Bearer new"}, wantEvents: []string{"purge old", "get"}, wantOK: "new"},
		{name: "nonce challenge to a bearer token: passed on, not sent again, nothing purged", up: &upstream{bad: "none", nonce: 1},
			wantStatus: 401, wantSeen: []string{"Bearer old"}},
		{name: "any: nonce challenge to a bearer token: passed on, not sent again, nothing purged", mode: "any",
			up: &upstream{bad: "none", nonce: 1}, fresh: fresh, wantStatus: 401, wantSeen: []string{"Bearer old"}},
		{name: "body over the limit: purged, not retried", body: strings.Repeat("x", DefaultRetryBodyLimit+1),
			up: &upstream{bad: "old"}, fresh: fresh, wantStatus: 401, wantSeen: []string{"Bearer old"}, wantEvents: []string{"purge old"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tokens := &fakeTokens{fresh: tt.fresh, err: tt.err}
			nonces := 0
			rt := Retry{Mode: tt.mode, Tokens: tokens, NonceChallenged: func(*broker.Binding) { nonces++ }}
			out := Contract{}
			first, body := tt.first, tt.body
			if first == nil {
				first = old
			}
			if body == "" {
				body = "body"
			}
			r := httptest.NewRequest("POST", "/pay", strings.NewReader(body))
			out.Prepare(r, first.Header())
			w := httptest.NewRecorder()
			err := rt.Forward(w, r, tt.up, out, &broker.Binding{}, first)
			if tt.wantErr != nil {
				if !errors.As(err, tt.wantErr) {
					t.Fatalf("err = %v, want %T", err, tt.wantErr)
				}
				if rf, ok := errors.AsType[*Refusal](err); ok && rf.Code != errcode.ConsentRequired {
					t.Errorf("refusal %s, want consent_required", rf.Code)
				}
			} else if err != nil {
				t.Fatal(err)
			}
			if tt.wantErr != nil && (w.Body.Len() > 0 || len(w.Header()) > 0) {
				t.Errorf("a response was written: %d %v %q", w.Code, w.Header(), w.Body)
			}
			if tt.wantErr == nil && w.Code != tt.wantStatus {
				t.Errorf("status %d, want %d", w.Code, tt.wantStatus)
			}
			if !slices.Equal(tt.up.seen, tt.wantSeen) || !slices.Equal(tokens.events, tt.wantEvents) || tokens.accepted != tt.wantOK {
				t.Errorf("upstream saw %q, events %q, accepted %q; want %q, %q, %q",
					tt.up.seen, tokens.events, tokens.accepted, tt.wantSeen, tt.wantEvents, tt.wantOK)
			}
			if nonces != tt.wantNonce {
				t.Errorf("%d nonce challenges reported, want %d", nonces, tt.wantNonce)
			}
		})
	}
}

// TestRetryDPoP: with a DPoP binding, the request is passed on without
// the token, which only a transport's Sign puts on; a 401 to an attempt no
// transport signed is dropped and Forward says ErrUnsigned, in every mode,
// while any other answer to it passes through, and nothing is remembered
// for the next request; a signed request passes, a nonce challenge is
// retried and signed again in every mode ("off" included), and a rejected
// token is purged and retried with the fresh one.
func TestRetryDPoP(t *testing.T) {
	for _, tt := range []struct {
		name       string
		mode       string
		sign       bool
		status     int // the unsigned answer; default 401
		nonce      int
		nonceValue string // default n-1
		bad        string
		body       string
		wantErr    error
		wantCode   int
		wantSeen   []string
		wantEvents []string
		wantNonce  int
		// wantRefused: NonceRefused is told once of a *dpop.NonceError.
		wantRefused bool
	}{
		{name: "unsigned 401", wantErr: ErrUnsigned, wantSeen: []string{""}},
		{name: "unsigned 401, retry off", mode: "off", wantErr: ErrUnsigned, wantSeen: []string{""}},
		{name: "unsigned 200 (respond): passed through", status: 200, wantCode: 200, wantSeen: []string{""}},
		{name: "unsigned 404 (file_server): passed through", status: 404, wantCode: 404, wantSeen: []string{""}},
		{name: "signed", sign: true, wantCode: 200, wantSeen: []string{"DPoP tok"}},
		{name: "signed, retry off", mode: "off", sign: true, wantCode: 200, wantSeen: []string{"DPoP tok"}},
		{name: "signed, nonce challenge retried", sign: true, nonce: 1, wantCode: 200,
			wantSeen: []string{"DPoP tok", "DPoP tok"}, wantNonce: 1},
		{name: "signed, retry off: nonce challenge retried", mode: "off", sign: true, nonce: 1, wantCode: 200,
			wantSeen: []string{"DPoP tok", "DPoP tok"}, wantNonce: 1},
		{name: "signed, any: nonce challenge is not a rejection", mode: "any", sign: true, nonce: 1, wantCode: 200,
			wantSeen: []string{"DPoP tok", "DPoP tok"}, wantNonce: 1},
		{name: "signed, nonce challenge twice: the second is the caller's", sign: true, nonce: 2, wantCode: 401,
			wantSeen: []string{"DPoP tok", "DPoP tok"}, wantNonce: 1},
		{name: "signed, nonce challenge with a nonce over the limit: passed on, not sent again", sign: true, nonce: 1,
			nonceValue: strings.Repeat("n", dpop.MaxNonce+1), wantCode: 401, wantSeen: []string{"DPoP tok"}, wantRefused: true},
		{name: "signed, any: nonce challenge with a nonce over the limit: nothing purged", mode: "any", sign: true, nonce: 1,
			nonceValue: strings.Repeat("n", dpop.MaxNonce+1), wantCode: 401, wantSeen: []string{"DPoP tok"}, wantRefused: true},
		{name: "signed, retry off: nonce challenge with a nonce over the limit", mode: "off", sign: true, nonce: 1,
			nonceValue: strings.Repeat("n", dpop.MaxNonce+1), wantCode: 401, wantSeen: []string{"DPoP tok"}, wantRefused: true},
		{name: "signed, nonce challenge then the token rejected: purged", sign: true, nonce: 1, bad: "tok", wantCode: 401,
			wantSeen: []string{"DPoP tok", "DPoP tok"}, wantEvents: []string{"purge tok"}, wantNonce: 1},
		{name: "signed, nonce challenge, body over the limit: passed on, not counted", sign: true, nonce: 1,
			body: strings.Repeat("x", DefaultRetryBodyLimit+1), wantCode: 401, wantSeen: []string{"DPoP tok"}},
		{name: "signed, retry off: nonce challenge, body over the limit", mode: "off", sign: true, nonce: 1,
			body: strings.Repeat("x", DefaultRetryBodyLimit+1), wantCode: 401, wantSeen: []string{"DPoP tok"}},
		{name: "signed, invalid_token: purged, retried with the fresh token", sign: true, bad: "tok", wantCode: 200,
			wantSeen: []string{"DPoP tok", "DPoP new"}, wantEvents: []string{"purge tok", "get"}},
		{name: "signed, retry off: invalid_token passed on", mode: "off", sign: true, bad: "tok", wantCode: 401,
			wantSeen: []string{"DPoP tok"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			k := dpoptest.NewKey(t) // its own: the key keeps a refusal (RefusedNonce)
			d := NewDPoP(k)
			d.SetToken("DPoP tok", wantATH("tok"))
			up := &upstream{bad: cmp.Or(tt.bad, "none"), scheme: "DPoP", nonce: tt.nonce, nonceValue: tt.nonceValue}
			unsignedStatus := tt.status
			if unsignedStatus == 0 {
				unsignedStatus = http.StatusUnauthorized
			}
			var next Next = up
			if tt.sign {
				up.alter = func(r *http.Request) {
					if err := d.Sign(r, "", "", time.Now()); err != nil {
						t.Error(err)
					}
				}
				up.answered = func(r *http.Request, h http.Header) {
					d.Observe(r, h)
					if err := k.RefusedNonce(dpop.ResourceServer, r.URL); (err != nil) != (len(tt.nonceValue) > dpop.MaxNonce) {
						t.Errorf("Observe: refusal %v", err)
					}
				}
			} else {
				next = HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
					up.seen = append(up.seen, r.Header.Get("Authorization"))
					w.WriteHeader(unsignedStatus)
					_, err := w.Write([]byte("answer"))
					return err
				})
			}
			tokens := &fakeTokens{fresh: dpopEntry{entry{broker.Token{Value: "new"}}}}
			nonces := 0
			var refusals []error
			rt := Retry{Mode: tt.mode, Tokens: tokens, DPoP: d, NonceChallenged: func(*broker.Binding) { nonces++ },
				NonceRefused: func(_ *broker.Binding, err error) { refusals = append(refusals, err) }}
			out := Contract{}
			body := tt.body
			if body == "" {
				body = "body"
			}
			r := httptest.NewRequest("POST", "/accounts", strings.NewReader(body))
			r.Header.Set("Authorization", "Bearer caller")
			out.Prepare(r, "DPoP tok")
			if a := r.Header.Values("Authorization"); len(a) != 0 {
				t.Fatalf("Prepare set Authorization %q on a DPoP request", a)
			}
			w := httptest.NewRecorder()
			err := rt.Forward(w, r, next, out, &broker.Binding{}, dpopEntry{entry{broker.Token{Value: "tok"}}})
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr != nil && (w.Body.Len() > 0 || len(w.Header()) > 0) {
				t.Errorf("the unsigned request's answer was written: %v %q", w.Header(), w.Body)
			}
			if tt.wantErr == nil && w.Code != tt.wantCode {
				t.Errorf("status %d, want %d", w.Code, tt.wantCode)
			}
			if !slices.Equal(up.seen, tt.wantSeen) || !slices.Equal(tokens.events, tt.wantEvents) || nonces != tt.wantNonce {
				t.Errorf("upstream saw %q, events %q, %d nonce challenges; want %q, %q, %d",
					up.seen, tokens.events, nonces, tt.wantSeen, tt.wantEvents, tt.wantNonce)
			}
			var ne *dpop.NonceError
			if tt.wantRefused != (len(refusals) == 1 && errors.As(refusals[0], &ne) && ne.Size == len(tt.nonceValue)) || len(refusals) > 1 {
				t.Errorf("NonceRefused told %v; want one *dpop.NonceError: %v", refusals, tt.wantRefused)
			}
		})
	}
}

// TestRetryDPoPNonceOverHTTP: against a resource server on 127.0.0.1 that
// checks every proof (dpoptest.Checker) and demands its nonce, a nonce
// challenge is answered with one retry, the body replayed and the proof
// carrying the new nonce, only when its DPoP-Nonce brings a nonce other
// than the one the proof carried, in every mode; a challenge without a
// DPoP-Nonce, or with the nonce sent, costs the server no second request:
// the caller gets it as the server sent it, as it gets a retry's
// challenge, without the token, nothing purged and no challenge counted.
func TestRetryDPoPNonceOverHTTP(t *testing.T) {
	const token = "tok-7f3a9c"
	for _, tt := range []struct {
		name string
		mode string
		held string // the key's nonce for the server before the request; "" none
		// answer is the challenge's DPoP-Nonce: "new" the nonce demanded,
		// "sent" the one the proof carried, "" none.
		answer string
		// rotate: the server demands another nonce for each request, so the
		// retry is challenged too; else it demands n-2.
		rotate        bool
		wantNonces    []string // the nonces of the proofs the server received
		wantCode      int
		wantChallenge int // NonceChallenged calls
	}{
		{name: "no nonce held, a new one: retried with it", answer: "new",
			wantNonces: []string{"", "n-2"}, wantCode: 200, wantChallenge: 1},
		{name: "a stale nonce, a new one: retried with it", held: "n-1", answer: "new",
			wantNonces: []string{"n-1", "n-2"}, wantCode: 200, wantChallenge: 1},
		{name: "retry off: a new nonce: retried with it", mode: "off", held: "n-1", answer: "new",
			wantNonces: []string{"n-1", "n-2"}, wantCode: 200, wantChallenge: 1},
		{name: "any: a new nonce: retried with it", mode: "any", answer: "new",
			wantNonces: []string{"", "n-2"}, wantCode: 200, wantChallenge: 1},
		{name: "a new nonce, the retry challenged too: its 401 passed on", answer: "new", rotate: true,
			wantNonces: []string{"", "n-2"}, wantCode: 401, wantChallenge: 1},
		{name: "no nonce held, no DPoP-Nonce: passed on", wantNonces: []string{""}, wantCode: 401},
		{name: "a stale nonce, no DPoP-Nonce: passed on", held: "n-1", wantNonces: []string{"n-1"}, wantCode: 401},
		{name: "the nonce sent again: passed on", held: "n-1", answer: "sent", wantNonces: []string{"n-1"}, wantCode: 401},
		{name: "retry off: no DPoP-Nonce: passed on", mode: "off", held: "n-1", wantNonces: []string{"n-1"}, wantCode: 401},
		{name: "retry off: the nonce sent again: passed on", mode: "off", held: "n-1", answer: "sent",
			wantNonces: []string{"n-1"}, wantCode: 401},
		{name: "any: no DPoP-Nonce: passed on, nothing purged", mode: "any", wantNonces: []string{""}, wantCode: 401},
		{name: "any: the nonce sent again: passed on, nothing purged", mode: "any", held: "n-1", answer: "sent",
			wantNonces: []string{"n-1"}, wantCode: 401},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var (
				mu      sync.Mutex
				nonces  []string // of the proofs received
				refused []string // requests refused for another reason than the nonce
				checker dpoptest.Checker
			)
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				body, _ := io.ReadAll(r.Body)
				p, err := dpoptest.Verify(r.Header.Get(DPoPHeader))
				mu.Lock()
				nonces = append(nonces, p.Nonce)
				demanded := "n-2"
				if tt.rotate {
					demanded = "n-" + strconv.Itoa(len(nonces)+1)
				}
				mu.Unlock()
				if err == nil {
					_, err = checker.Check(r.Header.Get(DPoPHeader), dpoptest.Want{Method: r.Method,
						URL: "http://" + r.Host + r.URL.EscapedPath(), AccessToken: token,
						Nonce: func(n string) bool { return n == demanded }})
				}
				if ce := (*dpoptest.CheckError)(nil); errors.As(err, &ce) && ce.Reason == dpoptest.ReasonNonce {
					switch tt.answer {
					case "new":
						w.Header().Set("DPoP-Nonce", demanded)
					case "sent":
						w.Header().Set("DPoP-Nonce", p.Nonce)
					}
					w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`)
					w.WriteHeader(http.StatusUnauthorized)
					fmt.Fprint(w, `{"error":"use_dpop_nonce"}`)
					return
				}
				if err == nil && (r.Header.Get("Authorization") != "DPoP "+token || string(body) != "payload") {
					err = fmt.Errorf("Authorization %d bytes, body %q", len(r.Header.Get("Authorization")), body)
				}
				if err != nil {
					mu.Lock()
					refused = append(refused, err.Error())
					mu.Unlock()
					w.WriteHeader(http.StatusBadRequest)
					return
				}
				fmt.Fprint(w, "accounts")
			}))
			defer srv.Close()
			srvURL, err := url.Parse(srv.URL)
			if err != nil {
				t.Fatal(err)
			}

			k := dpoptest.NewKey(t)
			if err := k.SetNonce(dpop.ResourceServer, srvURL, tt.held); err != nil {
				t.Fatal(err)
			}
			d := NewDPoP(k)
			d.SetToken("DPoP "+token, wantATH(token))
			// next is reverse_proxy with the token_broker_dpop transport:
			// the proof goes on a copy of the request sent, the answer's
			// nonce is observed, and the answer is copied to w.
			next := HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				req, err := http.NewRequestWithContext(r.Context(), r.Method, srv.URL+r.URL.Path, r.Body)
				if err != nil {
					return err
				}
				req.Header, req.ContentLength = r.Header.Clone(), r.ContentLength
				sent, err := d.SignCopy(req, "", "", time.Now())
				if err != nil {
					return err
				}
				resp, err := srv.Client().Do(sent)
				if err != nil {
					return err
				}
				defer resp.Body.Close()
				d.Observe(sent, resp.Header)
				maps.Copy(w.Header(), resp.Header)
				w.WriteHeader(resp.StatusCode)
				_, err = io.Copy(w, resp.Body)
				return err
			})
			tokens := &fakeTokens{fresh: dpopEntry{entry{broker.Token{Value: "new"}}}}
			challenges := 0
			rt := Retry{Mode: tt.mode, Tokens: tokens, DPoP: d, NonceChallenged: func(*broker.Binding) { challenges++ }}
			r := httptest.NewRequest("POST", "/accounts", strings.NewReader("payload"))
			out := Contract{}
			out.Prepare(r, "DPoP "+token)
			w := httptest.NewRecorder()
			if err := rt.Forward(w, r, next, out, &broker.Binding{}, dpopEntry{entry{broker.Token{Value: token}}}); err != nil {
				t.Fatal(err)
			}

			mu.Lock()
			defer mu.Unlock()
			if len(refused) > 0 {
				t.Fatalf("the server refused proofs or requests: %q", refused)
			}
			if !slices.Equal(nonces, tt.wantNonces) {
				t.Errorf("the server got %d requests with proof nonces %q, want %q", len(nonces), nonces, tt.wantNonces)
			}
			if w.Code != tt.wantCode || challenges != tt.wantChallenge || len(tokens.events) > 0 {
				t.Errorf("caller got %d, %d challenges counted, events %q; want %d, %d, none",
					w.Code, challenges, tokens.events, tt.wantCode, tt.wantChallenge)
			}
			if a, p := w.Header().Values("Authorization"), w.Header().Values(DPoPHeader); len(a)+len(p) > 0 ||
				strings.Contains(fmt.Sprint(w.Header()), token) || strings.Contains(w.Body.String(), token) {
				t.Errorf("the caller's answer carries the token or a proof: %v %q", w.Header(), w.Body)
			}
			if tt.wantCode != http.StatusUnauthorized {
				return
			}
			// The server's last challenge, as it sent it.
			wantNonce := map[string][]string{"new": {"n-" + strconv.Itoa(len(nonces)+1)}, "sent": {tt.held}}[tt.answer]
			if got := w.Header().Values("DPoP-Nonce"); !slices.Equal(got, wantNonce) || w.Body.String() != `{"error":"use_dpop_nonce"}` ||
				!strings.HasPrefix(w.Header().Get("WWW-Authenticate"), `DPoP error="use_dpop_nonce"`) {
				t.Errorf("caller got DPoP-Nonce %q, WWW-Authenticate %q, body %q: want the server's challenge (DPoP-Nonce %q)",
					got, w.Header().Get("WWW-Authenticate"), w.Body, wantNonce)
			}
		})
	}
}

// HandlerFunc is a Next made of a function.
type HandlerFunc func(http.ResponseWriter, *http.Request) error

func (f HandlerFunc) ServeHTTP(w http.ResponseWriter, r *http.Request) error { return f(w, r) }

func TestRetryCheckMode(t *testing.T) {
	for _, tt := range []struct {
		mode string
		ok   bool
	}{{"", true}, {"invalid_token", true}, {"any", true}, {"off", true}, {"always", false}, {"ANY", false}} {
		err := Retry{Mode: tt.mode}.Check()
		if (err == nil) != tt.ok {
			t.Errorf("mode %q: Check() = %v, want ok=%v", tt.mode, err, tt.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "retry_on_401") {
			t.Errorf("error %q does not name retry_on_401", err)
		}
	}
}

// TestChallengeError: the error code of an upstream's 401 is read from
// every Bearer or DPoP challenge, as RFC 9110 §11.6.1 lets a server write
// them: several challenges in one field, a parameter's name in any letter
// case, its value a token or a quoted-string, white space around "=".
// The code of another scheme's challenge, or one quoted inside another
// parameter's value, does not count.
func TestChallengeError(t *testing.T) {
	for _, tt := range []struct {
		field          string
		rejects, nonce bool
	}{
		{`Bearer error="invalid_token"`, true, false},
		{`Bearer realm="api", error="invalid_token", error_description="expired"`, true, false},
		{`bearer ERROR="invalid_token"`, true, false},
		{`Bearer error=invalid_token`, true, false},
		{`Bearer error = "invalid_token"`, true, false},
		{`DPoP error="invalid_token", algs="ES256 PS256"`, true, false},
		{`Basic realm="simple", Bearer error="invalid_token"`, true, false},
		{`Bearer realm="api", DPoP algs="ES256", error="invalid_token"`, true, false},
		{`DPoP error="use_dpop_nonce"`, false, true},
		{`DPoP error=use_dpop_nonce, error_description="nonce required"`, false, true},
		{`Bearer, DPoP error="use_dpop_nonce"`, false, true},
		{`Bearer realm="api", DPoP algs="ES256 PS256", error="use_dpop_nonce"`, false, true},
		{`Bearer`, false, false},
		{`Bearer error="insufficient_scope"`, false, false},
		{`Bearer error="invalid_token_x"`, false, false},
		{`Basic error="invalid_token"`, false, false},
		{`Basic realm="x", Newauth error="invalid_token"`, false, false},
		{`Bearer error_description="error=\"invalid_token\""`, false, false},
		{`Bearer realm="error=\"use_dpop_nonce\", ok"`, false, false},
		{`Basic dXNlcjpwYXNz==, Bearer error="invalid_token"`, true, false},
	} {
		h := http.Header{"Www-Authenticate": {tt.field}}
		if got := rejectsToken("", http.StatusUnauthorized, h); got != tt.rejects {
			t.Errorf("%s: rejects the token %v, want %v", tt.field, got, tt.rejects)
		}
		if got := nonceChallenge(http.StatusUnauthorized, h); got != tt.nonce {
			t.Errorf("%s: nonce challenge %v, want %v", tt.field, got, tt.nonce)
		}
	}
}

// TestChallengeErrorAllocs: reading a typical upstream 401's challenges
// (quoted values without quoted-pairs) allocates nothing.
func TestChallengeErrorAllocs(t *testing.T) {
	h := http.Header{}
	h.Set("WWW-Authenticate", `Bearer realm="api", error="invalid_token", error_description="The access token expired"`)
	h.Add("WWW-Authenticate", `DPoP algs="ES256 PS256", error="use_dpop_nonce"`)
	allocs := testing.AllocsPerRun(100, func() {
		if !rejectsToken("", http.StatusUnauthorized, h) || !nonceChallenge(http.StatusUnauthorized, h) {
			t.Fatal("the challenges were not read")
		}
	})
	if allocs != 0 {
		t.Errorf("reading a 401's challenges: %v allocations, want 0", allocs)
	}
}

// TestRetryStartsFromTheRequestHeaders: a later handler that changes the
// request's headers in place (Caddy's request_header in a route after
// token_broker) does so again on the retry, which starts from the headers
// as they were when Forward got the request.
func TestRetryStartsFromTheRequestHeaders(t *testing.T) {
	var seen []http.Header
	next := HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		r.Header.Add("X-Forwarded-Prefix", "/v1") // request_header +X-Forwarded-Prefix /v1
		r.Header.Del("X-Debug")                   // request_header -X-Debug
		r.Header["Accept"][0] = "text/" + r.Header["Accept"][0]
		seen = append(seen, r.Header.Clone())
		if len(seen) == 1 {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
			w.WriteHeader(http.StatusUnauthorized)
		}
		return nil
	})
	r := httptest.NewRequest("POST", "/pay", strings.NewReader("body"))
	r.Header.Set("X-Debug", "1")
	r.Header.Set("Accept", "plain")
	out := Contract{}
	out.Prepare(r, "Bearer old")
	tokens := &fakeTokens{fresh: entry{broker.Token{Value: "new"}}}
	w := httptest.NewRecorder()
	if err := (Retry{Tokens: tokens}).Forward(w, r, next, out, &broker.Binding{}, entry{broker.Token{Value: "old"}}); err != nil {
		t.Fatal(err)
	}
	if len(seen) != 2 || w.Code != http.StatusOK {
		t.Fatalf("%d attempts, status %d: want a retry answered 200", len(seen), w.Code)
	}
	seen[0].Set("Authorization", "Bearer new")
	if fmt.Sprint(seen[1]) != fmt.Sprint(seen[0]) {
		t.Errorf("the retry left with headers\n%v\nwant those of the first attempt, with the new token\n%v", seen[1], seen[0])
	}
}

// typicalAPIHeaders is an API request's headers: a dozen, one repeated.
func typicalAPIHeaders() http.Header {
	h := http.Header{}
	for _, kv := range [][2]string{
		{"Accept", "application/json"}, {"Accept-Encoding", "gzip"}, {"Content-Type", "application/json"},
		{"User-Agent", "shop/1.2"}, {"X-Request-Id", "4f1c"}, {"X-Forwarded-For", "10.0.0.1"},
		{"X-Forwarded-Proto", "https"}, {"X-Forwarded-Host", "shop.example"}, {"Traceparent", "00-4bf9-00f0-01"},
		{"Idempotency-Key", "k-1"}, {"Cache-Control", "no-cache"}, {"Cookie", "a=1"}, {"Cookie", "b=2"},
	} {
		h.Add(kv[0], kv[1])
	}
	return h
}

// TestForwardKeepsTypicalHeadersWithoutAllocating: keeping a replayable
// request's headers for a retry costs no allocation for a typical API
// request: its first attempt allocates as much as one without headers.
func TestForwardKeepsTypicalHeadersWithoutAllocating(t *testing.T) {
	next := HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		w.WriteHeader(http.StatusOK)
		return nil
	})
	allocs := func(h http.Header) float64 {
		r := httptest.NewRequest("GET", "/pay", nil)
		r.Header = h
		w := httptest.NewRecorder()
		rt := Retry{Tokens: &fakeTokens{}}
		b, e := &broker.Binding{}, entry{broker.Token{Value: "old"}}
		return testing.AllocsPerRun(100, func() {
			if err := rt.Forward(w, r, next, Contract{}, b, e); err != nil {
				t.Fatal(err)
			}
		})
	}
	if bare, typical := allocs(http.Header{}), allocs(typicalAPIHeaders()); typical != bare {
		t.Errorf("a request with %d headers: %v allocations, want %v as without headers", len(typicalAPIHeaders()), typical, bare)
	}
}

// TestHeaderSnapshotRestores: a restored header map has the entries taken,
// whatever was done to the map and its values in place since, also when a
// header does not fit the snapshot's arrays, and again on a second restore.
func TestHeaderSnapshotRestores(t *testing.T) {
	// headers has keys keys with values values in all (at least one
	// per key; the rest go to the first key).
	headers := func(keys, values int) http.Header {
		h := http.Header{}
		for i := range keys {
			h.Set(fmt.Sprintf("X-H%d", i), "v")
		}
		h["X-H0"] = append(h["X-H0"], slices.Repeat([]string{"w"}, values-keys)...)
		return h
	}
	for _, tt := range []struct {
		name string
		h    http.Header
	}{
		{"none", http.Header{}},
		{"typical", typicalAPIHeaders()},
		{"an empty value list", http.Header{"X-Empty": {}, "Accept": {"a"}}},
		{"a nil value", http.Header{"X-Nil": nil, "Accept": {"a"}}},
		{"as many keys as kept inline", headers(16, 16)},
		{"as many values as kept inline", headers(1, 24)},
		{"as many keys and values as kept inline", headers(16, 24)},
		{"more keys than kept inline", headers(20, 20)},
		{"more values than kept inline", headers(1, 30)},
	} {
		h, want := tt.h.Clone(), tt.h.Clone()
		var s headerSnapshot
		s.take(h)
		for range 2 {
			for k, v := range h {
				if len(v) > 0 {
					v[0] = "changed"
				}
				h[k] = append(v, "added")
			}
			h.Set("X-Later", "1")
			s.restore(h)
			if !reflect.DeepEqual(h, want) {
				t.Errorf("%s: restored %v, want %v", tt.name, h, want)
			}
		}
	}
}

// rejectOld answers w 401 invalid_token, as an upstream answers the token
// "old" that forwardOld sends first.
func rejectOld(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
	w.WriteHeader(http.StatusUnauthorized)
}

// forwardOld forwards a GET carrying the token "old" through rt to next,
// the broker's fresh token being "new"; it returns the request as next
// left it, the caller's answer and what the broker was told.
func forwardOld(rt Retry, next Next) (*http.Request, *httptest.ResponseRecorder, *fakeTokens, error) {
	r := httptest.NewRequest("GET", "/pay", nil)
	out := Contract{}
	out.Prepare(r, "Bearer old")
	rt.Tokens = &fakeTokens{fresh: entry{broker.Token{Value: "new"}}}
	w := httptest.NewRecorder()
	err := rt.Forward(w, r, next, out, &broker.Binding{}, entry{broker.Token{Value: "old"}})
	return r, w, rt.Tokens.(*fakeTokens), err
}

// TestRetryAcceptedOnlyWhenTheUpstreamTookTheToken: a retry after a
// rejection tells the broker the fresh token was accepted (which lifts the
// key's hold on purges) only when the retry's answer shows the upstream
// took it: not a 401 of any kind (a bare one, or a nonce challenge), a 429
// or a 5xx, which a caller can provoke (load, a path) and which say
// nothing of the token.
func TestRetryAcceptedOnlyWhenTheUpstreamTookTheToken(t *testing.T) {
	for _, tt := range []struct {
		name     string
		status   int
		header   string // the retry's WWW-Authenticate
		accepted bool
	}{
		{"200", http.StatusOK, "", true},
		{"302", http.StatusFound, "", true},
		{"403 insufficient_scope", http.StatusForbidden, `Bearer error="insufficient_scope"`, true},
		{"404", http.StatusNotFound, "", true},
		{"401 without an error code", http.StatusUnauthorized, `Bearer realm="api"`, false},
		{"401 without a challenge", http.StatusUnauthorized, "", false},
		{"401 nonce challenge", http.StatusUnauthorized, `DPoP error="use_dpop_nonce"`, false},
		{"429", http.StatusTooManyRequests, "", false},
		{"503", http.StatusServiceUnavailable, "", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			attempts := 0
			next := HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				if attempts++; attempts == 1 {
					rejectOld(w)
					return nil
				}
				if tt.header != "" {
					w.Header().Set("WWW-Authenticate", tt.header)
				}
				w.WriteHeader(tt.status)
				return nil
			})
			_, w, tokens, err := forwardOld(Retry{}, next)
			if err != nil {
				t.Fatal(err)
			}
			if attempts != 2 || w.Code != tt.status {
				t.Fatalf("%d attempts, caller got %d: want the retry's %d", attempts, w.Code, tt.status)
			}
			if got := tokens.accepted == "new"; got != tt.accepted {
				t.Errorf("fresh token reported accepted: %t, want %t", got, tt.accepted)
			}
		})
	}
}

// TestFailedForwardWithdrawsTheToken: when the chain after the handler
// fails (reverse_proxy's 502, on the first attempt or on the retry after a
// 401, in every mode), Caddy's error routes get the request without the
// token; a request answered keeps it.
func TestFailedForwardWithdrawsTheToken(t *testing.T) {
	unreachable := errors.New("upstream unreachable")
	for _, tt := range []struct {
		name    string
		mode    string
		fail    []bool // per attempt: next returns an error (else the first attempt's 401 invalid_token, then 200)
		wantErr bool
	}{
		{"answered", "", []bool{false, false}, false},
		{"first attempt fails", "", []bool{true}, true},
		{"retry off, fails", "off", []bool{true}, true},
		{"retry fails", "", []bool{false, true}, true},
	} {
		t.Run(tt.name, func(t *testing.T) {
			attempts := 0
			next := HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				attempts++
				if tt.fail[attempts-1] {
					return unreachable
				}
				if attempts == 1 {
					rejectOld(w)
					return nil
				}
				w.WriteHeader(http.StatusOK)
				return nil
			})
			r, _, _, err := forwardOld(Retry{Mode: tt.mode}, next)
			if (err != nil) != tt.wantErr || attempts != len(tt.fail) {
				t.Fatalf("%d attempts, error %v: want %d attempts, an error %t", attempts, err, len(tt.fail), tt.wantErr)
			}
			got := r.Header.Values("Authorization")
			if tt.wantErr && len(got) != 0 {
				t.Errorf("the failed request still carries Authorization %q into the error routes", got)
			}
			if !tt.wantErr && len(got) != 1 {
				t.Errorf("the answered request carries Authorization %q, want the token", got)
			}
		})
	}
}
