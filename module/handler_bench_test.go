package module

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

// benchHandler returns a handler with n merchants of one provider, each
// with a cached token, instrumented with metrics as in Caddy.
func benchHandler(b *testing.B, n int) (*Handler, []string) {
	b.Helper()
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(),
		merchant: defaultSelector()}
	h.broker = broker.New(broker.Options{})
	b.Cleanup(h.broker.Close)
	src := sourceFunc(func(_ context.Context, req broker.Request) (broker.Token, error) {
		return broker.Token{Value: broker.Secret(req.Organisation + "." + strings.Repeat("x", 580)), Expiry: time.Now().Add(time.Hour)}, nil
	})
	ids := make([]string, n)
	bds := make([]*broker.Binding, n)
	scopes := []string{"openbanking_pisp"} // shared, as the registry's are
	for i := range ids {
		ids[i] = fmt.Sprintf("merchant-%06d", i)
		bd := brokertest.NewBinding("nuapay#bench", src, broker.Request{Merchant: ids[i], Organisation: "org-" + ids[i], Scopes: scopes})
		bds[i] = bd
	}
	h.bindings = handTable("nuapay", "", bds...)
	for _, id := range ids {
		if _, _, err := h.broker.Get(context.Background(), &h.bindings.Peek(id).Binding); err != nil {
			b.Fatal(err)
		}
	}
	h.instrument(telemetry.NewMetrics(false))
	return h, ids
}

var noopNext = caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { return nil })

// BenchmarkServeHTTP is the handler's whole request path with a cached
// token: merchant header, binding, cache lookup, metrics, header rewrite,
// placeholders, then a no-op next. Each iteration builds the per-request
// state Caddy builds (a replacer in the request's context), so the
// allocations beyond BenchmarkCaddyRequestState are the handler's own.
func BenchmarkServeHTTP(b *testing.B) {
	for _, n := range []int{1, 1_000, 100_000} {
		b.Run(fmt.Sprintf("merchants=%d", n), func(b *testing.B) {
			h, ids := benchHandler(b, n)
			vals := make([][]string, n)
			for i, id := range ids {
				vals[i] = []string{id}
			}
			req := httptest.NewRequest("GET", "/tpp/payments", nil)
			rec := httptest.NewRecorder()
			base := req.Context()
			b.ReportAllocs()
			i := 0
			for b.Loop() {
				i += 7919
				if i >= n {
					i %= n
				}
				r := req.WithContext(context.WithValue(base, caddy.ReplacerCtxKey, caddy.NewReplacer()))
				r.Header["X-Merchant-Id"] = vals[i]
				if err := h.ServeHTTP(rec, r, noopNext); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

// BenchmarkCaddyRequestState is the per-request state of
// BenchmarkServeHTTP without the handler: subtract it from
// BenchmarkServeHTTP to get the handler's own cost.
func BenchmarkCaddyRequestState(b *testing.B) {
	req := httptest.NewRequest("GET", "/tpp/payments", nil)
	rec := httptest.NewRecorder()
	base := req.Context()
	vals := []string{"merchant-000000"}
	b.ReportAllocs()
	for b.Loop() {
		r := req.WithContext(context.WithValue(base, caddy.ReplacerCtxKey, caddy.NewReplacer()))
		r.Header["X-Merchant-Id"] = vals
		if err := noopNext.ServeHTTP(rec, r); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkStaticHeader is what Caddy's `header_up Authorization "Bearer
// x"` amounts to in the same harness: the floor the broker is compared with.
func BenchmarkStaticHeader(b *testing.B) {
	req := httptest.NewRequest("GET", "/tpp/payments", nil)
	rec := httptest.NewRecorder()
	base := req.Context()
	b.ReportAllocs()
	for b.Loop() {
		r := req.WithContext(context.WithValue(base, caddy.ReplacerCtxKey, caddy.NewReplacer()))
		r.Header.Set("Authorization", "Bearer x")
		if err := noopNext.ServeHTTP(rec, r); err != nil {
			b.Fatal(err)
		}
	}
}
