package module

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"testing/iotest"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
)

// TestOutboundCheckWiring: the handler refuses what its outbound contract
// refuses (the token and merchant headers of its config, the method) before
// the caller policy, the merchant and the token; the contract's own cases are
// in broker/outbound.
func TestOutboundCheckWiring(t *testing.T) {
	for _, tt := range []struct {
		name       string
		method     string
		trailers   []string
		wantStatus int
		wantCode   string
	}{
		{"Authorization trailer", "POST", []string{"Authorization"}, 400, "forbidden_trailer"},
		{"merchant trailer", "POST", []string{"X-Checksum", "X-Merchant-Id"}, 400, "forbidden_trailer"},
		{"TRACE", "TRACE", nil, 405, "method_refused"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, okSource(&calls), "json")
			r := httptest.NewRequest(tt.method, "/", strings.NewReader("x"))
			r.Header.Set("X-Merchant-Id", "acme")
			for _, name := range tt.trailers {
				if r.Trailer == nil {
					r.Trailer = http.Header{}
				}
				r.Trailer[name] = nil
			}
			rec, got, _ := serve(t, h, r)
			if got != nil || rec.Code != tt.wantStatus || !strings.Contains(rec.Body.String(), tt.wantCode) || calls.Load() != 0 {
				t.Fatalf("forwarded %v, %d %s, %d token calls: want %d %s and no token call", got != nil, rec.Code, rec.Body, calls.Load(), tt.wantStatus, tt.wantCode)
			}
		})
	}
}

// trailingBody fills its request's trailers when it ends, as net/http does
// with a chunked body's trailer section.
type trailingBody struct {
	io.Reader
	r        *http.Request
	trailers http.Header
}

func (b *trailingBody) Read(p []byte) (int, error) {
	n, err := b.Reader.Read(p)
	if err == io.EOF {
		for k, v := range b.trailers {
			b.r.Trailer[k] = v
		}
	}
	return n, err
}

func (*trailingBody) Close() error { return nil }

// TestUndeclaredTrailersDropped: a trailer naming an owned header that the
// caller did not declare arrives with the end of the body; it is gone by the
// time the next handler sees the end.
func TestUndeclaredTrailersDropped(t *testing.T) {
	var calls atomic.Int64
	h := newTestHandler(t, okSource(&calls), "json")
	h.RetryOn401 = "off"
	r := httptest.NewRequest("POST", "/", nil)
	r.Header.Set("X-Merchant-Id", "acme")
	r.ContentLength = -1
	r.Trailer = http.Header{"X-Checksum": nil}
	r.Body = &trailingBody{Reader: strings.NewReader("payload"), r: r, trailers: http.Header{
		"X-Checksum": {"abc"}, "Authorization": {"Bearer x"}, "X-Merchant-Id": {"globex"}}}
	repl := caddy.NewReplacer()
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, repl))
	var trailers http.Header
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		if _, err := io.Copy(io.Discard, r.Body); err != nil {
			return err
		}
		trailers = r.Trailer.Clone()
		return nil
	})
	if err := h.ServeHTTP(httptest.NewRecorder(), r, next); err != nil {
		t.Fatal(err)
	}
	want := http.Header{"X-Checksum": {"abc"}}
	if len(trailers) != 1 || trailers.Get("X-Checksum") != "abc" {
		t.Fatalf("trailers at next = %v, want %v", trailers, want)
	}
}

// reject401 answers like an upstream that does not accept the token.
func reject401(w http.ResponseWriter) {
	w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
	w.WriteHeader(http.StatusUnauthorized)
}

// TestUpstream401WithoutTheTokenKeepsIt: a later handler removed the token
// (or a Connection option would have): the 401 is not about the token, so
// it is neither purged nor fetched again.
func TestUpstream401WithoutTheTokenKeepsIt(t *testing.T) {
	for _, tt := range []struct {
		name  string
		alter func(http.Header)
	}{
		{"token removed", func(h http.Header) { delete(h, "Authorization") }},
		{"token replaced", func(h http.Header) { h.Set("Authorization", "Bearer nope") }},
		{"Connection naming it added", func(h http.Header) { h.Set("Connection", "Authorization") }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, okSource(&calls), "json")
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				tt.alter(r.Header)
				reject401(w)
				return nil
			})
			for range 5 {
				r := httptest.NewRequest("GET", "/", nil)
				r.Header.Set("X-Merchant-Id", "acme")
				r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
				rec := httptest.NewRecorder()
				if err := h.ServeHTTP(rec, r, next); err != nil || rec.Code != 401 {
					t.Fatalf("status %d err %v, want the upstream's 401", rec.Code, err)
				}
			}
			if calls.Load() != 1 {
				t.Fatalf("token requests = %d, want 1", calls.Load())
			}
		})
	}
}

