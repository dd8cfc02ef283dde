package outbound

import (
	"maps"
	"net/http"
	"net/url"
	"strings"
	"sync/atomic"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// DPoP is a request's DPoP binding (RFC 9449): the DPoP-bound token the
// handler chose, signed by the transport that sends the request upstream,
// where the URL the upstream receives is known. Only Sign puts the token
// on a request, always with its proof, so a route without the transport
// sends no credential at all.
//
// Make it with NewDPoP when the request's token is chosen and End it when
// the handler is done with the request; Caddy's handle_errors routes still
// find it in the request's variables, and an ended binding sends no
// credential.
type DPoP struct {
	key *dpop.Key
	// header is the token's Authorization value, "DPoP <token>"; ath the
	// proofs' ath claim for it.
	header, ath string
	// sent is the Authorization value of the last attempt signed, nonce
	// the DPoP nonce its proof carried.
	sent, nonce string
	// signed: a transport signed (or refused to sign) the current attempt.
	signed atomic.Bool
	// done: End was called.
	done atomic.Bool
	// refused is the key's refusal of the DPoP-Nonce of the last answer
	// Observe saw, nil when none; it never holds the nonce.
	refused atomic.Pointer[dpop.NonceError]
	// renewed: after the last answer Observe saw, the key holds another
	// nonce for its server than the one the attempt's proof carried.
	renewed atomic.Bool
}

// NewDPoP returns a request's DPoP binding to k (not nil); SetToken gives
// it its token.
func NewDPoP(k *dpop.Key) *DPoP { return &DPoP{key: k} }

// SetToken sets the token the next attempt carries: header is the
// Authorization value ("DPoP <token>", broker.Entry.Header) and ath the
// proofs' ath claim for it (broker.Entry.ATH). The attempt counts as not
// signed until a transport signs it.
func (d *DPoP) SetToken(header, ath string) {
	d.header, d.ath = header, ath
	d.signed.Store(false)
}

// End ends the binding: Sign then removes Authorization and DPoP and signs
// nothing, and Observe keeps no nonce. It only sets a flag: the other
// fields of an ended binding are read, never written.
func (d *DPoP) End() { d.done.Store(true) }

// Signed reports whether a transport handled the current attempt (Sign
// was called); an attempt without one left with no credential.
func (d *DPoP) Signed() bool { return d.signed.Load() }

// Carries reports whether the current attempt left signed with the
// Authorization value v: a 401 to it is about that token.
func (d *DPoP) Carries(v string) bool { return d.Signed() && d.sent != "" && d.sent == v }

// String describes the binding without the token: the key's algorithm and
// thumbprint.
func (d *DPoP) String() string { return "DPoP " + d.key.Alg() + " " + d.key.Thumbprint() }

// GoString is String, for %#v: the binding's fields hold the token.
func (d *DPoP) GoString() string { return "outbound.DPoP(" + d.String() + ")" }

// Sign puts the token on req, about to be sent upstream, with a fresh
// proof, replacing any Authorization and DPoP: htm is req's method, htu
// its URL as the upstream receives it (scheme, the Host header or else the
// URL's host, path; req.URL.Scheme must be set), and the nonce is the one
// the resource server at req.URL's origin last sent (never the Host
// header's origin, never an authorization server's nonce).
//
// X-Forwarded-Proto and X-Forwarded-Host, when they hold what
// reverse_proxy sets them to from the caller's request to the sidecar
// (callerScheme, callerHost), are set to the scheme and host signed
// (dpop.WireHost), for a server that rebuilds its target URI from them
// (RFC 9110 §7.1); other values of theirs, Forwarded and
// X-Forwarded-Prefix are left as they are.
//
// With no token, after End, or when no proof can be made, req leaves with
// neither header: a DPoP-bound token never leaves without its proof.
func (d *DPoP) Sign(req *http.Request, callerScheme, callerHost string, now time.Time) error {
	delete(req.Header, "Authorization")
	delete(req.Header, DPoPHeader)
	if d.done.Load() {
		return nil
	}
	d.signed.Store(true)
	d.sent, d.nonce = "", ""
	if d.header == "" {
		return nil
	}
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	u := url.URL{Scheme: req.URL.Scheme, Host: host, Path: req.URL.Path, RawPath: req.URL.RawPath}
	nonce := d.key.Nonce(dpop.ResourceServer, req.URL)
	proof, err := d.key.Proof(req.Method, dpop.HTU(&u), d.ath, nonce, now)
	if err != nil {
		return err
	}
	forward(req.Header, "X-Forwarded-Proto", callerScheme, strings.ToLower(u.Scheme))
	forward(req.Header, "X-Forwarded-Host", callerHost, dpop.WireHost(host))
	req.Header["Authorization"] = []string{d.header}
	req.Header[DPoPHeader] = []string{proof}
	d.sent, d.nonce = d.header, nonce
	return nil
}

// forward sets the forwarding header name of h to v when it holds one
// value, from: the one reverse_proxy sets from the caller's request.
func forward(h http.Header, name, from, v string) {
	if got := h[name]; len(got) == 1 && got[0] == from {
		h[name] = []string{v}
	}
}

// SignCopy returns a shallow copy of req with a header map of its own,
// signed (Sign): the token and its proof go on the copy
// only, so that the request a proxy logs carries neither (Caddy's logs
// redact Authorization, not DPoP).
func (d *DPoP) SignCopy(req *http.Request, callerScheme, callerHost string, now time.Time) (*http.Request, error) {
	sent := new(http.Request)
	*sent = *req
	sent.Header = make(http.Header, len(req.Header)+2)
	maps.Copy(sent.Header, req.Header)
	return sent, d.Sign(sent, callerScheme, callerHost, now)
}

// Observe remembers the DPoP-Nonce of h, the answer to req, for the next
// proofs to the resource server at req's origin (RFC 9449 §8.2); an ended
// binding keeps none. A nonce the key refuses is not remembered: its
// *dpop.NonceError (which never holds the nonce) is kept, so that a nonce
// challenge in that answer is passed on, not retried (Retry.NonceRefused).
// A nonce challenge is retried only when the key now holds another nonce
// than the one the attempt's proof carried: the answer's, or one a
// concurrent request brought (RFC 9449 §9: a proof with the same nonce
// would be refused again).
func (d *DPoP) Observe(req *http.Request, h http.Header) {
	if d.done.Load() {
		return
	}
	var ne *dpop.NonceError
	if n := h["Dpop-Nonce"]; len(n) > 0 {
		ne, _ = d.key.SetNonce(dpop.ResourceServer, req.URL, n[0]).(*dpop.NonceError)
	}
	d.refused.Store(ne)
	d.renewed.Store(d.key.Nonce(dpop.ResourceServer, req.URL) != d.nonce)
}
