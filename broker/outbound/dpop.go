package outbound

import (
	"net/http"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// DPoP is a request's DPoP binding (RFC 9449), from the token_broker
// handler, which set "Authorization: DPoP <token>", to the transport that
// sends the request upstream and signs it there, where the URL the
// upstream receives is known (after reverse_proxy chose the upstream and
// rewrote the path). It is per request: take it with AcquireDPoP, give it
// back with Release once the request is done.
type DPoP struct {
	// Key signs the proofs.
	Key *dpop.Key
	// signed: a transport signed (or refused to sign) an attempt of the
	// request: the route has a DPoP transport.
	signed atomic.Bool
}

var dpopPool = sync.Pool{New: func() any { return new(DPoP) }}

// AcquireDPoP returns a DPoP binding to k for one request.
func AcquireDPoP(k *dpop.Key) *DPoP {
	d := dpopPool.Get().(*DPoP)
	d.Key = k
	d.signed.Store(false)
	return d
}

// Release gives d back: the request and every attempt of it are done.
func (d *DPoP) Release() {
	d.Key = nil
	dpopPool.Put(d)
}

// Signed reports whether a transport handled an attempt of the request
// (Sign was called). A request that reached the upstream without is one
// whose route lacks the DPoP transport.
func (d *DPoP) Signed() bool { return d.signed.Load() }

// String describes the binding without the token: the key's algorithm and
// thumbprint.
func (d *DPoP) String() string { return "DPoP " + d.Key.Alg() + " " + d.Key.Thumbprint() }

// Sign sets the DPoP header of req, a request about to be sent upstream,
// to a fresh proof for it: htm its method, htu its URL as the upstream
// receives it (scheme, the Host header or else the URL's host, path;
// req.URL.Scheme must be set), ath the hash of the token of its
// "Authorization: DPoP <token>" header, and the nonce the upstream's
// origin last sent, if any. It returns that origin, for Observe. A
// request whose Authorization is not a DPoP token (a later handler
// replaced it) leaves without any DPoP header: a proof is only ever one of
// ours, for the token the request carries.
func (d *DPoP) Sign(req *http.Request, now time.Time) (origin string, err error) {
	d.signed.Store(true)
	token, ok := dpopToken(req.Header)
	if !ok {
		delete(req.Header, DPoPHeader)
		return "", nil
	}
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	u := url.URL{Scheme: req.URL.Scheme, Host: host, Path: req.URL.Path, RawPath: req.URL.RawPath}
	origin = dpop.Origin(&u)
	proof, err := d.Key.Proof(req.Method, dpop.HTU(&u), dpop.ATH(token), d.Key.Nonce(origin), now)
	if err != nil {
		delete(req.Header, DPoPHeader)
		return "", err
	}
	req.Header[DPoPHeader] = []string{proof}
	return origin, nil
}

// Observe remembers the DPoP-Nonce of an answer from origin (Sign's), for
// the proofs that follow: a resource server may send a new one with any
// answer (RFC 9449 §8.2).
func (d *DPoP) Observe(origin string, h http.Header) {
	if origin == "" {
		return
	}
	if n := h["Dpop-Nonce"]; len(n) > 0 {
		d.Key.SetNonce(origin, n[0])
	}
}

// dpopToken returns the token of h's one "Authorization: DPoP <token>".
func dpopToken(h http.Header) (string, bool) {
	v := h["Authorization"]
	if len(v) != 1 || !hasPrefixFold(v[0], "dpop ") {
		return "", false
	}
	tok := strings.TrimLeft(v[0][len("dpop "):], " ")
	return tok, tok != ""
}
