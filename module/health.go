package module

import (
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// This file answers "is the token broker ready, is it alive": the same
// answer (Health) in three places, the admin API (GET
// /token_broker/health, admin.go), the `caddy token-broker health`
// command (command.go) and the token_broker_health handler, which an
// operator serves on a port kubelet's probes can reach.
//
// Ready: every merchant registry is loaded and, where the wildcard entry
// is restricted to the listed organisations (only_listed_organisations),
// the list has been read at least once. Live: the token_broker app is
// provisioned and running. A provider whose token API fails is reported
// (Providers) but leaves the broker ready: taking the pod out of service
// or restarting it would not mend the provider, and the other providers'
// merchants are still served.

func init() {
	caddy.RegisterModule(HealthHandler{})
	httpcaddyfile.RegisterHandlerDirective("token_broker_health", parseHealthCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("token_broker_health", httpcaddyfile.Before, "respond")
}

// Health is the token broker's health answer. It never holds a token or
// a secret.
type Health struct {
	// Ready is true when every check passed: the broker can serve.
	Ready bool `json:"ready"`
	// Live is true when the token_broker app is running.
	Live bool `json:"live"`
	// Reason says in one line why the broker is not ready, or what is
	// ready (and which providers are failing).
	Reason string `json:"reason"`
	// Checks are the readiness checks, each with its outcome.
	Checks []HealthCheck `json:"checks"`
	// Providers are the providers of the registries and what their
	// recent token API calls left: reported, never a readiness failure.
	Providers []ProviderHealth `json:"providers,omitempty"`
}

// HealthCheck is one readiness check.
type HealthCheck struct {
	// Name is "app", "registry" or "organisations".
	Name string `json:"name"`
	// OK is true when the check passed.
	OK bool `json:"ok"`
	// Detail says what was checked and found.
	Detail string `json:"detail"`
}

// ProviderHealth is a provider's recent health, as the failures of its
// token API calls left it (no call is made to find out).
type ProviderHealth struct {
	// Name is the provider's name in the registry.
	Name string `json:"name"`
	// Type is its type ("nuapay", "oauth2").
	Type string `json:"type"`
	// Registry is the registry it is defined in (its path, as given).
	Registry string `json:"registry"`
	// Status is "ok", or "failing" when its breaker is not closed, it is
	// held, or some of its keys are in failure memory.
	Status string `json:"status"`
	// Breaker is the state of its circuit breaker: closed, half-open or
	// open.
	Breaker string `json:"breaker"`
	// HeldUntil is until when its token API is not called for any key (a
	// 429 with Retry-After, or a bad credential), if such a hold is in
	// force.
	HeldUntil *time.Time `json:"held_until,omitempty"`
	// FailingKeys counts its cache keys whose last fetch failed and whose
	// backoff has not ended.
	FailingKeys int `json:"failing_keys,omitempty"`
	// LastError is the error code (as a request gets it, e.g.
	// token_unavailable) of its most recent failure. Never the provider's
	// text.
	LastError string `json:"last_error,omitempty"`
}

// watchedRegistry is a registry that a handler loaded itself (its own
// `config`), with its organisation listing (nil when not restricted): the
// health answer covers it besides the app's.
type watchedRegistry struct {
	reg     *config.Registry
	listing *listing.Listing
}

// watchList are the registries handlers loaded themselves.
type watchList struct {
	mu   sync.Mutex
	regs []watchedRegistry
}

// watch adds a handler's own registry to the health answer.
func (a *App) watch(reg *config.Registry, listing *listing.Listing) {
	if a.watched == nil {
		return // an app not provisioned (tests)
	}
	a.watched.mu.Lock()
	defer a.watched.mu.Unlock()
	if !slices.ContainsFunc(a.watched.regs, func(w watchedRegistry) bool { return w.reg == reg }) {
		a.watched.regs = append(a.watched.regs, watchedRegistry{reg: reg, listing: listing})
	}
}

// registries are the app's registry (first) and the handlers' own.
func (a *App) registries() []watchedRegistry {
	var out []watchedRegistry
	if a.registry != nil {
		out = append(out, watchedRegistry{reg: a.registry, listing: a.listing})
	}
	if a.watched == nil {
		return out
	}
	a.watched.mu.Lock()
	defer a.watched.mu.Unlock()
	return append(out, a.watched.regs...)
}

// health computes the health answer of app (nil: not running).
func health(app *App) Health {
	h := Health{Checks: []HealthCheck{}}
	if app == nil {
		h.Checks = append(h.Checks, HealthCheck{Name: "app", Detail: "the token_broker app is not running: the loaded config has no token_broker global option or handler"})
		h.Reason = "not live: " + h.Checks[0].Detail
		return h
	}
	h.Live = true
	h.Checks = append(h.Checks, HealthCheck{Name: "app", OK: true, Detail: "the token_broker app is running"})
	regs := app.registries()
	if len(regs) == 0 {
		h.Checks = append(h.Checks, HealthCheck{Name: "registry", Detail: "no merchant registry is loaded: set `config <file.toml>` in the token_broker global option"})
	}
	var ids []string
	for _, w := range regs {
		h.Checks = append(h.Checks, HealthCheck{Name: "registry", OK: true,
			Detail: fmt.Sprintf("%s: %d merchants, %d providers", w.reg.Path, len(w.reg.Merchants), len(w.reg.Providers))})
		if w.listing != nil {
			h.Checks = append(h.Checks, listingCheck(w.listing))
		}
		for _, p := range w.reg.Providers {
			ids = append(ids, p.ID)
		}
	}
	var sources map[string]broker.SourceHealth
	if app.broker != nil {
		sources = app.broker.SourcesHealth(ids...)
	}
	var failing []string
	for _, w := range regs {
		for _, name := range slices.Sorted(maps.Keys(w.reg.Providers)) {
			p := w.reg.Providers[name]
			ph := providerHealth(p, sources[p.ID])
			ph.Registry = w.reg.Path
			if ph.Status != "ok" {
				failing = append(failing, fmt.Sprintf("%s (%s)", p.Name, ph.LastError))
			}
			h.Providers = append(h.Providers, ph)
		}
	}
	h.Ready = true
	var problems []string
	for _, c := range h.Checks {
		if !c.OK {
			h.Ready = false
			problems = append(problems, c.Detail)
		}
	}
	switch {
	case !h.Ready:
		h.Reason = "not ready: " + strings.Join(problems, "; ")
	case len(failing) > 0:
		h.Reason = fmt.Sprintf("ready: %s; failing providers (reported, not a readiness failure): %s", loaded(len(regs)), strings.Join(failing, ", "))
	default:
		h.Reason = fmt.Sprintf("ready: %s, no provider failing", loaded(len(regs)))
	}
	return h
}

// loaded says how many registries are loaded.
func loaded(n int) string {
	if n == 1 {
		return "1 merchant registry loaded"
	}
	return fmt.Sprintf("%d merchant registries loaded", n)
}

// listingCheck checks that an organisation listing was read at least once.
func listingCheck(l *listing.Listing) HealthCheck {
	c := HealthCheck{Name: "organisations"}
	st := l.Status()
	if st.Read {
		c.OK = true
		c.Detail = fmt.Sprintf("provider %q lists %d organisations (read at %s)", l.Provider(), st.Organisations,
			st.ReadAt.UTC().Format(time.RFC3339))
		return c
	}
	c.Detail = fmt.Sprintf("the organisations of provider %q (only_listed_organisations) were never read, so its wildcard merchants are refused", l.Provider())
	if st.Err != nil {
		c.Detail += fmt.Sprintf("; the last read, at %s, failed: %v", st.FailedAt.UTC().Format(time.RFC3339), st.Err)
	}
	return c
}

// providerHealth reports a provider's source health.
func providerHealth(p *config.Provider, s broker.SourceHealth) ProviderHealth {
	ph := ProviderHealth{Name: p.Name, Type: p.Type, Status: "ok", Breaker: s.Breaker.String(), FailingKeys: s.FailingKeys}
	if !s.HeldUntil.IsZero() {
		until := s.HeldUntil.UTC()
		ph.HeldUntil = &until
	}
	if s.Failing() {
		ph.Status = "failing"
		err := s.LastError
		if err == nil {
			err = s.HoldError
		}
		if err != nil {
			ph.LastError = errcode.Classify(err).String()
		} else {
			ph.LastError = "token_api_down" // the breaker is open
		}
	}
	return ph
}

// health serves GET /token_broker/health (readiness: 200 when ready,
// 503 otherwise) and GET /token_broker/health/live (liveness) on the
// admin API, with the Health as the body.
func (adminAPI) health(w http.ResponseWriter, r *http.Request) error {
	live := false
	switch r.URL.Path {
	case "/token_broker/health", "/token_broker/health/ready":
	case "/token_broker/health/live":
		live = true
	default:
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("use /token_broker/health (readiness) or /token_broker/health/live")}
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: fmt.Errorf("method not allowed: use GET")}
	}
	writeHealth(w, r, health(current.Load()), live)
	return nil
}

