// Package probe computes the token broker's health answer, "is it
// ready, is it alive" (Running, NotRunning), over the app's registries
// and those handlers loaded themselves (Watched), and writes it as an
// HTTP answer for probes (Write; Serve for a health site's /ready and
// /live).
//
// Ready: every merchant registry is loaded and, where the wildcard entry
// is restricted to the listed organisations (only_listed_organisations),
// the list has been read at least once. Live: the token_broker app is
// provisioned and running. A provider whose token API fails is reported
// (Providers) but leaves the broker ready: taking the pod out of service
// or restarting it would not mend the provider, and the other providers'
// merchants are still served.
package probe

import (
	"cmp"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"slices"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/listing"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// Health is the token broker's health answer. It never contains a token or
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
	Checks []Check `json:"checks"`
	// Providers are the providers of the registries and what their
	// recent token API calls left: reported, never a readiness failure.
	Providers []Provider `json:"providers,omitempty"`
}

// Passes reports whether h passes its probe: readiness, or liveness
// with live.
func (h Health) Passes(live bool) bool {
	if live {
		return h.Live
	}
	return h.Ready
}

// Check is one readiness check.
type Check struct {
	// Name is "app", "registry" or "organisations".
	Name string `json:"name"`
	// OK is true when the check passed.
	OK bool `json:"ok"`
	// Detail says what was checked and found.
	Detail string `json:"detail"`
}

// Provider is a provider's recent health, as the failures of its token
// API calls left it (no call is made to find out).
type Provider struct {
	// Name is the provider's name in the registry.
	Name string `json:"name"`
	// Type is its type ("nuapay", "oauth2").
	Type string `json:"type"`
	// Registry is the registry it is defined in (its path, as given).
	Registry string `json:"registry"`
	// Status is "ok", or "failing" when its breaker is not closed, it is
	// backing off, or some of its keys are in failure memory.
	Status string `json:"status"`
	// Breaker is the state of its circuit breaker: closed, half-open or
	// open.
	Breaker string `json:"breaker"`
	// BackoffUntil is until when its token API is not called for any key (a
	// 429, or a bad credential), if such a backoff is in
	// force.
	BackoffUntil *time.Time `json:"held_until,omitempty"`
	// FailingKeys counts its cache keys whose last fetch failed and whose
	// backoff has not ended.
	FailingKeys int `json:"failing_keys,omitempty"`
	// LastError is the error code (as a request gets it, e.g.
	// token_unavailable) of its most recent failure. Never the provider's
	// text.
	LastError string `json:"last_error,omitempty"`
}

// Registry is a loaded merchant registry and, where its wildcard entry
// is restricted to the listed organisations, the state of that list.
type Registry struct {
	// Registry is the loaded registry.
	Registry *config.Registry
	// Listing is the state of its organisation list; nil when not
	// restricted.
	Listing *Listing
}

// Listing is the state of an organisation list.
type Listing struct {
	// Provider whose organisations are listed.
	Provider string
	listing.Status
}

// NotRunning is the answer when the token_broker app is not running.
func NotRunning() Health {
	c := Check{Name: "app", Detail: "the token_broker app is not running: the loaded config has no token_broker global option or handler"}
	return Health{Checks: []Check{c}, Reason: "not live: " + c.Detail}
}

// Running is the answer of a running app with the registries regs (its
// own first) whose providers' source health br reports (br may be nil).
func Running(regs []Registry, br *broker.Broker) Health {
	h := Health{Live: true, Checks: []Check{{Name: "app", OK: true, Detail: "the token_broker app is running"}}}
	if len(regs) == 0 {
		h.Checks = append(h.Checks, Check{Name: "registry", Detail: "no merchant registry is loaded: set `config <file.toml>` in the token_broker global option"})
	}
	var ids []string
	for _, w := range regs {
		h.Checks = append(h.Checks, Check{Name: "registry", OK: true,
			Detail: fmt.Sprintf("%s: %d merchants, %d providers", w.Registry.Path, len(w.Registry.Merchants), len(w.Registry.Providers))})
		if w.Listing != nil {
			h.Checks = append(h.Checks, listingCheck(w.Listing))
		}
		for _, p := range w.Registry.Providers {
			ids = append(ids, p.ID)
		}
	}
	var sources map[string]broker.SourceHealth
	if br != nil {
		sources = br.SourcesHealth(ids...)
	}
	var failing []string
	for _, w := range regs {
		for _, name := range slices.Sorted(maps.Keys(w.Registry.Providers)) {
			p := w.Registry.Providers[name]
			ph := providerHealth(p, sources[p.ID])
			ph.Registry = w.Registry.Path
			if ph.Status != "ok" {
				failing = append(failing, fmt.Sprintf("%s (%s)", p.Name, ph.LastError))
			}
			h.Providers = append(h.Providers, ph)
		}
	}
	var problems []string
	for _, c := range h.Checks {
		if !c.OK {
			problems = append(problems, c.Detail)
		}
	}
	h.Ready = len(problems) == 0
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

// listingCheck checks that an organisation list was read at least once.
func listingCheck(l *Listing) Check {
	c := Check{Name: "organisations"}
	if l.Read {
		c.OK = true
		c.Detail = fmt.Sprintf("provider %q lists %d organisations (read at %s)", l.Provider, l.Organisations,
			l.ReadAt.UTC().Format(time.RFC3339))
		return c
	}
	c.Detail = fmt.Sprintf("the organisations of provider %q (only_listed_organisations) were never read, so its wildcard merchants are refused", l.Provider)
	if l.Err != nil {
		c.Detail += fmt.Sprintf("; the last read, at %s, failed: %v", l.FailedAt.UTC().Format(time.RFC3339), l.Err)
	}
	return c
}

// providerHealth reports a provider's source health.
func providerHealth(p *config.Provider, s broker.SourceHealth) Provider {
	ph := Provider{Name: p.Name, Type: p.Type, Status: "ok", Breaker: s.Breaker.String(), FailingKeys: s.FailingKeys}
	ph.BackoffUntil = opstate.TimePtr(s.BackoffUntil)
	if s.Failing() {
		ph.Status = "failing"
		code := errcode.TokenAPIDown // the breaker is open
		if err := cmp.Or(s.LastError, s.BackoffError); err != nil {
			code = errcode.Classify(err)
		}
		ph.LastError = code.String()
	}
	return ph
}

// Write answers with h: 200 when ready (live: when live), 503
// otherwise; no body to HEAD.
func Write(w http.ResponseWriter, r *http.Request, h Health, live bool) {
	status := http.StatusOK
	if !h.Passes(live) {
		status = http.StatusServiceUnavailable
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	if r.Method != http.MethodHead {
		_ = json.NewEncoder(w).Encode(h)
	}
}

// Serve answers the probes of a health site: GET (or HEAD) /ready
// (readiness) and /live (liveness), with the answer of health; any other
// path is 404, any other method 405.
func Serve(w http.ResponseWriter, r *http.Request, health func() Health) {
	var live bool
	switch r.URL.Path {
	case "/ready":
	case "/live":
		live = true
	default:
		WriteError(w, http.StatusNotFound, "not_found", "the token broker's health handler answers GET /ready (readiness) and GET /live (liveness)")
		return
	}
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		WriteError(w, http.StatusMethodNotAllowed, "method_not_allowed", "use GET")
		return
	}
	Write(w, r, health(), live)
}

// WriteError answers a request that is not a probe: {"error": code,
// "message": msg}.
func WriteError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(struct {
		Error   string `json:"error"`
		Message string `json:"message"`
	}{code, msg})
}
