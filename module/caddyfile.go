package module

import (
	"strconv"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/caddyconfig/httpcaddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/dustin/go-humanize"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/callers"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
)

func init() {
	httpcaddyfile.RegisterGlobalOption("token_broker", parseGlobalOption)
	httpcaddyfile.RegisterHandlerDirective("token_broker", parseCaddyfile)
	// After request_header, so a route can still shape the merchant header;
	// before handle, route and reverse_proxy, so the token is set before
	// the request is proxied.
	httpcaddyfile.RegisterDirectiveOrder("token_broker", httpcaddyfile.After, "request_header")
}

// expandShorthands expands the Caddyfile's placeholder shorthands of s
// ({header.NAME}...) as the Caddyfile adapter does.
func expandShorthands(s string) string {
	seg := caddyfile.Segment{{Text: s}}
	httpcaddyfile.NewShorthandReplacer().ApplyToSegment(&seg)
	return seg[0].Text
}

func parseCaddyfile(h httpcaddyfile.Helper) (caddyhttp.MiddlewareHandler, error) {
	var hd Handler
	err := hd.UnmarshalCaddyfile(h.Dispenser)
	return &hd, err
}

// UnmarshalCaddyfile sets up the handler from Caddyfile tokens. Syntax:
//
//	token_broker [<matcher>] {
//	    merchant <placeholder>
//	    scopes   <scope...>
//	    header   Authorization
//	    errors   json|caddy
//	    config   <config.toml>
//	    interaction_id
//	    retry_on_401     invalid_token|any|off
//	    retry_body_limit <size>
//	}
//
// The block is optional. Unknown, repeated and malformed subdirectives are
// errors.
func (h *Handler) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // directive name
	if d.NextArg() {
		return d.Errf("token_broker takes no arguments (got '%s'): name the merchant registry with the token_broker global option's config", d.Val())
	}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		sub := d.Val()
		if err := once(d, seen); err != nil {
			return err
		}
		switch sub {
		case "config", "merchant", "header", "errors":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			switch sub {
			case "config":
				h.Config = v
			case "merchant":
				h.Merchant = v
			case "header":
				if err := outbound.CheckTokenHeader(v); err != nil {
					return d.Err(err.Error())
				}
				h.Header = v
			case "errors":
				if v != "json" && v != "caddy" {
					return d.Errf("errors must be json or caddy, not '%s'", v)
				}
				h.Errors = v
			}
		case "interaction_id":
			if err := noArgs(d); err != nil {
				return err
			}
			h.InteractionID = true
		case "retry_on_401":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			if err := (outbound.Retry{Mode: v}).Check(); err != nil {
				return d.Err(err.Error())
			}
			h.RetryOn401 = v
		case "retry_body_limit":
			v, err := oneArg(d)
			if err != nil {
				return err
			}
			n, err := humanize.ParseBytes(v)
			if err != nil || n > outbound.MaxRetryBodyLimit {
				return d.Errf("retry_body_limit '%s': want a size such as 64KiB (at most 16MiB: each retryable request holds its body in memory)", v)
			}
			h.RetryBodyLimit = int64(n)
		case "scopes":
			h.Scopes = d.RemainingArgs()
			if len(h.Scopes) == 0 {
				return d.ArgErr()
			}
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	return nil
}

// parseGlobalOption reads the token_broker global option. Syntax:
//
//	token_broker {
//	    config         <config.toml>
//	    refresh_window <fraction|percent>
//	    leeway         <duration>
//	    fetch_timeout  <duration>
//	    budget_wait    <duration>
//	    fleet_size     <n>
//	    metrics_merchant_label
//	    allowed_hosts  <host...>
//	    storage_encryption_key <base64> # and storage_encryption_keys_old <base64...>
//	}
func parseGlobalOption(d *caddyfile.Dispenser, existing any) (any, error) {
	if existing != nil && d.Next() {
		return nil, d.Err("token_broker global option given twice: put all its settings in one block")
	}
	var app App
	if err := app.UnmarshalCaddyfile(d); err != nil {
		return nil, err
	}
	return httpcaddyfile.App{Name: "token_broker", Value: caddyconfig.JSON(app, nil)}, nil
}

