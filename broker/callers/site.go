package callers

import (
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// Site decides whether a request may use the sidecar's site: the
// token_broker handler and the consent links endpoint act for any merchant,
// so they serve the applications on the host (or those an operator
// names), never a web page.
//
//   - Host: a loopback name (localhost, 127.0.0.0/8, [::1]; any port) or
//     one of allowed_hosts, else 421 host_not_allowed: a DNS-rebinding
//     page is same-origin to the browser but sends its own name as Host.
//   - Browser requests from another origin (Sec-Fetch-Site other than
//     same-origin or none; without it, an Origin whose host is not the
//     Host) are refused with 403 cross_site_request: a text/plain POST
//     needs no CORS preflight.
//
// A client that is not a browser sends neither header: it is not
// affected.
type Site struct {
	anyHost bool                // allowed_hosts holds "*"
	hosts   map[string]struct{} // the other allowed hosts, normalised (siteHost)
}

// NewSite returns the guard of the app's allowed_hosts: host names or
// IP addresses, without scheme or port, or "*" for any Host.
func NewSite(allowed []string) (Site, error) {
	g := Site{hosts: map[string]struct{}{}}
	for i, h := range allowed {
		if h == "*" {
			g.anyHost = true
			continue
		}
		n := siteHost(h)
		if n == "" || strings.ContainsAny(n, "/?#@*% ") || (strings.Contains(n, ":") && !isIP(n)) {
			return Site{}, fmt.Errorf("token_broker: allowed_hosts[%d] %q: want a host name or IP address without scheme or port (e.g. sidecar.payments.svc), or * for any host", i, h)
		}
		g.hosts[n] = struct{}{}
	}
	return g, nil
}

// Check refuses a request the site must not serve; a zero code lets it
// go on. The error, when non-nil, is for the log: it says what was refused
// and what the operator can do.
func (g *Site) Check(r *http.Request) (errcode.Code, error) {
	if !g.allowsHost(r.Host) {
		return errcode.HostNotAllowed,
			fmt.Errorf("host %.100q is neither a loopback name nor in the token_broker app's allowed_hosts (add it there if applications reach the sidecar by that name)", r.Host)
	}
	if site := r.Header.Get("Sec-Fetch-Site"); site != "" {
		if site != "same-origin" && site != "none" {
			return errcode.CrossSiteRequest, fmt.Errorf("browser request with Sec-Fetch-Site %.20q", site)
		}
		return 0, nil
	}
	if origin := r.Header.Get("Origin"); origin != "" {
		if u, err := url.Parse(origin); err != nil || u.Host == "" || !strings.EqualFold(u.Host, r.Host) {
			return errcode.CrossSiteRequest, fmt.Errorf("browser request from origin %.100q, not %.100q", origin, r.Host)
		}
	}
	return 0, nil
}

// allowsHost reports whether the Host header names a loopback host or an
// allowed one. An empty Host (HTTP/1.0) never comes from a browser.
func (g *Site) allowsHost(hostport string) bool {
	if hostport == "" || g.anyHost {
		return true
	}
	h := hostOf(hostport)
	_, ok := g.hosts[h]
	return ok || isLoopbackName(h)
}

// IsLoopback reports whether a Host header (a name, an IP address, either
// with a port) names this machine: localhost or a loopback address.
func IsLoopback(hostport string) bool {
	return isLoopbackName(hostOf(hostport))
}

// hostOf is the host of a Host header, without its port, normalised
// (siteHost).
func hostOf(hostport string) string {
	if host, _, err := net.SplitHostPort(hostport); err == nil {
		return siteHost(host)
	}
	return siteHost(hostport)
}

// isLoopbackName reports whether a normalised host is localhost or a
// loopback address.
func isLoopbackName(h string) bool {
	if h == "localhost" {
		return true
	}
	a, err := netip.ParseAddr(h)
	return err == nil && a.IsLoopback()
}

// siteHost normalises a host name for comparison: lower case, without
// IPv6 brackets and a final dot.
func siteHost(h string) string {
	h = strings.TrimSuffix(strings.TrimPrefix(h, "["), "]")
	return strings.TrimSuffix(strings.ToLower(h), ".")
}

func isIP(h string) bool {
	_, err := netip.ParseAddr(h)
	return err == nil
}
