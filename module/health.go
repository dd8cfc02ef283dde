package module

import (
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/tokenbroker/caddy-token-broker/broker/probe"
)

func init() {
	caddy.RegisterModule(HealthHandler{})
	httpcaddyfile.RegisterHandlerDirective("token_broker_health", parseHealthCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("token_broker_health", httpcaddyfile.Before, "respond")
}

// HealthHandler answers the token broker's health probes on a site of the
// operator's choice, so that kubelet's httpGet probes, which reach the
// pod's IP and not the sidecar's loopback listener or the admin API, can
// ask: GET /ready answers 200 when the broker is ready and 503 when not,
// GET /live 200 when the token_broker app runs; the body is the probe.Health
// (JSON). Any other path is 404, any other method 405. It ends the route:
// nothing is proxied. The admin API (GET /token_broker/health) and `caddy
// token-broker health` give the same answer (adminapi.Instance.Health).
//
//	:8088 {
//	    token_broker_health
//	}
//
// It holds no configuration.
type HealthHandler struct {
	app *App
}

// CaddyModule returns the Caddy module information.
func (HealthHandler) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_broker_health",
		New: func() caddy.Module { return new(HealthHandler) },
	}
}

// Provision finds the token_broker app of the config.
func (hh *HealthHandler) Provision(ctx caddy.Context) error {
	app, err := ctx.App("token_broker")
	if err != nil {
		return err
	}
	hh.app = app.(*App)
	return nil
}

// ServeHTTP answers /ready and /live (probe.Serve).
func (hh *HealthHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	probe.Serve(w, r, hh.app.admin().Health)
	return nil
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	token_broker_health [<matcher>]
//
// It takes no arguments and no block.
func (hh *HealthHandler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.Errf("token_broker_health takes no arguments (got '%s'): it answers /ready and /live on the site it is in", d.Val())
	}
	if d.NextBlock(0) {
		return d.Errf("token_broker_health takes no block (got '%s')", d.Val())
	}
	return nil
}

func parseHealthCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var hh HealthHandler
	err := hh.UnmarshalCaddyfile(h.Dispenser)
	return &hh, err
}

// Interface guards.
var (
	_ caddy.Provisioner           = (*HealthHandler)(nil)
	_ caddyhttp.MiddlewareHandler = (*HealthHandler)(nil)
	_ caddyfile.Unmarshaler       = (*HealthHandler)(nil)
)