// UnmarshalCaddyfile sets up the app from the token_broker global option.
func (a *App) UnmarshalCaddyfile(d *caddyfile.Dispenser) error {
	d.Next() // option name
	if d.NextArg() {
		return d.ArgErr()
	}
	durations := map[string]*caddy.Duration{"leeway": &a.Leeway, "fetch_timeout": &a.FetchTimeout, "budget_wait": &a.BudgetWait}
	seen := map[string]bool{}
	for d.NextBlock(0) {
		sub := d.Val()
		if err := once(d, seen); err != nil {
			return err
		}
		if sub == "metrics_merchant_label" { // a flag: metrics.go
			if err := noArgs(d); err != nil {
				return err
			}
			a.Metrics = &MetricsConfig{MerchantLabel: true}
			continue
		}
		if sub == "allowed_hosts" { // callers.Site
			a.AllowedHosts = d.RemainingArgs()
			if len(a.AllowedHosts) == 0 {
				return d.Errf("allowed_hosts needs at least one host name (or *)")
			}
			if _, err := callers.NewSite(a.AllowedHosts); err != nil {
				return d.Errf("%v", err)
			}
			continue
		}
		if sub == "storage_encryption_keys_old" { // storage.go
			if a.StorageEncryptionKeysOld = d.RemainingArgs(); len(a.StorageEncryptionKeysOld) == 0 {
				return d.ArgErr()
			}
			continue
		}
		if sub == "callers" {
			p, err := parseCallers(d)
			if err != nil {
				return err
			}
			a.Callers = p
			continue
		}
		if sub == "redis" { // redis.go
			r, err := parseRedis(d)
			if err != nil {
				return err
			}
			a.Redis = r
			continue
		}
		if sub == "revoke_on_shutdown" {
			if err := noArgs(d); err != nil {
				return err
			}
			a.RevokeOnShutdown = true
			continue
		}
		v, err := oneArg(d)
		if err != nil {
			return err
		}
		switch sub {
		case "config":
			a.Config = v
		case "storage_encryption_key":
			a.StorageEncryptionKey = v
		case "refresh_window":
			f, err := broker.ParseFraction(v)
			if err != nil {
				return d.Errf("refresh_window '%s': want a fraction between 0 and 1 such as 0.25 or 25%%", v)
			}
			a.RefreshWindow = f
		case "fleet_size":
			n, err := strconv.Atoi(v)
			if err != nil || n < 1 || n > maxFleetSize {
				return d.Errf("fleet_size '%s': want the number of sidecars that share the providers' rate limits, from 1 to %d", v, maxFleetSize)
			}
			a.FleetSize = n
		case "leeway", "fetch_timeout", "budget_wait":
			dur, err := positiveDuration(d, sub, v, "2s")
			if err != nil {
				return err
			}
			*durations[sub] = dur
		default:
			return d.Errf("unrecognized subdirective '%s'", sub)
		}
	}
	return nil
}

// parseCallers reads the callers block of the global option.
func parseCallers(d *caddyfile.Dispenser) (*CallerPolicy, error) {
	if d.NextArg() {
		return nil, d.ArgErr()
	}
	p := &CallerPolicy{Allow: map[string][]string{}}
	fields := map[string]*string{"issuer": &p.Issuer, "audience": &p.Audience, "jwks_url": &p.JWKSURL,
		"jwks_file": &p.JWKSFile, "ca_file": &p.CAFile}
	seen := map[string]bool{}
	for nesting := d.Nesting(); d.NextBlock(nesting); {
		sub := d.Val()
		if sub == "allow" {
			args := d.RemainingArgs()
			if len(args) < 2 {
				return nil, d.Errf("allow needs a subject and at least one merchant (or *)")
			}
			p.Allow[args[0]] = append(p.Allow[args[0]], args[1:]...)
			continue
		}
		if err := once(d, seen); err != nil {
			return nil, err
		}
		v, err := oneArg(d)
		if err != nil {
			return nil, err
		}
		if field, ok := fields[sub]; ok {
			*field = v
			continue
		}
		switch sub {
		case "refresh_interval":
			dur, err := positiveDuration(d, sub, v, "30s")
			if err != nil {
				return nil, err
			}
			p.RefreshInterval = dur
		case "header":
			if !callers.IsCredentialHeader(v) {
				return nil, d.Errf("callers header '%s': the caller JWT can only be in Authorization or Proxy-Authorization, which Caddy's logs redact", v)
			}
			p.Header = v
		default:
			return nil, d.Errf("unrecognized callers subdirective '%s'", sub)
		}
	}
	if p.Issuer == "" || p.Audience == "" {
		return nil, d.Err("callers needs issuer and audience")
	}
	if p.JWKSFile != "" && (p.JWKSURL != "" || p.CAFile != "") {
		return nil, d.Err("callers: jwks_file holds the keys: drop jwks_url and ca_file, which would not be used")
	}
	return p, nil
}

// once fails on the second occurrence of a subdirective in a block.
func once(d *caddyfile.Dispenser, seen map[string]bool) error {
	if seen[d.Val()] {
		return d.Errf("duplicate subdirective '%s'", d.Val())
	}
	seen[d.Val()] = true
	return nil
}

// noArgs fails when a flag subdirective has arguments.
func noArgs(d *caddyfile.Dispenser) error {
	if d.NextArg() {
		return d.ArgErr()
	}
	return nil
}

// oneArg reads exactly one argument of a subdirective.
func oneArg(d *caddyfile.Dispenser) (string, error) {
	var v string
	if !d.Args(&v) || d.NextArg() {
		return "", d.ArgErr()
	}
	return v, nil
}

// positiveDuration reads the value v of subdirective sub as a positive
// duration; the error names the subdirective and shows an example.
func positiveDuration(d *caddyfile.Dispenser, sub, v, example string) (caddy.Duration, error) {
	dur, err := caddy.ParseDuration(v)
	if err != nil || dur <= 0 {
		return 0, d.Errf("%s '%s': want a positive duration like %s", sub, v, example)
	}
	return caddy.Duration(dur), nil
}

// Interface guards.
var (
	_ caddyfile.Unmarshaler = (*Handler)(nil)
	_ caddyfile.Unmarshaler = (*App)(nil)
)
