package broker

import (
	"context"
	"fmt"
	"runtime"
	"strings"
	"testing"
	"time"
)

// benchTokenLen is the size of the benchmark tokens: about a Nuapay
// Gatekeeper JWT.
const benchTokenLen = 600

// benchBindings returns n bindings of one source whose tokens live an hour,
// fetched once into br.
func benchBindings(b *testing.B, br *Broker, n int) []*Binding {
	b.Helper()
	src := SourceFunc(func(_ context.Context, req Request) (Token, error) {
		v := req.Organisation + "." + strings.Repeat("x", benchTokenLen-1-len(req.Organisation))
		return Token{Value: Secret(v), Expiry: time.Now().Add(time.Hour)}, nil
	})
	bs := make([]*Binding, n)
	for i := range bs {
		bs[i] = NewBinding("nuapay#bench", src, Request{Merchant: fmt.Sprintf("merchant-%06d", i),
			Organisation: fmt.Sprintf("org-%06d", i), Scopes: []string{"openbanking_pisp"}})
		if _, _, err := br.Get(context.Background(), bs[i]); err != nil {
			b.Fatal(err)
		}
	}
	return bs
}

// BenchmarkGetCached is the hot path: a cached token, not in its refresh
// window, for merchants spread over 1, 1 000 and 100 000 cached tokens.
// The cost should not depend on the number of merchants.
func BenchmarkGetCached(b *testing.B) {
	for _, n := range []int{1, 1_000, 100_000} {
		b.Run(fmt.Sprintf("merchants=%d", n), func(b *testing.B) {
			br := New(Options{})
			defer br.Close()
			bs := benchBindings(b, br, n)
			ctx := context.Background()
			b.ReportAllocs()
			b.ResetTimer()
			i := 0
			for b.Loop() {
				// A stride coprime with n visits every binding in a
				// cache-unfriendly order.
				i += 7919
				if i >= n {
					i %= n
				}
				if _, r, err := br.Get(ctx, bs[i]); err != nil || r != Hit {
					b.Fatal(r, err)
				}
			}
		})
	}
}

// BenchmarkGetCachedParallel is BenchmarkGetCached from every core at once.
func BenchmarkGetCachedParallel(b *testing.B) {
	br := New(Options{})
	defer br.Close()
	bs := benchBindings(b, br, 1_000)
	b.ReportAllocs()
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		i := 0
		for pb.Next() {
			i = (i + 7919) % len(bs)
			if _, _, err := br.Get(context.Background(), bs[i]); err != nil {
				b.Fatal(err)
			}
		}
	})
}

// BenchmarkHeapPerToken measures the live heap of 100 000 cached tokens
// (bindings included, as a handler holds one per merchant) and reports
// bytes per token beyond the token's own bytes (bytes/token-overhead) and
// in all (bytes/token).
func BenchmarkHeapPerToken(b *testing.B) {
	const n = 100_000
	for b.Loop() {
		runtime.GC()
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		br := New(Options{})
		bs := benchBindings(b, br, n)
		runtime.GC()
		runtime.ReadMemStats(&after)
		total := float64(after.HeapAlloc) - float64(before.HeapAlloc)
		// The token value is stored twice: the token itself and the
		// prebuilt "Bearer <token>" header.
		tokenBytes := float64(benchTokenLen)
		b.ReportMetric(total/n, "bytes/token")
		b.ReportMetric(total/n-tokenBytes, "bytes/token-overhead")
		runtime.KeepAlive(bs)
		br.Close()
	}
}
