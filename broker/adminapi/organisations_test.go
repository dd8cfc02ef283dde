package adminapi

import (
	"context"
	"errors"
	"net/http"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/config"
)

// TestOrganisationsRefusals: the statuses of requests that reach no
// listing.
func TestOrganisationsRefusals(t *testing.T) {
	ctx := context.Background()
	reg := &config.Registry{Providers: map[string]*config.Provider{"bank": {Name: "bank"}}}
	tests := []struct {
		name string
		call func() error
		want int
	}{
		{"no registry", func() error { _, err := Organisations(ctx, nil, "bank"); return err }, http.StatusNotFound},
		{"unknown provider", func() error { _, err := Organisations(ctx, reg, "other"); return err }, http.StatusNotFound},
		{"provider that cannot list", func() error { _, err := Organisations(ctx, reg, "bank"); return err }, http.StatusConflict},
		{"refresh without listing", func() error { _, err := RefreshListing(ctx, nil, "bank"); return err }, http.StatusMethodNotAllowed},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var ae *Error
			if err := tt.call(); !errors.As(err, &ae) || ae.Status != tt.want {
				t.Fatalf("error %v, want status %d", err, tt.want)
			}
		})
	}
}
