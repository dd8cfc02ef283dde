package module

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/broker/probe"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
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

// TestHealthAnswer: ready when every registry is loaded and every
// restricted wildcard's organisations list was read, a handler's own
// registry included; not live without the app.
func TestHealthAnswer(t *testing.T) {
	reg := func(t *testing.T, name string) *config.Registry {
		r, err := configtest.Load(t, name, []byte(`[providers.np]
type = "nuapay"
base_url = "https://nuapay.example"
api_key = "{env.KEY}"

[merchants.acme]
provider = "np"
organisation = "org-acme"
scopes = ["a"]
`), config.Options{LookupEnv: func(string) (string, bool) { return "partner-key", true }})
		if err != nil {
			t.Fatal(err)
		}
		return r
	}
	newListing := func(err error, read bool) *listing.Listing {
		l := listing.New("np", listerFunc(func(_ context.Context, _ nuapay.ListLimits, visit func(nuapay.Organisation)) error {
			visit(nuapay.Organisation{ID: "org-acme"})
			return err
		}), nuapay.ListLimits{}, time.Minute, zap.NewNop())
		if read {
			_, _ = l.Refresh(context.Background())
		}
		return l
	}
	down := errors.New("connection refused")
	tests := []struct {
		name       string
		app        bool
		appReg     bool
		handlerReg *listing.Listing // a handler's own registry with this listing (nil: none)
		ownReg     bool             // a handler's own registry without listing
		wantReady  bool
		wantLive   bool
		wantReason string
	}{
		{name: "no app", wantReason: "not live: the token_broker app is not running"},
		{name: "no registry", app: true, wantLive: true, wantReason: "not ready: no merchant registry is loaded"},
		{name: "the app's registry", app: true, appReg: true, wantReady: true, wantLive: true, wantReason: "ready: 1 merchant registry loaded, no provider failing"},
		{name: "a handler's own registry", app: true, ownReg: true, wantReady: true, wantLive: true, wantReason: "ready: 1 merchant registry loaded"},
		{name: "listing never read", app: true, appReg: true, handlerReg: newListing(down, true), wantLive: true,
			wantReason: `not ready: the organisations of provider "np" (only_listed_organisations) were never read, so its wildcard merchants are refused; the last read, at `},
		{name: "listing not read yet", app: true, appReg: true, handlerReg: newListing(nil, false), wantLive: true,
			wantReason: `were never read, so its wildcard merchants are refused`},
		{name: "listing read", app: true, appReg: true, handlerReg: newListing(nil, true), wantReady: true, wantLive: true, wantReason: "ready: 2 merchant registries loaded"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var app *App
			if tt.app {
				app = &App{watched: &probe.Watched{}, broker: broker.New(broker.Options{})}
				t.Cleanup(app.broker.Close)
				if tt.appReg {
					app.registry = reg(t, "app.toml")
				}
				if tt.ownReg {
					app.watched.Add(reg(t, "own.toml"), nil)
				}
				if tt.handlerReg != nil {
					app.watched.Add(reg(t, "own.toml"), tt.handlerReg)
				}
			}
			h := app.admin().Health()
			if h.Ready != tt.wantReady || h.Live != tt.wantLive || !strings.Contains(h.Reason, tt.wantReason) {
				t.Errorf("ready %v live %v reason %q, want ready %v live %v reason with %q", h.Ready, h.Live, h.Reason, tt.wantReady, tt.wantLive, tt.wantReason)
			}
			if tt.handlerReg != nil && strings.Contains(tt.name, "never read") && !strings.Contains(h.Reason, "failed: connection refused") {
				t.Errorf("reason %q does not give the listing's failure", h.Reason)
			}
		})
	}
}

// listerFunc is a function as a listing.OrganisationLister.
type listerFunc func(ctx context.Context, limits nuapay.ListLimits, visit func(nuapay.Organisation)) error

func (f listerFunc) EachOrganisation(ctx context.Context, limits nuapay.ListLimits, visit func(nuapay.Organisation)) error {
	return f(ctx, limits, visit)
}
