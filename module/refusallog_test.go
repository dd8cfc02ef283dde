package module

import (
	"context"
	"testing"
	"time"

	"go.uber.org/zap"
	zapobserver "go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// A merchant whose key is in backoff gets the remembered error on every
// request: one fetch line, and one refusal line per minute per key, the
// next counting those left out; another merchant's key logs apart.
func TestRepeatedRefusalLinesThroughTheHandler(t *testing.T) {
	clk := clocktest.New(time.Unix(1_700_000_000, 0))
	h, m, _ := newMetricsHandlerWith(t, func(context.Context, broker.Request) (broker.Token, error) {
		return broker.Token{}, &broker.APIError{Provider: "nuapay", StatusCode: 503}
	}, false, broker.Options{Now: clk.Now, MaxAttempts: 1, FailureTTL: 10 * time.Minute, FailureMax: 10 * time.Minute})
	core, logs := zapobserver.New(zap.InfoLevel)
	h.logger = zap.New(core)
	h.refusals = admission.NewRepeatLimiter(clk.Now)
	h.instrument(m)
	for _, step := range []struct {
		after    time.Duration
		merchant string
	}{{0, "acme"}, {time.Second, "acme"}, {time.Second, "acme"}, {0, "globex"}, {time.Minute, "acme"}} {
		clk.Add(step.after)
		if rec, _, _ := serve(t, h, merchantRequest(step.merchant)); rec.Code < 500 {
			t.Fatalf("%s: status %d", step.merchant, rec.Code)
		}
	}
	if n := logs.FilterMessage("token fetch failed").Len(); n != 2 {
		t.Errorf("%d fetch lines, want 2 (one per merchant)", n)
	}
	type line struct {
		merchant   string
		suppressed int64
	}
	var got []line
	for _, e := range logs.FilterMessage("no token for request").All() {
		f := e.ContextMap()
		n, _ := f["suppressed"].(int64)
		if f["backoff"] != "key" || f["source"] != "nuapay#test" {
			t.Errorf("line %v: want backoff key, source nuapay#test", f)
		}
		got = append(got, line{f["merchant"].(string), n})
	}
	want := []line{{"acme", 0}, {"globex", 0}, {"acme", 2}}
	if len(got) != len(want) || got[0] != want[0] || got[1] != want[1] || got[2] != want[2] {
		t.Fatalf("refusal lines %v, want %v", got, want)
	}
}
