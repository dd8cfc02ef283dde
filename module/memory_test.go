package module

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"
	"unsafe"
	"weak"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// warmMerchantsTOML is a registry of n explicit Nuapay merchants.
func warmMerchantsTOML(n int) []byte {
	var b strings.Builder
	b.WriteString("[providers.nuapay]\ntype = \"nuapay\"\nbase_url = \"http://127.0.0.1:1\"\napi_key = \"{env.K}\"\n")
	for i := range n {
		fmt.Fprintf(&b, "\n[merchants.merchant-%06d]\nprovider = \"nuapay\"\norganisation = \"org-%06d\"\nscopes = [\"openbanking_pisp\"]\n", i, i)
	}
	return []byte(b.String())
}

// liveHeap returns the live heap objects and bytes after two full GCs.
func liveHeap() (objects, bytes uint64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return ms.HeapObjects, ms.HeapAlloc
}

// warmRegistryHandler returns a handler serving a registry of n explicit
// Nuapay merchants (warmMerchantsTOML), with tokens of a Nuapay JWT's size
// and an ID, as a Nuapay source decodes them (fresh strings), and the
// merchants' ids; its first merchant is warm, so that the lazily made
// shared state (observer, maps' first tables) is not counted per merchant.
func warmRegistryHandler(tb testing.TB, n int, scopes []string) (*Handler, []string, *config.Registry) {
	return warmRegistryHandlerAt(tb, n, scopes, time.Now)
}

