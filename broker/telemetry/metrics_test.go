package telemetry

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

func TestRegisterConflictIsAnError(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	if err := NewMetrics(false).Register(reg); err != nil {
		t.Fatal(err)
	}
	// Another set of collectors with the same names in the same registry.
	if err := NewMetrics(false).Register(reg); err == nil {
		t.Fatal("want an error")
	}
}

// TestConsentStepsRegister: the shared counter registers again in a
// registry that has it (each config's registry registers it once); another
// counter of the same name is an error.
func TestConsentStepsRegister(t *testing.T) {
	reg := prometheus.NewPedanticRegistry()
	c := NewConsentSteps()
	for range 2 {
		if err := c.Register(reg); err != nil {
			t.Fatal(err)
		}
	}
	if err := NewConsentSteps().Register(reg); err == nil {
		t.Fatal("want an error")
	}
}

// TestFetchOutcome: a successful call is ok, one the provider asked to be
// sent again at once retry_now, a failed one its error code.
func TestFetchOutcome(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{nil, OutcomeOK},
		{&broker.RetryNowError{Err: &broker.APIError{Provider: "oauth2", StatusCode: 400, Code: "use_dpop_nonce"}}, OutcomeRetryNow},
		{&broker.APIError{Provider: "nuapay", StatusCode: 503}, "token_unavailable"},
		{errors.New("other"), "token_unavailable"},
	} {
		if got := fetchOutcome(tt.err); got != tt.want {
			t.Errorf("fetchOutcome(%v) = %q, want %q", tt.err, got, tt.want)
		}
	}
}

// TestMerchantLabel: the per-request series carry the merchant only with
// the label on.
func TestMerchantLabel(t *testing.T) {
	for _, label := range []bool{false, true} {
		m := NewMetrics(label)
		m.Purged("nuapay", "acme")
		var c prometheus.Counter
		if label {
			c = m.Purges.WithLabelValues("nuapay", "acme")
		} else {
			c = m.Purges.WithLabelValues("nuapay")
		}
		if v := testutil.ToFloat64(c); v != 1 {
			t.Errorf("merchant label %t: purges = %v, want 1", label, v)
		}
	}
}

// TestRefreshesCounted: a background refresh's token API call counts in
// refreshes_total by provider and outcome, and in token_requests_total; a
// foreground call only in token_requests_total. A call the provider
// asked to be sent again at once counts as retry_now. The ok series of
// each provider is exported as 0 from the start.
func TestRefreshesCounted(t *testing.T) {
	m := NewMetrics(false)
	r := ForRegistry(m, nil, zap.NewNop(), nil, registryOf("nuapay#1"), nil)
	if n := testutil.CollectAndCount(m.Refreshes); n != 1 {
		t.Fatalf("refreshes_total has %d series before any call, want 1 (ok, 0)", n)
	}
	b := broker.NewBindingFor(broker.NewProfile("nuapay#1", nil, []string{"openbanking_pisp"}, "", 0), "acme", "org-acme")
	o := &Observer{r: r}
	limited := &broker.APIError{Provider: "nuapay", StatusCode: 429}
	nonce := &broker.RetryNowError{Err: &broker.APIError{Provider: "oauth2", StatusCode: 400, Code: "use_dpop_nonce"}}
	for _, c := range []struct {
		background bool
		err        error
	}{
		{false, nil},
		{true, nil},
		{true, nil},
		{true, limited},
		{false, limited},
		{true, nonce},
	} {
		o.Fetched(context.Background(), b, broker.Token{}, time.Millisecond, c.background, c.err)
	}
	for _, tt := range []struct {
		name    string
		counter *prometheus.CounterVec
		outcome string
		want    float64
	}{
		{"refreshes", m.Refreshes, OutcomeOK, 2},
		{"refreshes", m.Refreshes, "token_rate_limited", 1},
		{"refreshes", m.Refreshes, OutcomeRetryNow, 1},
		{"token requests", m.TokenRequests, OutcomeOK, 3},
		{"token requests", m.TokenRequests, "token_rate_limited", 2},
		{"token requests", m.TokenRequests, OutcomeRetryNow, 1},
	} {
		if got := testutil.ToFloat64(tt.counter.WithLabelValues("nuapay", tt.outcome)); got != tt.want {
			t.Errorf("%s outcome %s = %v, want %v", tt.name, tt.outcome, got, tt.want)
		}
	}
	reg := prometheus.NewPedanticRegistry()
	if err := m.Register(reg); err != nil {
		t.Fatal(err)
	}
	if err := testutil.GatherAndCompare(reg, strings.NewReader(`
# HELP caddy_token_broker_refreshes_total Calls to a provider's token API by a background refresh (refresh-ahead), by outcome (ok, retry_now or the error code); also counted in token_requests_total.
# TYPE caddy_token_broker_refreshes_total counter
caddy_token_broker_refreshes_total{outcome="ok",provider="nuapay"} 2
caddy_token_broker_refreshes_total{outcome="retry_now",provider="nuapay"} 1
caddy_token_broker_refreshes_total{outcome="token_rate_limited",provider="nuapay"} 1
`), "caddy_token_broker_refreshes_total"); err != nil {
		t.Error(err)
	}
}
