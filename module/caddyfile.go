package module

import (
	"strconv"
	"strings"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
)

func init() {
	httpcaddyfile.RegisterHandlerDirective("token_broker", parseCaddyfile)
	// After request_header, so a route can still shape the merchant header;
	// before handle, route and reverse_proxy, so the token is set before
	// the request is proxied.
	httpcaddyfile.RegisterDirectiveOrder("token_broker", httpcaddyfile.After, "request_header")
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var hd Handler
	err := hd.UnmarshalCaddyfile(h.Dispenser)
	return &hd, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	token_broker [<matcher>] [<config.toml>] {
//	    config         <config.toml>
//	    merchant       <placeholder>
//	    scopes         <scope...>
//	    header         <name>
//	    refresh_window <fraction|percent>
//	    leeway         <duration>
//	    fetch_timeout  <duration>
//	    errors         json|caddy
//	}
//
// Unknown, repeated and malformed subdirectives are errors.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		h.Config = d.Val()
	}
	if d.NextArg() {
		return d.ArgErr()
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		sub := d.Val()
		if seen[sub] {
			return d.Errf("duplicate subdirective '%s'", sub)
		}
		seen[sub] = true
		switch sub {
		case "config", "merchant", "header", "errors":
			var v string
			if !d.Args(&v) {
				return d.ArgErr()
			}
			if d.NextArg() {
				return d.ArgErr()
			}
			switch sub {
			case "config":
				if h.Config != "" {
					return d.Err("config given twice: as an argument and as a subdirective")
				}
				h.Config = v
			case "merchant":
				h.Merchant = v
			case "header":
				h.Header = v
			case "errors":
				if v != "json" && v != "caddy" {
					return d.Errf("errors must be json or caddy, not '%s'", v)
				}
				h.Errors = v
			}
		case "scopes":
			h.Scopes = d.RemainingArgs()
			if len(h.Scopes) == 0 {
				return d.ArgErr()
			}
		case "refresh_window":
			var v string
			if !d.Args(&v) || d.NextArg() {
				return d.ArgErr()
			}
			f, err := parseFraction(v)
			if err != nil {
				return d.Errf("refresh_window '%s': %v", v, err)
			}
			h.RefreshWindow = f
		case "leeway", "fetch_timeout":
			var v string
			if !d.Args(&v) || d.NextArg() {
				return d.ArgErr()
			}
			dur, err := caddy.ParseDuration(v)
			if err != nil || dur <= 0 {
				return d.Errf("%s '%s': want a positive duration like 2s", sub, v)
			}
			if sub == "leeway" {
				h.Leeway = caddy.Duration(dur)
			} else {
				h.FetchTimeout = caddy.Duration(dur)
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	if h.Config == "" {
		return d.Err("token_broker needs the path of the TOML merchant registry: token_broker <config.toml>")
	}
	return nil
}

// parseFraction reads "0.25" or "25%".
func parseFraction(v string) (float64, error) {
	pct, isPct := strings.CutSuffix(v, "%")
	f, err := strconv.ParseFloat(pct, 64)
	if err != nil {
		return 0, err
	}
	if isPct {
		f /= 100
	}
	if f <= 0 || f >= 1 {
		return 0, strconv.ErrRange
	}
	return f, nil
}

// Interface guard.
var _ caddyfile.Unmarshaler = (*Handler)(nil)