// warmRegistryHandlerAt is warmRegistryHandler on the clock now (the
// broker's, and the tokens' expiry).
func warmRegistryHandlerAt(tb testing.TB, n int, scopes []string, now func() time.Time) (*Handler, []string, *config.Registry) {
	tb.Helper()
	reg, err := configtest.Load(tb, "warm.toml", warmMerchantsTOML(n), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
	if err != nil {
		tb.Fatal(err)
	}
	reg.Providers["nuapay"].Source = sourceFunc(func(_ context.Context, req broker.Request) (broker.Token, error) {
		return broker.Token{Value: broker.Secret(req.Organisation + "." + strings.Repeat("x", 580)), Type: "Bearer",
			ID:     fmt.Sprintf("%08x-0000-4000-8000-%012x", len(req.Organisation), time.Now().UnixNano()),
			Scopes: append([]string(nil), req.Scopes...), Expiry: now().Add(time.Hour)}, nil
	})
	br := broker.New(broker.Options{Now: now})
	tb.Cleanup(br.Close)
	h := reloadedHandler(br, reg, scopes)
	ids := make([]string, n)
	for i := range ids {
		ids[i] = fmt.Sprintf("merchant-%06d", i)
	}
	warmMerchants(tb, h, ids[:1])
	return h, ids, reg
}

// reloadedHandler is a handler of a (new) config: its own binding table
// of reg, on the broker br (the token cache is kept across reloads).
func reloadedHandler(br *broker.Broker, reg *config.Registry, scopes []string) *Handler {
	return reloadedHandlerAt(br, reg, scopes, time.Now)
}

// reloadedHandlerAt is reloadedHandler with its table on the clock now.
func reloadedHandlerAt(br *broker.Broker, reg *config.Registry, scopes []string, now func() time.Time) *Handler {
	h := &Handler{Merchant: DefaultMerchant, Errors: "json", logger: zap.NewNop(), merchant: defaultSelector()}
	h.broker = br
	h.registry = reg
	h.bindings = bindings.ForRegistry(reg, scopes, admission.Allow(nil), now)
	h.instrument(telemetry.NewMetrics(false))
	return h
}

// warmMerchants sends one request for each merchant through ServeHTTP,
// each request's merchant header a string of its own.
func warmMerchants(tb testing.TB, h *Handler, ids []string) {
	tb.Helper()
	for _, id := range ids {
		req := httptest.NewRequest("GET", "/tpp/payments", nil)
		req.Header["X-Merchant-Id"] = []string{strings.Clone(id)}
		req = req.WithContext(context.WithValue(req.Context(), caddy.ReplacerCtxKey, caddy.NewReplacer()))
		served := false
		next := caddyhttp.HandlerFunc(func(http.ResponseWriter, *http.Request) error { served = true; return nil })
		if err := h.ServeHTTP(httptest.NewRecorder(), req, next); err != nil || !served {
			tb.Fatalf("%s: not served: %v", id, err)
		}
	}
}

// routeScopeCases are a route without scopes of its own (the merchants'
// are asked for) and a route with scopes of its own.
var routeScopeCases = []struct {
	name   string
	scopes []string // the route's
}{
	{"merchant scopes", nil},
	{"route scopes", []string{"openbanking_aisp", "accounts"}},
}

// TestWarmMerchantHeap guards the heap cost of a warm merchant (its
// binding and its cached token), which every GC cycle marks and which,
// twice over (the GC goal), is most of the RSS at 100 000 warm merchants.
// It warms 10 000 merchants of a real registry through ServeHTTP, each
// request's merchant header a string of its own, with tokens of a Nuapay
// JWT's size and an ID, as a Nuapay source decodes them (fresh strings),
// and counts the live heap objects and bytes the merchants added.
// Deterministic: a count of objects, not a timing.
//
// Measured: 3.0 objects per merchant (its cache key, the entry, and its
// header string with the token ID; the binding is in a block of its
// table's) and ~1 030 bytes with a 600-byte token.
func TestWarmMerchantHeap(t *testing.T) {
	const n = 10_000
	for _, tt := range routeScopeCases {
		t.Run(tt.name, func(t *testing.T) {
			h, ids, reg := warmRegistryHandler(t, n, tt.scopes)
			objects0, bytes0 := liveHeap()
			warmMerchants(t, h, ids[1:])
			objects1, bytes1 := liveHeap()
			runtime.KeepAlive(h)
			runtime.KeepAlive(reg)
			runtime.KeepAlive(ids)

			perObjects := float64(int64(objects1)-int64(objects0)) / (n - 1)
			perBytes := float64(int64(bytes1)-int64(bytes0)) / (n - 1)
			t.Logf("per warm merchant: %.2f heap objects, %.0f bytes", perObjects, perBytes)
			if perObjects > 3.25 {
				t.Errorf("%.2f heap objects per warm merchant, want at most 3.25: every one is marked by each GC cycle", perObjects)
			}
			if perBytes > 1080 {
				t.Errorf("%.0f heap bytes per warm merchant, want at most 1080 with a 600-byte token", perBytes)
			}
		})
	}
}

// TestDiscardedConfigFreed: a config discarded by a reload is freed once
// the tokens cached before the reload have been replaced (cached entries
// point at the bindings they were fetched for), two token lifetimes at
// most, not kept alive by the config that replaced it. Deterministic: the
// clock is injected and the table's collection is seen through a weak
// pointer after two full GCs.
func TestDiscardedConfigFreed(t *testing.T) {
	const n = 300 // bindings and entries over several chunks
	var mu sync.Mutex
	clock := time.Date(2026, 11, 24, 12, 0, 0, 0, time.UTC)
	now := func() time.Time { mu.Lock(); defer mu.Unlock(); return clock }
	h1, ids, reg := warmRegistryHandlerAt(t, n, nil, now)
	warmMerchants(t, h1, ids[1:])
	old := weak.Make(h1.bindings)

	// The reload: a new config's table on the same token cache, which
	// serves the tokens cached before; the old handlers are cleaned up.
	h2 := reloadedHandler(h1.broker, reg, nil)
	warmMerchants(t, h2, ids)
	if err := h1.Cleanup(); err != nil {
		t.Fatal(err)
	}
	h1 = nil
	for round := 1; round <= 2; round++ {
		// Past the tokens' expiry: every merchant gets a new one.
		mu.Lock()
		clock = clock.Add(2 * time.Hour)
		mu.Unlock()
		warmMerchants(t, h2, ids)
	}
	runtime.GC()
	runtime.GC()
	if old.Value() != nil {
		t.Error("the discarded config's binding table is still alive two token lifetimes after the reload")
	}
	runtime.KeepAlive(h2)
}

// TestBindingKeepsNoRequestString: a binding and its table key never
// point into a request (its merchant header value would stay alive as
// long as the binding): an explicit merchant's binding has the registry's
// id, a wildcard merchant's a copy.
func TestBindingKeepsNoRequestString(t *testing.T) {
	env := newWildcardEnv(t, "")
	for _, tt := range []struct{ merchant string }{{"acme"}, {"ORG1"}} {
		header := strings.Clone(tt.merchant)
		req := httptest.NewRequest("GET", "/tpp/payments", nil)
		req.Header["X-Merchant-Id"] = []string{header}
		if _, got, err := serve(t, env.h, req); err != nil || got == nil {
			t.Fatalf("%s: %v", tt.merchant, err)
		}
		b := env.h.bindings.Peek(tt.merchant)
		if b == nil {
			t.Fatalf("%s: no binding", tt.merchant)
		}
		if b.Merchant != tt.merchant || unsafe.StringData(b.Merchant) == unsafe.StringData(header) {
			t.Errorf("%s: the binding's merchant id %q is the request's header string", tt.merchant, b.Merchant)
		}
		env.h.bindings.Each(func(id string, b *bindings.Binding) {
			if unsafe.StringData(id) == unsafe.StringData(header) {
				t.Errorf("%s: the table's key is the request's header string", tt.merchant)
			}
		})
	}
}

// TestBindingsShareProfile: what the merchants of one provider and
// scope set have in common is shared: the registry's broker.Profile
// (source, scopes, audience, lifetime) and the table's bindings.Provider
// (name, type), also by the table of a reloaded handler of the same
// registry. The cache key is the one a binding made alone has, so that
// cached tokens are shared, and compact: the profile's tag and the
// organisation.
func TestBindingsShareProfile(t *testing.T) {
	for _, tt := range routeScopeCases {
		t.Run(tt.name, func(t *testing.T) {
			h, ids, reg := warmRegistryHandler(t, 3, tt.scopes)
			warmMerchants(t, h, ids[1:])
			a, b := h.bindings.Peek(ids[1]), h.bindings.Peek(ids[2])
			if a == nil || b == nil {
				t.Fatal("merchants not bound")
			}
			if a.Profile != b.Profile || a.Provider != b.Provider {
				t.Errorf("two merchants of one provider: profiles %p %p, providers %p %p, want one of each", a.Profile, b.Profile, a.Provider, b.Provider)
			}
			if a.Provider.Name != "nuapay" || a.Provider.Type != "nuapay" {
				t.Errorf("provider %+v, want nuapay of type nuapay", *a.Provider)
			}
			wantScopes := []string{"openbanking_pisp"}
			if tt.scopes != nil {
				wantScopes = tt.scopes
			}
			p := reg.Providers["nuapay"]
			alone := brokertest.NewBinding(p.ID, p.Source, broker.Request{Merchant: ids[1], Organisation: "org-000001", Scopes: wantScopes})
			if a.Key() != alone.Key() || len(a.Key()) > 16+len("org-000001") {
				t.Errorf("cache key %q (%d bytes), want %q, at most %d bytes", a.Key(), len(a.Key()), alone.Key(), 16+len("org-000001"))
			}
			again := reloadedHandler(h.broker, reg, tt.scopes)
			warmMerchants(t, again, ids[1:2])
			if c := again.bindings.Peek(ids[1]); c.Profile != a.Profile || c.Key() != a.Key() {
				t.Error("a second table of the registry must share its profile and its cache keys")
			}
		})
	}
}

// TestPlaceholdersDoNotAllocate: once a merchant's placeholder values
// were asked for, asking again (every request whose log or a later
// handler reads them) allocates nothing, and they are plain strings.
func TestPlaceholdersDoNotAllocate(t *testing.T) {
	h, ids, _ := warmRegistryHandler(t, 2, nil)
	b := h.bindings.Peek(ids[0])
	e, res, err := h.broker.Get(context.Background(), &b.Binding)
	if err != nil {
		t.Fatal(err)
	}
	get := placeholders(b, e, res)
	for _, name := range placeholderNames {
		if v, ok := get(placeholderPrefix + name); !ok {
			t.Fatalf("%s: not resolved", name)
		} else if _, isString := v.(string); !isString {
			t.Errorf("%s: %T, want a string", name, v)
		}
	}
	n := testing.AllocsPerRun(100, func() {
		for _, name := range placeholderNames {
			get(placeholderPrefix + name)
		}
	})
	if n != 0 {
		t.Errorf("resolving the placeholders again allocates %v times", n)
	}
}
