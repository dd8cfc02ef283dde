package module

import (
	"runtime"
	"testing"
)

// BenchmarkBindingsMemory reports the live heap of 100 000 warm merchants
// per merchant (heap-B/merchant): a binding and a cached token (a
// 600-byte token, the size of a Nuapay JWT) each, the HeapAlloc delta
// after a full GC, which does not depend on the load of the machine. The
// registry's own share is config's BenchmarkRegistryMemory. Run it once:
//
//	go test -run '^$' -bench BindingsMemory -benchtime 1x ./module
func BenchmarkBindingsMemory(b *testing.B) {
	const n = 100_000
	heap := func() uint64 {
		runtime.GC()
		runtime.GC()
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		return ms.HeapAlloc
	}
	var perMerchant float64
	for b.Loop() {
		before := heap()
		h, ids := benchHandler(b, n)
		after := heap()
		perMerchant = float64(int64(after)-int64(before)) / n
		runtime.KeepAlive(h)
		runtime.KeepAlive(ids)
	}
	b.ReportMetric(perMerchant, "heap-B/merchant")
}
