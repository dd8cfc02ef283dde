package module

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/google/uuid"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

const testToken = "tok-SECRET-value"

// sourceFunc adapts a function to broker.Source.
type sourceFunc func(ctx context.Context, req broker.Request) (broker.Token, error)

// Token calls f.
func (f sourceFunc) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	return f(ctx, req)
}

// defaultSelector returns the selector of DefaultMerchant, as Provision
// reads it.
func defaultSelector() admission.Selector {
	s, err := admission.ParseSelector(DefaultMerchant, expandShorthands)
	if err != nil {
		panic(err) // DefaultMerchant is a valid selector
	}
	return s
}

// newTestHandler returns a provisioned-looking handler for merchant "acme"
// whose source answers with src.
func newTestHandler(t *testing.T, src sourceFunc, errorsMode string) *Handler {
	t.Helper()
	h := &Handler{Merchant: DefaultMerchant, Errors: errorsMode, logger: zap.NewNop(),
		merchant: defaultSelector()}
	h.broker = broker.New(broker.Options{})
	t.Cleanup(h.broker.Close)
	b := brokertest.NewBinding("nuapay#test", src, broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"openbanking_pisp"}})
	h.bindings = handTable("nuapay", "", b)
	h.instrument(nil)
	return h
}

func okSource(calls *atomic.Int64) sourceFunc {
	return func(ctx context.Context, req broker.Request) (broker.Token, error) {
		calls.Add(1)
		return broker.Token{Value: testToken, Expiry: time.Now().Add(time.Hour)}, nil
	}
}

// serve runs one request through h and returns the response and what next
// received (nil when next was not called).
func serve(t *testing.T, h *Handler, req *http.Request) (*httptest.ResponseRecorder, *http.Request, error) {
	t.Helper()
	repl := caddy.NewReplacer()
	req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl))
	rec := httptest.NewRecorder()
	var got *http.Request
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		got = r
		return nil
	})
	err := h.ServeHTTP(rec, req, next)
	return rec, got, err
}

func TestServeHTTPInjectsTokenAndStripsCallerHeaders(t *testing.T) {
	var calls atomic.Int64
	h := newTestHandler(t, okSource(&calls), "json")
	req := httptest.NewRequest("GET", "/tpp/payments", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	req.Header.Add("Authorization", "Bearer caller-chosen")
	req.Header.Add("Authorization", "Basic Zm9vOmJhcg==")
	_, got, err := serve(t, h, req)
	if err != nil || got == nil {
		t.Fatalf("next not called: %v", err)
	}
	if v := got.Header.Values("Authorization"); len(v) != 1 || v[0] != "Bearer "+testToken {
		t.Fatalf("Authorization = %q", v)
	}
	if v := got.Header.Values("X-Merchant-Id"); len(v) != 0 {
		t.Fatalf("merchant header reached next: %q", v)
	}
	repl := got.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
	for k, want := range map[string]string{
		"http.token_broker.merchant":     "acme",
		"http.token_broker.organisation": "org-acme",
		"http.token_broker.provider":     "nuapay",
		"http.token_broker.fingerprint":  broker.Fingerprint(testToken),
		"http.token_broker.cache":        "miss",
	} {
		if v, _ := repl.GetString(k); v != want {
			t.Errorf("{%s} = %q, want %q", k, v, want)
		}
	}
}

// TestMerchantHeaderUnderscoreTwin: a header whose name is the merchant
// header's with underscores for hyphens, in any case, is refused as
// ambiguous (a server behind the proxy may fold it into the merchant
// header) and never forwarded; other names with underscores pass.
func TestMerchantHeaderUnderscoreTwin(t *testing.T) {
	for _, tt := range []struct {
		name       string // the other header, sent raw
		wantStatus int
	}{
		{"X-Merchant_Id", 400},
		{"x_merchant_id", 400},
		{"X_MERCHANT_ID", 400},
		{"X_Merchant-Id", 400},
		{"X-Merchant.Id", 400},
		{"x.merchant_id", 400},
		{"X-Merchant_Ids", 200},
		{"X-Request_Id", 200},
		{"X-Merchant-Id2", 200},
	} {
		t.Run(tt.name, func(t *testing.T) {
			h := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
				return broker.Token{Value: testToken, Expiry: time.Now().Add(time.Hour)}, nil
			}, "json")
			req := httptest.NewRequest("GET", "/", nil)
			req.Header.Set("X-Merchant-Id", "acme")
			req.Header[tt.name] = []string{"globex"}
			rec, got, err := serve(t, h, req)
			if err != nil {
				t.Fatal(err)
			}
			if tt.wantStatus != 200 {
				if got != nil || rec.Code != tt.wantStatus || !strings.Contains(rec.Body.String(), "ambiguous_merchant") {
					t.Fatalf("%s beside X-Merchant-Id: %d %s, forwarded %t; want %d ambiguous_merchant, not forwarded", tt.name, rec.Code, rec.Body, got != nil, tt.wantStatus)
				}
				return
			}
			if got == nil {
				t.Fatalf("%s beside X-Merchant-Id: refused %d %s, want it served", tt.name, rec.Code, rec.Body)
			}
		})
	}
}