// TestRetryBuffersOnlyKnownSmallBodies: a body is read before forwarding
// only when its length is known and small and it is not Incremental; a
// streamed upload reaches the next handler before it ends, and is not
// retried.
func TestRetryBuffersOnlyKnownSmallBodies(t *testing.T) {
	for _, tt := range []struct {
		name        string
		length      int64 // Content-Length; -1 chunked
		incremental bool
		wantRetry   bool
	}{
		{"known small length: buffered and retried", 7, false, true},
		{"chunked: streamed", -1, false, false},
		{"Incremental with a known length: streamed", 7, true, false},
		{"Incremental chunked: streamed", -1, true, false},
		{"over retry_body_limit: streamed", 1 << 20, false, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
				n := calls.Add(1)
				return broker.Token{Value: broker.Secret("tok-" + string(rune('0'+n))), Expiry: time.Now().Add(time.Hour)}, nil
			}, "json")
			pr, pw := io.Pipe()
			defer pw.Close()
			r := httptest.NewRequest("POST", "/", nil)
			r.Body, r.ContentLength = pr, tt.length
			r.Header.Set("X-Merchant-Id", "acme")
			if tt.incremental {
				r.Header.Set("Incremental", "?1")
			}
			r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))

			reached := make(chan struct{}, 2)
			var bodies []string
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				reached <- struct{}{}
				b, _ := io.ReadAll(r.Body)
				bodies = append(bodies, string(b))
				if r.Header.Get("Authorization") == "Bearer tok-1" {
					reject401(w)
					return nil
				}
				w.WriteHeader(200)
				return nil
			})
			rec := httptest.NewRecorder()
			done := make(chan error, 1)
			go func() { done <- h.ServeHTTP(rec, r, next) }()
			if tt.wantRetry {
				pw.Write([]byte("payload"))
				pw.Close()
			}
			select {
			case <-reached:
			case <-time.After(20 * time.Second):
				t.Fatal("the next handler was not reached before the body ended: the upload stalls")
			}
			if !tt.wantRetry {
				pw.Write([]byte("payload"))
				pw.Close()
			}
			if err := <-done; err != nil {
				t.Fatal(err)
			}
			wantStatus, wantBodies := 401, []string{"payload"}
			if tt.wantRetry {
				wantStatus, wantBodies = 200, []string{"payload", "payload"}
			}
			if rec.Code != wantStatus || !slices.Equal(bodies, wantBodies) {
				t.Fatalf("status %d, bodies at next %q; want %d, %q", rec.Code, bodies, wantStatus, wantBodies)
			}
		})
	}
}

// TestBuffered401BodyIsBounded: a 401 is held back so that the request can be
// retried, but only up to maxHeldBody: a longer answer goes on to the
// caller as it comes (and the token is still purged).
func TestBuffered401BodyIsBounded(t *testing.T) {
	var calls atomic.Int64
	h := newTestHandler(t, okSource(&calls), "json")
	const size = 1 << 20
	chunk := bytes.Repeat([]byte("x"), 4<<10)
	rec := httptest.NewRecorder()
	var passedOnEarly bool
	var attempts int
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		attempts++
		reject401(w)
		for range size / len(chunk) {
			if _, err := w.Write(chunk); err != nil {
				return err
			}
		}
		passedOnEarly = rec.Body.Len() > 0
		return nil
	})
	r := httptest.NewRequest("GET", "/", nil)
	r.Header.Set("X-Merchant-Id", "acme")
	r = r.WithContext(context.WithValue(r.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
	if err := h.ServeHTTP(rec, r, next); err != nil {
		t.Fatal(err)
	}
	if !passedOnEarly {
		t.Fatal("a 1 MiB 401 body was held in memory instead of passed on")
	}
	if rec.Code != 401 || rec.Body.Len() != size || attempts != 1 {
		t.Fatalf("status %d, %d bytes, %d attempts; want the whole 401 and no retry", rec.Code, rec.Body.Len(), attempts)
	}
	if _, _, err := h.broker.Get(context.Background(), &h.bindings.Peek("acme").Binding); err != nil || calls.Load() != 2 {
		t.Fatalf("token requests = %d (%v), want 2: the rejected token was purged", calls.Load(), err)
	}
}

func TestRetryBodyLimitValidated(t *testing.T) {
	for _, tt := range []struct {
		limit int64
		ok    bool
	}{{-1, false}, {0, true}, {64 << 10, true}, {outbound.MaxRetryBodyLimit, true}, {outbound.MaxRetryBodyLimit + 1, false}, {1 << 40, false}} {
		h := &Handler{Errors: "json", RetryBodyLimit: tt.limit}
		err := h.Validate()
		if (err == nil) != tt.ok {
			t.Errorf("retry_body_limit %d: Validate() = %v, want ok=%v", tt.limit, err, tt.ok)
		}
		if err != nil && !strings.Contains(err.Error(), "retry_body_limit") {
			t.Errorf("error %q does not name retry_body_limit", err)
		}
	}
}

// TestUnreadableBodyAnsweredJSON: a body that ends before its
// Content-Length while it is read for the retry is answered like every
// other refusal, 400 with the JSON body (or a caddyhttp.Error with
// `errors caddy`), and is not forwarded.
func TestUnreadableBodyAnsweredJSON(t *testing.T) {
	for _, mode := range []string{"json", "caddy"} {
		t.Run(mode, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, okSource(&calls), mode)
			r := httptest.NewRequest("POST", "/", io.MultiReader(strings.NewReader("half"), iotest.ErrReader(io.ErrUnexpectedEOF)))
			r.ContentLength = 10
			r.Header.Set("X-Merchant-Id", "acme")
			rec, got, err := serve(t, h, r)
			if got != nil {
				t.Fatal("forwarded")
			}
			if mode == "caddy" {
				if he := (caddyhttp.HandlerError{}); !errors.As(err, &he) || he.StatusCode != 400 || !strings.Contains(he.Error(), "unreadable_body") {
					t.Fatalf("err = %v, want a caddyhttp.Error 400 unreadable_body", err)
				}
				return
			}
			if err != nil || rec.Code != 400 || !strings.Contains(rec.Body.String(), `"error":"unreadable_body"`) {
				t.Fatalf("%v, %d %q: want 400 with the JSON body of unreadable_body", err, rec.Code, rec.Body)
			}
		})
	}
}

