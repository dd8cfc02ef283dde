package telemetry

import (
	"errors"
	"testing"

	"github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/testutil"

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

// TestFetchOutcome: a successful call is ok, a failed one its error code.
func TestFetchOutcome(t *testing.T) {
	for _, tt := range []struct {
		err  error
		want string
	}{
		{nil, OutcomeOK},
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
