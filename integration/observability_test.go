package integration

import (
	"bufio"
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"
)

// testSpans receives the spans of Caddy's tracing module when
// OTEL_TRACES_EXPORTER is "token_broker_test": Caddy builds its tracer
// provider from the environment through autoexport, so registering an
// exporter there records the real `tracing` directive's spans in memory.
var testSpans = tracetest.NewInMemoryExporter()

// keptSpans does not clear the spans when Caddy shuts its provider down.
type keptSpans struct{ *tracetest.InMemoryExporter }

func (keptSpans) Shutdown(context.Context) error { return nil }

func init() {
	autoexport.RegisterSpanExporter("token_broker_test", func(context.Context) (sdktrace.SpanExporter, error) {
		return keptSpans{testSpans}, nil
	})
}

// TestTracingSpans runs examples/tracing-otlp with the in-memory exporter:
// the token lookup is a child span of the request span, the token API call
// a client span under it that carried its traceparent to the provider, and
// the upstream got a traceparent of the same trace.
func TestTracingSpans(t *testing.T) {
	t.Setenv("OTEL_TRACES_EXPORTER", "token_broker_test")
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "20") // ms: export promptly
	testSpans.Reset()
	sb, _ := startSandbox(t)
	// The token API, seen through a recorder of the traceparent it receives.
	var mu sync.Mutex
	var tokenAPITraceparents []string
	api := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method == http.MethodPost && strings.HasSuffix(r.URL.Path, "/tokens") {
			mu.Lock()
			tokenAPITraceparents = append(tokenAPITraceparents, r.Header.Get("Traceparent"))
			mu.Unlock()
		}
		sb.ServeHTTP(w, r)
	}))
	t.Cleanup(api.Close)
	t.Setenv("NUAPAY_API", api.URL)
	base := startCaddy(t, useExample(t, "tracing-otlp"))

	first := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	second := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	if !first.Authorization.Valid || !second.Authorization.Valid {
		t.Fatalf("authorization %+v %+v", first.Authorization, second.Authorization)
	}

	// Two server spans, two token spans, one client span (the second
	// request is a cache hit).
	var spans tracetest.SpanStubs
	deadline := time.Now().Add(10 * time.Second)
	for {
		spans = testSpans.GetSpans()
		if count(spans, isServer) >= 2 && count(spans, named("token_broker.token")) >= 2 && count(spans, isClient) >= 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("spans not exported in 10s: %v", spanNames(spans))
		}
		time.Sleep(20 * time.Millisecond)
	}
	for i, e := range []echo{first, second} {
		tp := strings.Join(anyStrings(e.Headers["Traceparent"]), ",")
		traceID, parentID, ok := parseTraceparent(tp)
		if !ok {
			t.Fatalf("request %d: upstream got traceparent %q", i+1, tp)
		}
		server := find(t, spans, func(s tracetest.SpanStub) bool { return isServer(s) && s.SpanContext.TraceID() == traceID })
		if server.SpanContext.SpanID() != parentID {
			t.Errorf("request %d: upstream traceparent parent %s, want the request span %s", i+1, parentID, server.SpanContext.SpanID())
		}
		tok := find(t, spans, func(s tracetest.SpanStub) bool {
			return s.Name == "token_broker.token" && s.SpanContext.TraceID() == traceID
		})
		if tok.Parent.SpanID() != server.SpanContext.SpanID() {
			t.Errorf("request %d: token span's parent %s, want the request span %s", i+1, tok.Parent.SpanID(), server.SpanContext.SpanID())
		}
		wantCache := map[int]string{0: "miss", 1: "hit"}[i]
		attrs := attrMap(tok.Attributes)
		for k, want := range map[string]string{"token_broker.merchant": "acme", "token_broker.provider": "nuapay",
			"token_broker.cache": wantCache, "token_broker.outcome": "ok", "token_broker.scopes.count": "1",
			"token_broker.fingerprint": e.Authorization.Fingerprint} {
			if attrs[k] != want {
				t.Errorf("request %d: token span %s = %q, want %q", i+1, k, attrs[k], want)
			}
		}
		clients := filter(spans, func(s tracetest.SpanStub) bool { return isClient(s) && s.SpanContext.TraceID() == traceID })
		if i == 1 {
			if len(clients) != 0 {
				t.Errorf("cache hit made %d token API spans", len(clients))
			}
			continue
		}
		if len(clients) != 1 {
			t.Fatalf("miss made %d token API spans, want 1", len(clients))
		}
		if clients[0].Parent.SpanID() != tok.SpanContext.SpanID() {
			t.Errorf("token API span's parent %s, want the token span %s", clients[0].Parent.SpanID(), tok.SpanContext.SpanID())
		}
		mu.Lock()
		got := append([]string(nil), tokenAPITraceparents...)
		mu.Unlock()
		if len(got) != 1 {
			t.Fatalf("token API got %d calls, want 1", len(got))
		}
		if tid, pid, ok := parseTraceparent(got[0]); !ok || tid != traceID || pid != clients[0].SpanContext.SpanID() {
			t.Errorf("token API got traceparent %q, want trace %s parent %s", got[0], traceID, clients[0].SpanContext.SpanID())
		}
	}
	// No span attribute or event carries a token (the sandbox's are JWTs).
	for _, s := range spans {
		for _, kv := range s.Attributes {
			if strings.Contains(kv.Value.String(), "eyJ") {
				t.Errorf("span %s attribute %s carries a token", s.Name, kv.Key)
			}
		}
	}
}

