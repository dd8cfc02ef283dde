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
// token_broker handler chose for the request (the entry's header value,
// "DPoP <token>", and the ath of its proofs), handed to the transport that
// sends the request upstream and signs it there, where the URL the
// upstream receives is known (after reverse_proxy chose the upstream and
// rewrote the path). The handler never puts a DPoP-bound token on the
// request itself: only Sign does, on the copy the transport sends, and
// always with its proof, so that a route without the transport sends no
// credential at all.
//
// It belongs to one request: make it with NewDPoP when the request's token
// is chosen, and End it when the handler is done with the request. It
// stays in Caddy's request variables after that, where the handle_errors
// routes see it: an ended binding sends no credential.
type DPoP struct {
	// key signs the proofs.
	key *dpop.Key
	// header is the token's Authorization value, "DPoP <token>"; ath the
	// proofs' ath claim for it (SetToken).
	header, ath string
	// sent is the Authorization value of the last attempt signed.
	sent string
	// signed: a transport signed (or refused to sign) the current attempt
	// of the request: the route has a DPoP transport.
	signed atomic.Bool
	// done: End was called; Sign sends no credential, Observe keeps no
	// nonce.
	done atomic.Bool
	// refused is the refusal of the DPoP-Nonce the last answer Observe
	// saw carried, when the key refused it (over dpop.MaxNonce bytes, or
	// not a nonce); nil otherwise. It never holds the nonce.
	refused atomic.Pointer[dpop.NonceError]
}

// NewDPoP returns a request's DPoP binding to k (not nil); SetToken gives
// it its token.
func NewDPoP(k *dpop.Key) *DPoP { return &DPoP{key: k} }

// SetToken sets the token the next attempt carries: header is the
// Authorization value ("DPoP <token>", broker.Entry.Header) and ath the
// proofs' ath claim for the token (broker.Entry.ATH). The attempt counts
// as not signed until a transport signs it.
func (d *DPoP) SetToken(header, ath string) {
	d.header, d.ath = header, ath
	d.signed.Store(false)
}

// End ends the binding: the handler that made it is done with the
// request. Sign then removes Authorization and DPoP and signs nothing, and
// Observe keeps no nonce, for whatever still sends the request: Caddy's
// handle_errors routes run with the request's variables after the handler
// returned an error, and a transport there finds the binding. End only
// sets a flag; an ended binding's other fields are read, never written.
func (d *DPoP) End() { d.done.Store(true) }

// Signed reports whether a transport handled the current attempt of the
// request (Sign was called). An attempt answered without is one whose
// route lacks the DPoP transport: it left with no credential.
func (d *DPoP) Signed() bool { return d.signed.Load() }

// Carries reports whether the current attempt left signed with the
// Authorization value v: a 401 to it is about that token.
func (d *DPoP) Carries(v string) bool { return d.Signed() && d.sent != "" && d.sent == v }

// String describes the binding without the token: the key's algorithm and
// thumbprint.
func (d *DPoP) String() string { return "DPoP " + d.key.Alg() + " " + d.key.Thumbprint() }

// GoString is String, for %#v: the binding's fields hold the token.
func (d *DPoP) GoString() string { return "outbound.DPoP(" + d.String() + ")" }

// Sign puts the token on req, a request about to be sent upstream, with
// its proof: "Authorization: DPoP <token>" and a DPoP header with a fresh
// proof for req: htm its method, htu its URL as the upstream receives it
// (scheme, the Host header or else the URL's host, path; req.URL.Scheme
// must be set), ath the token's hash, and the nonce the resource server
// at the upstream's origin (req.URL's scheme and host: the upstream
// chosen, never the Host header a caller sent) last sent, if any: never
// an authorization server's nonce, even one at the same origin. Whatever
// Authorization and DPoP req had is replaced. X-Forwarded-Proto and
// X-Forwarded-Host, when they hold what reverse_proxy sets them to from
// caller, the origin of the caller's request to the sidecar
// (scheme://host, its Host header as received), are set to the scheme and
// host signed (the host as it is sent: dpop.WireHost), for a server that
// rebuilds its target URI from them; any other value of theirs (set by
// header_up, or a trusted proxy's that reverse_proxy kept) is left as it
// is, and so are Forwarded (RFC 7239) and X-Forwarded-Prefix. When no
// proof can be made, or the binding has no token or was ended (End), req
// leaves with neither header: a DPoP-bound token never leaves without its
// proof, nor after its request was done.
func (d *DPoP) Sign(req *http.Request, caller string, now time.Time) error {
	delete(req.Header, "Authorization")
	delete(req.Header, DPoPHeader)
	if d.done.Load() {
		return nil
	}
	d.signed.Store(true)
	d.sent = ""
	if d.header == "" {
		return nil
	}
	host := req.Host
	if host == "" {
		host = req.URL.Host
	}
	u := url.URL{Scheme: req.URL.Scheme, Host: host, Path: req.URL.Path, RawPath: req.URL.RawPath}
	proof, err := d.key.Proof(req.Method, dpop.HTU(&u), d.ath, d.key.Nonce(dpop.ResourceServer, req.URL), now)
	if err != nil {
		return err
	}
	// reverse_proxy's forwarding headers name the caller's request to the
	// sidecar; a server that trusts them rebuilds its target URI from
	// them (RFC 9110 §7.1): those reverse_proxy set name the request
	// signed.
	scheme, callerHost, _ := strings.Cut(caller, "://")
	forward(req.Header, "X-Forwarded-Proto", scheme, strings.ToLower(u.Scheme))
	forward(req.Header, "X-Forwarded-Host", callerHost, dpop.WireHost(host))
	req.Header["Authorization"] = []string{d.header}
	req.Header[DPoPHeader] = []string{proof}
	d.sent = d.header
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
// signed (Sign, with caller): the token and its proof go on the copy
// only, so that the request a proxy logs carries neither (Caddy's logs
// redact Authorization, not DPoP).
func (d *DPoP) SignCopy(req *http.Request, caller string, now time.Time) (*http.Request, error) {
	sent := new(http.Request)
	*sent = *req
	sent.Header = make(http.Header, len(req.Header)+2)
	maps.Copy(sent.Header, req.Header)
	return sent, d.Sign(sent, caller, now)
}

// Observe remembers the DPoP-Nonce of h, the answer to req (which Sign
// signed), for the proofs that follow to the resource server at req's
// origin: a resource server may send a new one with any answer
// (RFC 9449 §8.2). An ended binding (End) keeps none: its requests left
// unsigned. A nonce the key refuses (over dpop.MaxNonce bytes, or not a
// nonce) is not remembered: its *dpop.NonceError, which never holds the
// nonce, is kept for the answer (and by the key: dpop.Key.RefusedNonce):
// a nonce challenge in that answer is not answered with a retry, its
// proof could not carry the nonce either; Retry.Forward passes it on and
// reports the refusal (Retry.NonceRefused).
func (d *DPoP) Observe(req *http.Request, h http.Header) {
	if d.done.Load() {
		return
	}
	var ne *dpop.NonceError
	if n := h["Dpop-Nonce"]; len(n) > 0 {
		ne, _ = d.key.SetNonce(dpop.ResourceServer, req.URL, n[0]).(*dpop.NonceError)
	}
	d.refused.Store(ne)
}
