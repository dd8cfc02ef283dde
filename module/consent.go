package module

import (
	"errors"
	"fmt"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/tokenbroker/caddy-token-broker/broker/kvstore"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentpage"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
)

func init() {
	caddy.RegisterModule(Consent{})
	httpcaddyfile.RegisterHandlerDirective("token_broker_consent", parseConsentCaddyfile)
	httpcaddyfile.RegisterDirectiveOrder("token_broker_consent", httpcaddyfile.Before, "respond")
}

// Consent is the token_broker_consent handler: the merchants' consent
// (OAuth authorization-code flow) for one refresh_token provider with a
// [providers.NAME.consent] table in the token_broker app's registry.
//
// On the public callback site (a domain of the provider's redirect_uris,
// with Caddy's automatic HTTPS) it serves, under any path prefix, the
// steps GET …/start?link=… (a page that changes nothing), POST …/start,
// GET …/callback and GET …/done?result=…, with the consent cookie that
// binds a state to its browser; with Links (on the localhost sidecar
// site) it serves POST …/links instead, for the merchants of every
// provider with a consent table, under the app's caller policy. Package
// broker/oauth/consentweb has the contract of each step.
//
// Every other path, and every refusal, gets a page of its own
// (broker/oauth/consentpage: the built-in pages, branded with Partner,
// Logo and Accent, in Lang or the browser's language, or the operator's
// Templates), with a strict Content-Security-Policy. The requests are
// left out of Caddy's access log (their URLs hold a code, a state or a
// link), and the handler logs each outcome without them.
//
// The consents in progress live in Caddy's storage, sealed: several
// instances with several callback domains share them when they share the
// storage (as they must for the refresh tokens), and they survive reloads
// and restarts; expired ones are swept (kvstore.Sweeper).
type Consent struct {
	// Provider is the name of the provider (in the registry) whose consents
	// this handler runs. Required without Links; with Links it is
	// optional and only checked (links are for the merchant's provider).
	Provider string `json:"provider,omitempty"`

	// Links serves the consent-link API instead of start and callback, for
	// the merchants of every provider with a consent table. Put it on the
	// localhost sidecar site, never on the public one.
	Links bool `json:"links,omitempty"`

	// Partner is the partner's name on the consent pages. At most 100
	// characters. Optional.
	Partner string `json:"partner,omitempty"`
	// Logo is the partner's logo on the consent pages: a base64 data: URI
	// of a PNG, JPEG, GIF, WebP or SVG image (at most 64 KiB), or an
	// absolute path on the consent site ("/brand/logo.svg") that the site
	// serves; nothing is loaded from another origin. Optional.
	Logo string `json:"logo,omitempty"`
	// Accent is the pages' accent colour, a CSS hex colour (#rgb or
	// #rrggbb). Default #1f5fbf.
	Accent string `json:"accent,omitempty"`
	// Lang fixes the pages' language: en, de or fr. Default: the best
	// match of the browser's Accept-Language, else en.
	Lang string `json:"lang,omitempty"`
	// Templates is a directory of Go html/template files replacing the
	// built-in pages: page.html for every page and/or <page>.html for one
	// (a name of consentpage.Pages: start, success, used…), _*.html for
	// shared definitions; the start page must hold the form that posts
	// {{.Link}} to …/start. They are executed with consentpage.Data; each
	// is parsed and executed against sample data at provision time, and a
	// template that fails (syntax, unknown field) is refused with its file
	// and line. Optional.
	Templates string `json:"templates,omitempty"`

	web     *consentweb.Handler
	metrics *telemetry.ConsentSteps
}

// CaddyModule returns the Caddy module information.
func (Consent) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.handlers.token_broker_consent",
		New: func() caddy.Module { return new(Consent) },
	}
}