func TestServeHTTPRefusals(t *testing.T) {
	tests := []struct {
		name       string
		merchants  []string // X-Merchant-Id values
		srcErr     error
		wantStatus int
		wantCode   string
	}{
		{"missing merchant", nil, nil, 400, "missing_merchant"},
		{"empty merchant", []string{""}, nil, 400, "missing_merchant"},
		{"two merchant headers", []string{"acme", "globex"}, nil, 400, "ambiguous_merchant"},
		{"the same merchant twice", []string{"acme", "acme"}, nil, 400, "ambiguous_merchant"},
		{"two merchants folded into one header", []string{"acme, globex"}, nil, 400, "invalid_merchant"},
		{"comma in merchant", []string{"acme,globex"}, nil, 400, "invalid_merchant"},
		{"path in merchant", []string{"acme/../x"}, nil, 400, "invalid_merchant"},
		{"control character", []string{"ac\x01me"}, nil, 400, "invalid_merchant"},
		{"unicode look-alike", []string{"аcme"}, nil, 400, "invalid_merchant"}, // Cyrillic а
		{"too long", []string{strings.Repeat("a", 129)}, nil, 400, "invalid_merchant"},
		{"unknown merchant", []string{"globex"}, nil, 403, "unknown_merchant"},
		{"token API 5xx", []string{"acme"}, &broker.APIError{Provider: "nuapay", StatusCode: 503}, 502, "token_unavailable"},
		{"token API refuses", []string{"acme"}, &broker.APIError{Provider: "nuapay", StatusCode: 401, Code: "40100"}, 502, "token_refused"},
		{"token API timeout", []string{"acme"}, context.DeadlineExceeded, 504, "token_timeout"},
	}
	for _, tt := range tests {
		for _, mode := range []string{"json", "caddy"} {
			t.Run(tt.name+"/"+mode, func(t *testing.T) {
				h := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
					if tt.srcErr != nil {
						return broker.Token{}, tt.srcErr
					}
					return broker.Token{Value: testToken, Expiry: time.Now().Add(time.Hour)}, nil
				}, mode)
				req := httptest.NewRequest("GET", "/", nil)
				req.Header.Set("Authorization", "Bearer caller")
				for _, m := range tt.merchants {
					req.Header.Add("X-Merchant-Id", m)
				}
				rec, got, err := serve(t, h, req)
				if got != nil {
					t.Fatal("refused request was forwarded")
				}
				if mode == "caddy" {
					var he caddyhttp.HandlerError
					if !errors.As(err, &he) || he.StatusCode != tt.wantStatus || !strings.HasPrefix(he.Err.Error(), tt.wantCode) {
						t.Fatalf("err = %#v, want caddyhttp.Error %d %s", err, tt.wantStatus, tt.wantCode)
					}
					if strings.Contains(err.Error(), testToken) {
						t.Fatal("error leaks the token")
					}
					return
				}
				if err != nil || rec.Code != tt.wantStatus {
					t.Fatalf("status %d err %v, want %d", rec.Code, err, tt.wantStatus)
				}
				var body admission.ErrorBody
				if err := json.Unmarshal(rec.Body.Bytes(), &body); err != nil || body.Error != tt.wantCode || body.Message == "" {
					t.Fatalf("body %s (%v)", rec.Body, err)
				}
				if rec.Header().Get("Content-Type") != "application/json" {
					t.Fatalf("content type %q", rec.Header().Get("Content-Type"))
				}
				if strings.Contains(rec.Body.String(), testToken) || strings.Contains(rec.Body.String(), "\x01") {
					t.Fatalf("body leaks: %s", rec.Body)
				}
			})
		}
	}
}

// The token goes in Authorization only: Caddy's logs redact it, and
// reverse_proxy passes it on (Proxy-Authorization is hop-by-hop: it would
// never reach the upstream).
func TestHeaderMustBeRedactedByCaddy(t *testing.T) {
	for _, tt := range []struct {
		header string
		ok     bool
	}{{"", true}, {"Authorization", true}, {"proxy-authorization", false}, {"Proxy-Authorization", false}, {"X-Api-Key", false}, {"Cookie", false}} {
		h := &Handler{Header: tt.header, Errors: "json"}
		if err := h.Validate(); (err == nil) != tt.ok {
			t.Errorf("header %q: Validate() = %v, want ok=%v", tt.header, err, tt.ok)
		}
	}
}

