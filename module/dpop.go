package module

import (
	"context"
	"net/http"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp/reverseproxy"

	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
)

func init() {
	caddy.RegisterModule(DPoPTransport{})
}

// dpopVar is the request variable (caddyhttp.VarsCtxKey) in which the
// token_broker handler hands a DPoP-bound request's *outbound.DPoP to the
// transport.
const dpopVar = "token_broker.dpop"

// DPoPTransport is Caddy's http transport (reverse_proxy's default, with
// all its options) that sends the requests of the token_broker handler
// whose token is DPoP-bound (RFC 9449) with their token and its proof:
// the handler does not put a DPoP-bound token on the request, and each
// attempt this transport sends upstream gets "Authorization: DPoP <token>"
// and a fresh proof in the DPoP header, made for the method and URL the
// upstream receives (after reverse_proxy chose the upstream and the route
// rewrote the path, with the Host header sent), with ath the hash of the
// token and the nonce the upstream last sent. Nonces are remembered per
// upstream origin (the scheme and address reverse_proxy sends to, not the
// Host header); a `use_dpop_nonce` 401 that brings a new nonce is retried
// once by the token_broker handler. Requests without a DPoP-bound token
// pass through unchanged.
//
// A provider with a `[providers.X.dpop]` key needs this transport on
// every reverse_proxy behind its token_broker routes:
//
//	reverse_proxy https://api.bank.example {
//		transport token_broker_dpop {
//			# any option of the http transport
//		}
//	}
//
// A route without it sends its requests with no credential at all (the
// token never leaves without its proof); a 401 answer to such a request
// becomes 502 dpop_transport_missing.
//
// In JSON it is `"transport": {"protocol": "token_broker_dpop", ...}` with
// the fields of the http transport.
type DPoPTransport struct {
	// HTTPTransport is Caddy's http transport, which sends the requests:
	// its fields are this transport's options (JSON and Caddyfile alike;
	// its UnmarshalCaddyfile reads the Caddyfile block).
	reverseproxy.HTTPTransport
}

// CaddyModule returns the Caddy module information.
func (DPoPTransport) CaddyModule() caddy.ModuleInfo {
	return caddy.ModuleInfo{
		ID:  "http.reverse_proxy.transport.token_broker_dpop",
		New: func() caddy.Module { return new(DPoPTransport) },
	}
}

// RoundTrip sends req, with a proof on a copy (SignCopy: reverse_proxy
// logs the request it gave) when the token_broker handler bound it to a key.
func (t *DPoPTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	d := dpopOf(req.Context())
	if d == nil {
		return t.HTTPTransport.RoundTrip(req)
	}
	t.SetScheme(req)
	var scheme, host string // of the caller's request, which X-Forwarded-* name
	if repl, ok := req.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer); ok {
		scheme, _ = repl.GetString("http.request.scheme")
		host, _ = repl.GetString("http.request.hostport")
	}
	sent, err := d.SignCopy(req, scheme, host, time.Now())
	if err != nil {
		return nil, err
	}
	resp, err := t.HTTPTransport.RoundTrip(sent)
	if err == nil {
		d.Observe(sent, resp.Header) // a refused nonce stays on d: outbound.Retry reports it (NonceRefused)
	}
	return resp, err
}

// dpopOf returns the request's DPoP binding (nil: none).
func dpopOf(ctx context.Context) *outbound.DPoP {
	d, _ := caddyhttp.GetVar(ctx, dpopVar).(*outbound.DPoP)
	return d
}

// tokenNonceChallenged counts a DPoP nonce challenge of provider's token
// or PAR endpoint (config.Options.OnDPoPNonce) on the metrics of the app
// running now: a registry outlives the config that loaded it
// (regcache.go).
func tokenNonceChallenged(provider string) {
	if a := current.Load(); a != nil {
		a.metrics.NonceChallenged(provider, telemetry.ServerToken)
	}
}

// Interface guards: what reverse_proxy asks of its transport, and the
// TLS, h2c, proxy protocol and Host header behaviour of the http
// transport.
var (
	_ caddy.Provisioner                                = (*DPoPTransport)(nil)
	_ caddy.CleanerUpper                               = (*DPoPTransport)(nil)
	_ caddyfile.Unmarshaler                            = (*DPoPTransport)(nil)
	_ http.RoundTripper                                = (*DPoPTransport)(nil)
	_ reverseproxy.TLSTransport                        = (*DPoPTransport)(nil)
	_ reverseproxy.H2CTransport                        = (*DPoPTransport)(nil)
	_ reverseproxy.HealthCheckSchemeOverriderTransport = (*DPoPTransport)(nil)
	_ reverseproxy.ProxyProtocolTransport              = (*DPoPTransport)(nil)
	_ reverseproxy.RequestHeaderOpsTransport           = (*DPoPTransport)(nil)
)