// Provision finds the provider's consent flow in the app's registry.
func (c *Consent) Provision(ctx caddy.Context) error {
	appIface, err := ctx.App("token_broker")
	if err != nil {
		return err
	}
	app := appIface.(*App)
	if c.Provider == "" && !c.Links {
		return errors.New("token_broker_consent: provider is required: name the refresh_token provider whose merchants consent here")
	}
	pageCfg := consentpage.Config{Partner: c.Partner, Logo: c.Logo, Accent: c.Accent, Lang: c.Lang, Templates: c.Templates}
	if c.Links && pageCfg != (consentpage.Config{}) {
		return errors.New("token_broker_consent: links: partner, logo, accent, lang and templates brand the pages of the public consent site, not the links endpoint: move them to the handler with the provider")
	}
	pages, err := consentpage.New(pageCfg)
	if err != nil {
		return fmt.Errorf("token_broker_consent: %w", err)
	}
	if c.metrics, err = loadCollectors(ctx.GetMetricsRegistry(), consentMetricsKey, telemetry.NewConsentSteps); err != nil {
		return err
	}
	c.web, err = consentweb.New(consentweb.Options{Provider: c.Provider, Links: c.Links, Registry: app.registry,
		Broker: app.broker, Gate: consentweb.CallerGate{Hosts: app.site, Policy: app.callers}, Pages: pages,
		Results: &consentpage.Results{Store: kvstore.Pending{S: ctx.Storage()}}, Steps: c.metrics.Steps, Logger: ctx.Logger(),
		Consented: app.tracker.ConsentGranted})
	if err != nil {
		return fmt.Errorf("token_broker_consent: %w", err)
	}
	return nil
}

// ServeHTTP leaves the request out of Caddy's access log and serves it
// (consentweb.Handler).
func (c *Consent) ServeHTTP(w http.ResponseWriter, r *http.Request, _ caddyhttp.Handler) error {
	caddyhttp.SetVar(r.Context(), caddyhttp.LogSkipVar, true)
	c.web.ServeHTTP(w, r)
	return nil
}

// consentMetricsKey is the key of the consent steps' counter in
// metricsPool.
const consentMetricsKey = "consent metrics"

// Cleanup ends the handler's use of the shared metrics.
func (c *Consent) Cleanup() error {
	if c.metrics != nil {
		_, err := metricsPool.Delete(consentMetricsKey)
		return err
	}
	return nil
}

func parseConsentCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var c Consent
	err := c.UnmarshalCaddyfile(h.Dispenser)
	return &c, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	token_broker_consent [<matcher>] [<provider>] {
//	    links
//	    partner   <name>
//	    logo      <data: URI | /path/on/the/site>
//	    accent    "<#rrggbb>"   (quoted: an unquoted # starts a comment)
//	    lang      <en|de|fr>
//	    templates <directory>
//	}
//
// The provider is required without links; partner, logo, accent, lang
// and templates (the consent pages) only go with a provider.
func (c *Consent) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		c.Provider = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	pages := map[string]*string{"partner": &c.Partner, "logo": &c.Logo, "accent": &c.Accent, "lang": &c.Lang, "templates": &c.Templates}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		if err := once(d, seen); err != nil {
			return err
		}
		switch d.Val() {
		case "links":
			if err := noArgs(d); err != nil {
				return err
			}
			c.Links = true
		case "partner", "logo", "accent", "lang", "templates":
			name := d.Val()
			if !d.NextArg() {
				if name == "accent" {
					return d.Err(`accent needs a CSS hex colour, quoted: accent "#1f5fbf" (an unquoted # starts a comment)`)
				}
				return d.ArgErr()
			}
			v := d.Val()
			if d.NextArg() {
				return d.Errf("%s takes one value (quote a value with spaces)", name)
			}
			*pages[name] = v
		default:
			return d.Errf("unrecognized subdirective '%s'", d.Val())
		}
	}
	if c.Provider == "" && !c.Links {
		return d.Err("token_broker_consent needs the provider's name (or the links subdirective)")
	}
	return nil
}

// Interface guards.
var (
	_ caddyhttp.MiddlewareHandler = (*Consent)(nil)
	_ caddy.Provisioner           = (*Consent)(nil)
	_ caddy.CleanerUpper          = (*Consent)(nil)
	_ caddyfile.Unmarshaler       = (*Consent)(nil)
)