// With retry_on_401 any, every 401 counts, so a token is only purged once
// it is a second old: callers cannot turn 401s into a token request each.
func TestRetryOnAny401PurgesOnlyTokensASecondOld(t *testing.T) {
	for _, tt := range []struct {
		name       string
		age        time.Duration
		wantStatus int
		wantCalls  int64
	}{
		{"fresh token: kept, the caller gets the 401", 0, 401, 1},
		{"older token: purged and the request retried", 2 * time.Second, 200, 2},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
				n := calls.Add(1)
				return broker.Token{Value: broker.Secret(fmt.Sprintf("tok-%d", n)), IssuedAt: time.Now().Add(-tt.age), Expiry: time.Now().Add(time.Hour)}, nil
			}, "json")
			h.RetryOn401 = "any"
			req := httptest.NewRequest("GET", "/", nil)
			req.Header.Set("X-Merchant-Id", "acme")
			repl := caddy.NewReplacer()
			req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl))
			rec := httptest.NewRecorder()
			next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
				if r.Header.Get("Authorization") == "Bearer tok-1" {
					w.WriteHeader(401) // no WWW-Authenticate at all
					return nil
				}
				w.WriteHeader(200)
				return nil
			})
			if err := h.ServeHTTP(rec, req, next); err != nil {
				t.Fatal(err)
			}
			if rec.Code != tt.wantStatus || calls.Load() != tt.wantCalls {
				t.Fatalf("status %d, %d token calls; want %d, %d", rec.Code, calls.Load(), tt.wantStatus, tt.wantCalls)
			}
		})
	}
}

func TestInteractionID(t *testing.T) {
	for _, tt := range []struct {
		name   string
		on     bool
		sent   string
		wantID func(string) bool
	}{
		{"off: nothing added", false, "", func(v string) bool { return v == "" }},
		{"on: a new UUID", true, "", func(v string) bool { _, err := uuid.Parse(v); return err == nil }},
		{"on: the caller's passed on", true, "93bac548-d2de-4546-b106-880a5018460d", func(v string) bool { return v == "93bac548-d2de-4546-b106-880a5018460d" }},
	} {
		t.Run(tt.name, func(t *testing.T) {
			var calls atomic.Int64
			h := newTestHandler(t, okSource(&calls), "json")
			h.InteractionID = tt.on
			req := httptest.NewRequest("GET", "/", nil)
			req.Header.Set("X-Merchant-Id", "acme")
			if tt.sent != "" {
				req.Header.Set("x-fapi-interaction-id", tt.sent)
			}
			_, got, err := serve(t, h, req)
			if err != nil || got == nil {
				t.Fatal(err)
			}
			if v := got.Header.Get("x-fapi-interaction-id"); !tt.wantID(v) {
				t.Fatalf("x-fapi-interaction-id = %q", v)
			}
		})
	}
}

// TestPlaceholdersNameTheLastHandlersToken: when two token_broker handlers
// serve one request (the second one's token is the one that goes on), the
// placeholders name the second one's merchant and token.
func TestPlaceholdersNameTheLastHandlersToken(t *testing.T) {
	var calls atomic.Int64
	first := newTestHandler(t, okSource(&calls), "json")
	second := newTestHandler(t, func(ctx context.Context, req broker.Request) (broker.Token, error) {
		return broker.Token{Value: "tok-second", Expiry: time.Now().Add(time.Hour)}, nil
	}, "json")
	b := brokertest.NewBinding("oneid#test", second.bindings.Peek("acme").Source, broker.Request{Merchant: "acme", Organisation: "org-second"})
	second.bindings = handTable("oneid", "", b)
	second.instrument(nil)

	req := httptest.NewRequest("GET", "/tpp/payments", nil)
	req.Header.Set("X-Merchant-Id", "acme")
	repl := caddy.NewReplacer()
	req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, repl))
	var got *http.Request
	next := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		got = r
		return nil
	})
	chain := caddyhttp.HandlerFunc(func(w http.ResponseWriter, r *http.Request) error {
		r.Header.Set("X-Merchant-Id", "acme") // the first handler took it off
		return second.ServeHTTP(w, r, next)
	})
	if err := first.ServeHTTP(httptest.NewRecorder(), req, chain); err != nil || got == nil {
		t.Fatalf("next not reached: %v", err)
	}
	if v := got.Header.Get("Authorization"); v != "Bearer tok-second" {
		t.Fatalf("Authorization = %q, want the second handler's token", v)
	}
	for k, want := range map[string]string{
		"http.token_broker.merchant":     "acme",
		"http.token_broker.organisation": "org-second",
		"http.token_broker.provider":     "oneid",
		"http.token_broker.fingerprint":  broker.Fingerprint("tok-second"),
		"http.token_broker.cache":        "miss",
	} {
		if v, _ := repl.GetString(k); v != want {
			t.Errorf("{%s} = %q, want %q (the second handler's)", k, v, want)
		}
	}
}
