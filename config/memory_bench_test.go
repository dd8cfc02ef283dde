package config

import (
	"fmt"
	"runtime"
	"strings"
	"testing"
)

// benchMerchants is the size of the registry of the memory and load
// benchmarks.
const benchMerchants = 100_000

// benchRegistry is a nuapay registry of n explicit merchants, the shape
// of the end-to-end bench (integration/bench): about 90 bytes a merchant.
func benchRegistry(n int) []byte {
	var b strings.Builder
	b.Grow(200 + n*100)
	b.WriteString("[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"https://sandbox.nuapay.com\"\napi_key = \"{env.NUAPAY_API_KEY}\"\ntoken_lifetime = \"6h\"\n\n")
	for i := range n {
		fmt.Fprintf(&b, "[merchants.merchant-%07d]\nprovider = \"nuapay\"\norganisation = \"org%07d\"\nscopes = [\"openbanking_pisp\"]\n\n", i, i)
	}
	return []byte(b.String())
}

func benchEnv(string) (string, bool) { return "partner-key", true }

// heapAlloc is the live heap after a full collection.
func heapAlloc() uint64 {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapAlloc
}

// BenchmarkRegistryMemory reports the live heap a loaded registry of
// 100 000 explicit merchants holds, per merchant (heap-B/merchant): the
// HeapAlloc delta after a full GC, which does not depend on the load of
// the machine. Run it once:
//
//	go test -run '^$' -bench RegistryMemory -benchtime 1x ./config
func BenchmarkRegistryMemory(b *testing.B) {
	data := benchRegistry(benchMerchants)
	var perMerchant float64
	for b.Loop() {
		before := heapAlloc()
		reg, err := parse("merchants.toml", data, benchEnv)
		if err != nil {
			b.Fatal(err)
		}
		after := heapAlloc()
		if len(reg.Merchants) != benchMerchants {
			b.Fatalf("%d merchants", len(reg.Merchants))
		}
		perMerchant = float64(int64(after)-int64(before)) / benchMerchants
		runtime.KeepAlive(reg)
	}
	b.ReportMetric(perMerchant, "heap-B/merchant")
}

// BenchmarkRegistryLoad times the parse of a 100 000-merchant registry
// file (about 9 MB): the floor of a start and of a reload that changes
// the registry.
//
//	go test -run '^$' -bench RegistryLoad -benchtime 3x ./config
func BenchmarkRegistryLoad(b *testing.B) {
	data := benchRegistry(benchMerchants)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		if _, err := parse("merchants.toml", data, benchEnv); err != nil {
			b.Fatal(err)
		}
	}
}

// TestRegistryHeapPerMerchant guards what a loaded registry holds per
// explicit merchant (RSS is about twice the live heap): its table's slot,
// its Merchant and its id and organisation bytes, with the provider,
// scopes, lifetime and audience shared (Terms). Deterministic: a heap
// delta after full collections, not a timing.
func TestRegistryHeapPerMerchant(t *testing.T) {
	const n = 20_000
	data := benchRegistry(n)
	before := heapAlloc()
	reg, err := parse("merchants.toml", data, benchEnv)
	if err != nil {
		t.Fatal(err)
	}
	after := heapAlloc()
	per := float64(int64(after)-int64(before)) / n
	t.Logf("%.0f heap bytes per merchant", per)
	if per > 130 {
		t.Errorf("%.0f heap bytes per registry merchant, want at most 130", per)
	}
	var first *Terms
	for _, m := range reg.Merchants {
		if first == nil {
			first = m.Terms
		}
		if m.Terms != first {
			t.Fatalf("merchant %s has Terms of its own: merchants alike must share one", m.ID)
		}
	}
	runtime.KeepAlive(reg)
	runtime.KeepAlive(data)
}