// TestForwardAllocations: forwarding a GET on a bearer route allocates
// once, the first attempt's recorder (outbound.Retry.Forward): the
// retry's hooks (the tokens, the nonce counters) are made once, in
// instrument, not for each request.
func TestForwardAllocations(t *testing.T) {
	h := dpopHandler(t, false)
	b := h.bindings.Peek("acme")
	e, _, err := h.broker.Get(context.Background(), &b.Binding)
	if err != nil {
		t.Fatal(err)
	}
	out := h.outbound()
	req := httptest.NewRequest("GET", "/accounts", nil)
	rec := httptest.NewRecorder()
	ok := caddyhttp.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) error {
		w.WriteHeader(http.StatusOK)
		return nil
	})
	n := testing.AllocsPerRun(200, func() {
		if err := h.forward(rec, req, ok, out, b, e); err != nil {
			t.Fatal(err)
		}
	})
	if n != 1 {
		t.Errorf("forward allocates %.0f times, want 1 (the first attempt's recorder)", n)
	}
}

// TestRetryAnsweredWithoutTheTokenTakenMintsNoTokens: a resource server
// answers invalid_token to every request's first attempt (a wrong tenant on
// a path the caller picks) and its retry with an answer that says nothing
// of the token (a 503 under load, a bare 401). The retries do not count as
// the fresh token accepted: the key's purges are held, so ten requests
// cost at most two token requests.
func TestRetryAnsweredWithoutTheTokenTakenMintsNoTokens(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
		header string // the retry's WWW-Authenticate
	}{
		{"503", http.StatusServiceUnavailable, ""},
		{"bare 401", http.StatusUnauthorized, `Bearer realm="api"`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
				n := calls.Add(1)
				return broker.Token{Value: broker.Secret(fmt.Sprintf("tok-%d", n)), Expiry: time.Now().Add(time.Hour)}, nil
			}, "json")
			for i := range 10 {
				attempt := 0
				next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
					if attempt++; attempt == 1 {
						w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
						w.WriteHeader(http.StatusUnauthorized)
						return nil
					}
					if tt.header != "" {
						w.Header().Set("WWW-Authenticate", tt.header)
					}
					w.WriteHeader(tt.status)
					return nil
				})
				req := httptest.NewRequest("GET", "/", nil)
				req.Header.Set("X-Merchant-Id", "acme")
				req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
				rec := httptest.NewRecorder()
				if err := h.ServeHTTP(rec, req, next); err != nil {
					t.Fatal(err)
				}
				if i == 0 && rec.Code != tt.status {
					t.Fatalf("request %d: status %d, want the retry's %d", i, rec.Code, tt.status)
				}
			}
			if n := calls.Load(); n > 2 {
				t.Errorf("%d token requests for 10 requests, want at most 2", n)
			}
		})
	}
}
