package outbound

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// entry is a token as the retry sees it.
type entry struct{ tok broker.Token }

func (e entry) Header() string      { return "Bearer " + string(e.tok.Value) }
func (e entry) Token() broker.Token { return e.tok }

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

// upstream answers 401 invalid_token to the token bad (any request when
// bad is "*") and 200 otherwise; alter changes the request first.
type upstream struct {
	bad    string
	plain  bool   // the 401 has no WWW-Authenticate
	scheme string // of the 401's challenge; default Bearer
	nonce  int    // the first nonce requests are answered use_dpop_nonce
	alter  func(*http.Request)
	seen   []string
}

func (u *upstream) ServeHTTP(w http.ResponseWriter, r *http.Request) error {
	if u.alter != nil {
		u.alter(r)
	}
	u.seen = append(u.seen, r.Header.Get("Authorization"))
	if u.nonce > 0 {
		u.nonce--
		w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`)
		w.Header().Set("DPoP-Nonce", "n-1")
		w.WriteHeader(http.StatusUnauthorized)
		return nil
	}
	if u.bad == "*" || r.Header.Get("Authorization") == "Bearer "+u.bad {
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
			wantSeen: []string{"Bearer old"}, wantEvents: []string{"purge old", "get"}, wantErr: new(*ConsentError)},
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
		{name: "nonce challenge: same token again, nothing purged", up: &upstream{bad: "none", nonce: 1}, wantStatus: 200,
			wantSeen: []string{"Bearer old", "Bearer old"}, wantNonce: 1},
		{name: "any: nonce challenge is not a rejection", mode: "any", up: &upstream{bad: "none", nonce: 1}, wantStatus: 200,
			wantSeen: []string{"Bearer old", "Bearer old"}, wantNonce: 1},
		{name: "nonce challenge twice: the second is the caller's", up: &upstream{bad: "none", nonce: 2}, wantStatus: 401,
			wantSeen: []string{"Bearer old", "Bearer old"}, wantNonce: 1},
		{name: "nonce challenge then the token rejected: purged", up: &upstream{bad: "old", nonce: 1}, wantStatus: 401,
			wantSeen: []string{"Bearer old", "Bearer old"}, wantEvents: []string{"purge old"}, wantNonce: 1},
		{name: "nonce challenge, body over the limit: passed on", body: strings.Repeat("x", DefaultRetryBodyLimit+1),
			up: &upstream{bad: "none", nonce: 1}, wantStatus: 401, wantSeen: []string{"Bearer old"}, wantNonce: 1},
		{name: "body over the limit: purged, not retried", body: strings.Repeat("x", DefaultRetryBodyLimit+1),
			up: &upstream{bad: "old"}, fresh: fresh, wantStatus: 401, wantSeen: []string{"Bearer old"}, wantEvents: []string{"purge old"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			tokens := &fakeTokens{fresh: tt.fresh, err: tt.err}
			nonces := 0
			rt := Retry{Mode: tt.mode, Tokens: tokens, NonceChallenged: func(*broker.Binding) { nonces++ }}
			out := Contract{Token: "Authorization"}
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

// TestRetryUnsigned: with a DPoP binding, an answer to a request no
// transport signed is dropped and Forward says ErrUnsigned, in every mode;
// a signed one passes, and a nonce challenge is retried and signed again.
func TestRetryUnsigned(t *testing.T) {
	k := testKey(t)
	for _, tt := range []struct {
		name     string
		mode     string
		sign     bool
		nonce    int
		wantErr  error
		wantCode int
		wantSeen int
	}{
		{name: "unsigned", wantErr: ErrUnsigned, wantSeen: 1},
		{name: "unsigned, retry off", mode: "off", wantErr: ErrUnsigned, wantSeen: 1},
		{name: "signed", sign: true, wantCode: 200, wantSeen: 1},
		{name: "signed, retry off", mode: "off", sign: true, wantCode: 200, wantSeen: 1},
		{name: "signed, nonce challenge retried", sign: true, nonce: 1, wantCode: 200, wantSeen: 2},
		{name: "signed, retry off: nonce challenge passed on", mode: "off", sign: true, nonce: 1, wantCode: 401, wantSeen: 1},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d := AcquireDPoP(k)
			defer d.Release()
			up := &upstream{bad: "none", nonce: tt.nonce}
			if tt.sign {
				up.alter = func(r *http.Request) {
					if _, err := d.Sign(r, time.Now()); err != nil {
						t.Error(err)
					}
				}
			}
			tokens := &fakeTokens{}
			rt := Retry{Mode: tt.mode, Tokens: tokens, DPoP: d}
			out := Contract{Token: "Authorization"}
			r := httptest.NewRequest("GET", "/accounts", nil)
			out.Prepare(r, "DPoP tok")
			w := httptest.NewRecorder()
			err := rt.Forward(w, r, up, out, &broker.Binding{}, entry{broker.Token{Value: "tok"}})
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("err %v, want %v", err, tt.wantErr)
			}
			if tt.wantErr != nil && (w.Body.Len() > 0 || len(w.Header()) > 0) {
				t.Errorf("the unsigned request's answer was written: %v %q", w.Header(), w.Body)
			}
			if tt.wantErr == nil && w.Code != tt.wantCode {
				t.Errorf("status %d, want %d", w.Code, tt.wantCode)
			}
			if len(up.seen) != tt.wantSeen || len(tokens.events) != 0 {
				t.Errorf("upstream saw %d requests, events %q; want %d and none", len(up.seen), tokens.events, tt.wantSeen)
			}
		})
	}
}
