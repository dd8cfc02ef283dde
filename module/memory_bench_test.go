package module

import (
	"runtime"
	"testing"
)

// BenchmarkBindingsMemory reports the live heap of 100 000 warm merchants
// per merchant (heap-B/merchant) and its heap objects (objects/merchant,
// what the GC's mark work grows with): a binding and a cached token (a
// 600-byte token, the size of a Nuapay JWT) each, the HeapAlloc and
// HeapObjects deltas after a full GC, which do not depend on the load of
// the machine. TestWarmMerchantHeap guards the figures. The
// registry's own share is config's BenchmarkRegistryMemory. Run it once:
//
//	go test -run '^$' -bench BindingsMemory -benchtime 1x ./module
func BenchmarkBindingsMemory(b *testing.B) {
	const n = 100_000
	var perMerchant, objects float64
	for b.Loop() {
		objects0, bytes0 := liveHeap()
		h, ids := benchHandler(b, n)
		objects1, bytes1 := liveHeap()
		perMerchant = float64(int64(bytes1)-int64(bytes0)) / n
		objects = float64(int64(objects1)-int64(objects0)) / n
		runtime.KeepAlive(h)
		runtime.KeepAlive(ids)
	}
	b.ReportMetric(perMerchant, "heap-B/merchant")
	b.ReportMetric(objects, "objects/merchant")
}