// TestMetricsEndpoint scrapes Caddy's admin /metrics after a scripted
// sequence (miss, hit, failure), reloads, and checks the series are still
// there and counting. Refresh-ahead needs time to pass, which an in-process
// Caddy cannot be told; module's TestMetricsScriptedSequence counts it on an
// injected clock.
func TestMetricsEndpoint(t *testing.T) {
	sb, _ := startSandbox(t)
	cf := sandboxCaddyfile(t)
	base := startCaddy(t, cf)
	metricsURL := "http://127.0.0.1:" + os.Getenv("TOKEN_BROKER_ADMIN_PORT") + "/metrics"
	before := scrape(t, metricsURL)

	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme") // miss
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme") // hit
	sb.Fail(http.StatusUnauthorized, "", 1)
	if status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "initech"); status != http.StatusBadGateway {
		t.Fatalf("failure: %d %s", status, body)
	}
	const (
		lookups  = `caddy_token_broker_cache_lookups_total{provider="nuapay-sandbox",result="%s"}`
		requests = `caddy_token_broker_token_requests_total{outcome="%s",provider="nuapay-sandbox"}`
		latency  = `caddy_token_broker_token_request_duration_seconds_count{provider="nuapay-sandbox"}`
	)
	want := map[string]float64{
		fmt.Sprintf(lookups, "miss"):           1,
		fmt.Sprintf(lookups, "hit"):            1,
		fmt.Sprintf(lookups, "refresh"):        0,
		fmt.Sprintf(lookups, "shared"):         0,
		fmt.Sprintf(requests, "ok"):            1,
		fmt.Sprintf(requests, "token_refused"): 1,
		latency:                                2,
	}
	checkDelta(t, "after miss, hit, failure", before, scrape(t, metricsURL), want)

	// A reload brings a new metrics registry: the series are still there,
	// with their values, and keep counting.
	loadCaddy(t, strings.Replace(cf, "bind 127.0.0.1", "bind 127.0.0.1\n\theader X-Reloaded yes", 1))
	checkDelta(t, "after reload", before, scrape(t, metricsURL), want)
	getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme") // hit on the token cached before the reload
	want[fmt.Sprintf(lookups, "hit")] = 2
	checkDelta(t, "after reload and a hit", before, scrape(t, metricsURL), want)
	if sb.TokenRequests() != 2 {
		t.Errorf("token requests = %d, want 2", sb.TokenRequests())
	}
}

// scrape reads the caddy_token_broker_ samples of a Prometheus text page.
func scrape(t *testing.T, url string) map[string]float64 {
	t.Helper()
	resp, err := http.Get(url)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("GET %s: %s", url, resp.Status)
	}
	out := map[string]float64{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if !strings.HasPrefix(line, "caddy_token_broker_") {
			continue
		}
		i := strings.LastIndexByte(line, ' ')
		v, err := strconv.ParseFloat(line[i+1:], 64)
		if err != nil {
			t.Fatalf("sample %q: %v", line, err)
		}
		out[line[:i]] = v
	}
	return out
}

func checkDelta(t *testing.T, when string, before, after, want map[string]float64) {
	t.Helper()
	for k, w := range want {
		if got := after[k] - before[k]; got != w {
			t.Errorf("%s: %s went up by %v, want %v", when, k, got, w)
		}
		if _, ok := after[k]; !ok && w != 0 {
			t.Errorf("%s: no series %s", when, k)
		}
	}
}

func parseTraceparent(v string) (trace.TraceID, trace.SpanID, bool) {
	parts := strings.Split(v, "-")
	if len(parts) != 4 || parts[0] != "00" {
		return trace.TraceID{}, trace.SpanID{}, false
	}
	tid, err1 := trace.TraceIDFromHex(parts[1])
	sid, err2 := trace.SpanIDFromHex(parts[2])
	return tid, sid, err1 == nil && err2 == nil
}

func isServer(s tracetest.SpanStub) bool { return s.SpanKind == trace.SpanKindServer }
func isClient(s tracetest.SpanStub) bool { return s.SpanKind == trace.SpanKindClient }
func named(n string) func(tracetest.SpanStub) bool {
	return func(s tracetest.SpanStub) bool { return s.Name == n }
}

func filter(spans tracetest.SpanStubs, keep func(tracetest.SpanStub) bool) []tracetest.SpanStub {
	var out []tracetest.SpanStub
	for _, s := range spans {
		if keep(s) {
			out = append(out, s)
		}
	}
	return out
}

func count(spans tracetest.SpanStubs, keep func(tracetest.SpanStub) bool) int {
	return len(filter(spans, keep))
}

func find(t *testing.T, spans tracetest.SpanStubs, keep func(tracetest.SpanStub) bool) tracetest.SpanStub {
	t.Helper()
	got := filter(spans, keep)
	if len(got) != 1 {
		t.Fatalf("%d matching spans, want 1: %v", len(got), spanNames(spans))
	}
	return got[0]
}

func spanNames(spans tracetest.SpanStubs) []string {
	var out []string
	for _, s := range spans {
		out = append(out, fmt.Sprintf("%s(%s)", s.Name, s.SpanKind))
	}
	return out
}

func attrMap(kvs []attribute.KeyValue) map[string]string {
	m := map[string]string{}
	for _, kv := range kvs {
		m[string(kv.Key)] = kv.Value.String()
	}
	return m
}
