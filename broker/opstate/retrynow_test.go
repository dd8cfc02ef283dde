package opstate

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"

	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
)

// errNonce is a token endpoint's DPoP nonce challenge (RFC 9449 §8).
var errNonce = &broker.APIError{Provider: "oauth2", StatusCode: 400, Code: "use_dpop_nonce",
	Description: "Authorization server requires nonce in DPoP proof"}

// nonceFirst answers the first call of each fetch with a nonce challenge
// that brought a new nonce (ClassRetryNow, as the oauth source classifies
// it), and the call sent again as its Source does.
type nonceFirst struct {
	broker.Source
	mu    sync.Mutex
	calls int
}

func (s *nonceFirst) Token(ctx context.Context, req broker.Request) (broker.Token, error) {
	s.mu.Lock()
	s.calls++
	challenge := s.calls%2 == 1
	s.mu.Unlock()
	if challenge {
		return broker.Token{}, errNonce
	}
	return s.Source.Token(ctx, req)
}

func (s *nonceFirst) Classify(err error) broker.Class {
	if errors.Is(err, errNonce) {
		return broker.ClassRetryNow
	}
	return s.Source.(broker.Classifier).Classify(err)
}

// TestRetryNowIsNoFailure: a token request answered ClassRetryNow (a DPoP
// nonce challenge) and sent again by the broker is counted as a call with
// the outcome retry_now, in the metrics and the fetch's log, and is no
// failure of the merchant nor of the provider: no token_refused series,
// no event, the merchant fresh without a last error, the provider
// without failures.
func TestRetryNowIsNoFailure(t *testing.T) {
	f := newStateFixture(t)
	m := telemetry.NewMetrics(false)
	core, logs := observer.New(zap.InfoLevel)
	f.rec = telemetry.ForRegistry(m, f.tracker, zap.New(core), f.table, f.reg, f.br)
	p := f.reg.Providers["nuapay"]
	src := &nonceFirst{Source: p.Source}
	p.Source = src

	if err := f.get(t, "a-fresh"); err != nil {
		t.Fatalf("a-fresh: %v", err)
	}
	if src.calls != 2 {
		t.Fatalf("%d token requests, want 2: the challenged one and the one sent again", src.calls)
	}
	if n := testutil.CollectAndCount(m.TokenRequests); n != 2 {
		t.Errorf("%d token_requests_total series, want 2 (ok, retry_now)", n)
	}
	for _, outcome := range []string{telemetry.OutcomeOK, telemetry.OutcomeRetryNow} {
		if got := testutil.ToFloat64(m.TokenRequests.WithLabelValues("nuapay", outcome)); got != 1 {
			t.Errorf("token_requests_total{outcome=%q} = %v, want 1", outcome, got)
		}
	}
	if got := f.events.take(); len(got) != 0 {
		t.Errorf("events %q, want none", got)
	}
	fetched := logs.FilterMessage("token fetched").All()
	if len(fetched) != 1 {
		t.Fatalf("%d \"token fetched\" logs, want 1; logs %v", len(fetched), logs.All())
	}
	if got, _ := fetched[0].ContextMap()["attempt_outcomes"].([]any); !slices.Equal(got, []any{telemetry.OutcomeRetryNow, telemetry.OutcomeOK}) {
		t.Errorf("attempt_outcomes %v, want [retry_now ok]", got)
	}

	r := Build(f.sources(), Query{Provider: "nuapay", State: StateFresh}, f.clk.Now())
	if got := page(r); !slices.Equal(got, []string{"a-fresh fresh"}) || r.Merchants[0].LastError != "" {
		t.Errorf("merchants %q (%+v), want a-fresh fresh without a last error", got, r.Merchants)
	}
	i := slices.IndexFunc(r.Providers, func(p Provider) bool { return p.Name == "nuapay" })
	if pv := r.Providers[i]; pv.Requests != 2 || pv.Failures != 0 || pv.LastError != "" || pv.Status != "ok" {
		t.Errorf("provider %+v, want 2 requests, no failure, ok", pv)
	}
}
