package module

import (
	"runtime"
	"runtime/metrics"
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

// gcMarkMetrics are the runtime/metrics of the GC's mark work.
var gcMarkMetrics = []string{
	"/cpu/classes/gc/mark/dedicated:cpu-seconds",
	"/cpu/classes/gc/mark/idle:cpu-seconds",
	"/cpu/classes/gc/mark/assist:cpu-seconds",
	"/gc/scan/heap:bytes",
	"/gc/heap/objects:objects",
}

// readGCMark returns the mark CPU seconds so far, the scannable heap bytes
// and the heap objects.
func readGCMark() (markSeconds float64, scanBytes, objects uint64) {
	s := make([]metrics.Sample, len(gcMarkMetrics))
	for i, name := range gcMarkMetrics {
		s[i].Name = name
	}
	metrics.Read(s)
	for _, m := range s[:3] {
		markSeconds += m.Value.Float64()
	}
	return markSeconds, s[3].Value.Uint64(), s[4].Value.Uint64()
}

// BenchmarkWarmMerchantsGC measures the GC's mark work with 100 000 warm
// merchants of a real registry (warmRegistryHandler, the heap of
// TestWarmMerchantHeap): the mark CPU of a forced full GC (mark-us/GC:
// CPU time, so it does not count waits for a busy machine, though a
// machine whose caches are shared with a busy neighbour makes it
// somewhat higher), the scannable heap bytes and the heap objects per
// warm merchant (beyond the registry's own). Each pointer the GC follows
// to a distinct small object scattered in the heap costs a cache miss.
// Run it once, with the same GOMAXPROCS for the figures to compare:
//
//	GOMAXPROCS=1 go test -run '^$' -bench WarmMerchantsGC -benchtime 1x ./module
//
// Measured (GOMAXPROCS=1, 112 MB live heap with the test's registry):
// 3.0 objects and 332 scannable bytes per warm merchant, 31–34 ms of mark
// CPU per GC over four runs on a quiet machine.
func BenchmarkWarmMerchantsGC(b *testing.B) {
	const n, gcs = 100_000, 20
	var markUS, scanPer, objectsPer, liveMB float64
	for b.Loop() {
		h, ids, reg := warmRegistryHandler(b, n, nil)
		runtime.GC()
		runtime.GC()
		_, scan0, objects0 := readGCMark()
		warmMerchants(b, h, ids[1:])
		runtime.GC()
		runtime.GC()
		mark0, scan1, objects1 := readGCMark()
		for range gcs {
			runtime.GC()
		}
		mark1, _, _ := readGCMark()
		_, heap := liveHeap()
		liveMB = float64(heap) / (1 << 20)
		markUS = (mark1 - mark0) / gcs * 1e6
		scanPer = float64(int64(scan1)-int64(scan0)) / n
		objectsPer = float64(int64(objects1)-int64(objects0)) / n
		runtime.KeepAlive(h)
		runtime.KeepAlive(reg)
		runtime.KeepAlive(ids)
	}
	b.ReportMetric(markUS, "mark-us/GC")
	b.ReportMetric(scanPer, "scan-B/merchant")
	b.ReportMetric(objectsPer, "objects/merchant")
	b.ReportMetric(liveMB, "live-MB")
}
