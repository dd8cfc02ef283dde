package main

import "testing"

func TestMetricSum(t *testing.T) {
	body := `# HELP caddy_token_broker_l2_errors_total Redis calls that failed or timed out, by operation.
# TYPE caddy_token_broker_l2_errors_total counter
caddy_token_broker_l2_errors_total{op="get"} 3
caddy_token_broker_l2_errors_total{op="lock"} 2
# HELP caddy_token_broker_l2_bypassed_total Lookups that minted without the shared tier.
# TYPE caddy_token_broker_l2_bypassed_total counter
caddy_token_broker_l2_bypassed_total 0
caddy_token_broker_l2_bypassed_total_other 9
`
	tests := []struct {
		name string
		sum  float64
		ok   bool
	}{
		{"caddy_token_broker_l2_errors_total", 5, true},
		{"caddy_token_broker_l2_bypassed_total", 0, true},
		{"caddy_token_broker_l2_timeouts_total", 0, false},
	}
	for _, tt := range tests {
		if sum, ok := metricSum(body, tt.name); sum != tt.sum || ok != tt.ok {
			t.Errorf("metricSum(%s) = %v, %v; want %v, %v", tt.name, sum, ok, tt.sum, tt.ok)
		}
	}
}