// writeHealth answers with h: 200 when ready (live: when live), 503
// otherwise.
func writeHealth(w http.ResponseWriter, r *http.Request, h Health, live bool) {
	ok := h.Ready
	if live {
		ok = h.Live
	}
	status := http.StatusOK
	if !ok {
		status = http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_ = json.NewEncoder(w).Encode(h)
	}
}

// HealthHandler answers the token broker's health probes on a site of the
// operator's choice, so that kubelet's httpGet probes, which reach the
// pod's IP and not the sidecar's loopback listener or the admin API, can
// ask: GET /ready answers 200 when the broker is ready and 503 when not,
// GET /live 200 when the token_broker app runs; the body is the Health
// (JSON). Any other path is 404, any other method 405. It ends the route:
// nothing is proxied.
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

// ServeHTTP answers /ready and /live.
func (hh *HealthHandler) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	var live bool
	switch r.URL.Path {
	case "/ready":
	case "/live":
		live = true
	default:
		writeHealthError(w, http.StatusNotFound, "not_found", "the token broker's health handler answers GET /ready (readiness) and GET /live (liveness)")
		return nil
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		writeHealthError(w, http.StatusMethodNotAllowed, "method_not_allowed", "use GET")
		return nil
	}
	writeHealth(w, r, health(hh.app), live)
	return nil
}

func writeHealthError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(errorBody{Error: code, Message: msg})
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
