package module

import (
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

// TestHealthCaddyfile: the directive takes no argument and no block.
func TestHealthCaddyfile(t *testing.T) {
	for _, tt := range []struct{ input, wantErr string }{
		{"token_broker_health", ""},
		{"token_broker_health /ready", "takes no arguments (got '/ready')"},
		{"token_broker_health {\n\tready /healthz\n}", "takes no block (got 'ready')"},
	} {
		var hh HealthHandler
		err := hh.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
		if tt.wantErr == "" && err != nil || tt.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tt.wantErr)) {
			t.Errorf("%q: error %v, want %q", tt.input, err, tt.wantErr)
		}
	}
}
