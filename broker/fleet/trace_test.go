package fleet

import (
	"strings"
	"testing"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
)

// A traced fetch gets a "token_broker.l2" span under the caller's span that
// says how the token was obtained, and shows its fingerprint, never its
// value; an untraced fetch makes no span.
func TestFetchSpans(t *testing.T) {
	r := startRedis(t)
	keys := testKeys(t, 1)
	a, b := newNode(t, r, keys, nil), newNode(t, r, keys, nil)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	t.Cleanup(func() { _ = tp.Shutdown(testCtx(t)) })
	var m minter
	for _, tc := range []struct {
		name string
		n    *node
		want string
	}{
		{"first node mints", a, "minted"},
		{"second node adopts", b, "adopted"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, parent := tp.Tracer("test").Start(testCtx(t), "token_broker.token")
			tok, _, err := tc.n.Fetch(ctx, testKey, usable, m.mint)
			parent.End()
			if err != nil {
				t.Fatal(err)
			}
			spans := rec.Ended()
			l2 := spans[len(spans)-2] // ended before its parent
			if l2.Name() != l2SpanName || l2.Parent().SpanID() != parent.SpanContext().SpanID() {
				t.Fatalf("span %q under %v; want %q under the token span", l2.Name(), l2.Parent().SpanID(), l2SpanName)
			}
			attrs := map[attribute.Key]string{}
			for _, kv := range l2.Attributes() {
				attrs[kv.Key] = kv.Value.String()
				if strings.Contains(kv.Value.String(), tok.Value.Reveal()) {
					t.Fatalf("attribute %s reveals the token", kv.Key)
				}
			}
			if attrs["token_broker.l2.outcome"] != tc.want || attrs["token_broker.fingerprint"] != tok.Fingerprint() {
				t.Fatalf("attributes %v; want outcome %q and the fingerprint", attrs, tc.want)
			}
		})
	}
	before := len(rec.Ended())
	if _, _, err := b.Fetch(testCtx(t), testKey, usable, m.mint); err != nil {
		t.Fatal(err)
	}
	if len(rec.Ended()) != before {
		t.Fatal("an untraced fetch made a span")
	}
	if m.n.Load() != 1 {
		t.Fatalf("minted %d times; want 1", m.n.Load())
	}
}
