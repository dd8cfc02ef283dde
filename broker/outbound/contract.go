// Package outbound decides what a request carries when it leaves for the
// upstream, in plain net/http: the outbound-header contract (Contract),
// the one retry after the upstream rejects the token (Retry), and a
// request's DPoP binding (DPoP), which the transport that sends the
// request signs. It has no Caddy import.
package outbound

import (
	"fmt"
	"io"
	"net/http"
	"net/textproto"
	"slices"
	"strings"

	"github.com/google/uuid"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// CheckTokenHeader checks the name of the header a token is set in (the
// handler's header; "" means Authorization). Caddy's logs redact
// Authorization and Proxy-Authorization only: a token in any other header
// would be logged in clear by reverse_proxy at debug level.
// Proxy-Authorization is hop-by-hop (RFC 9110 §11.7.2): reverse_proxy
// always removes it, so the upstream would get no credential and answer
// 401 to every request. That leaves Authorization.
func CheckTokenHeader(name string) error {
	switch textproto.CanonicalMIMEHeaderKey(name) {
	case "", "Authorization":
		return nil
	case "Proxy-Authorization":
		return fmt.Errorf("header %q: reverse_proxy removes Proxy-Authorization before the upstream (it is hop-by-hop), so the upstream would get no credential: use Authorization (the default)", name)
	}
	return fmt.Errorf("header %q: the token can only be set in Authorization, which Caddy's logs redact", name)
}

// InteractionIDHeader is x-fapi-interaction-id in canonical form.
const InteractionIDHeader = "X-Fapi-Interaction-Id"

// DPoPHeader is the DPoP proof header (RFC 9449) in canonical form. Only
// the broker's transport sets it, with a proof of the request it sends.
const DPoPHeader = "Dpop"

// Contract is the outbound-header contract: what the token_broker handler
// guarantees about a request it passes on (normally to reverse_proxy),
// whatever the caller sent; the handler and Retry both go through it.
//
// It owns Authorization, Proxy-Authorization, DPoP, the merchant header,
// the caller-JWT header and, with Interaction, x-fapi-interaction-id:
//
//   - Removed: every value the caller sent of the owned headers but
//     x-fapi-interaction-id, which is passed on.
//   - Set: Authorization to exactly one value, "Bearer <token>" (the new
//     token on a 401 retry). A DPoP-bound token is never set here: only
//     the DPoP transport puts it, with its proof, on the copy it sends
//     (DPoP.Sign). With Interaction, a request without a non-empty
//     x-fapi-interaction-id gets a random UUID.
//   - Connection: options naming an owned header are removed
//     (reverse_proxy would drop the token as hop-by-hop, and each 401
//     would cost a token request); others stay ("Connection: Upgrade"),
//     and a Connection header left empty is removed.
//   - Trailers: a declared trailer naming an owned header is refused with
//     400 forbidden_trailer before any token lookup; an undeclared one is
//     dropped when the body ends, before reverse_proxy copies trailers.
//   - TRACE, TRACK (echoes) and CONNECT but an extended CONNECT for a
//     websocket (tunnels), in any letter case, are refused with 405.
//   - Incremental: a body to forward as it arrives (`Incremental: ?1`) is
//     never buffered nor retried (Retry.Incremental).
//
// A Contract is a small value: build it per request.
type Contract struct {
	// Merchant is the canonical merchant header; "" when the merchant is
	// not read from a header.
	Merchant string
	// Caller is the canonical caller-JWT header; "" without a caller
	// policy.
	Caller string
	// Interaction says the handler adds x-fapi-interaction-id.
	Interaction bool
}

// owns reports whether the header name (any case) is one of the contract's.
func (o Contract) owns(name string) bool {
	return strings.EqualFold(name, "Authorization") || strings.EqualFold(name, "Proxy-Authorization") ||
		strings.EqualFold(name, DPoPHeader) ||
		o.Merchant != "" && strings.EqualFold(name, o.Merchant) ||
		o.Caller != "" && strings.EqualFold(name, o.Caller) ||
		o.Interaction && strings.EqualFold(name, InteractionIDHeader)
}

// Check refuses, before any token lookup, what the contract cannot make
// safe: a method that echoes the request (405, see echoes), a request for a
// tunnel (405, see tunnels) and a declared trailer naming an owned header
// (400). A zero code means the request may go on.
func (o Contract) Check(r *http.Request) errcode.Code {
	if echoes(r.Method) || tunnels(r) {
		return errcode.MethodRefused
	}
	for name := range r.Trailer {
		if o.owns(name) {
			return errcode.ForbiddenTrailer
		}
	}
	return 0
}

// echoes reports whether method asks the upstream to send the request,
// token included, back as its answer: TRACE (RFC 9110 §9.3.8) or TRACK
// (IIS's TRACE) in any letter case, as servers such as IIS compare them.
func echoes(method string) bool {
	return strings.EqualFold(method, http.MethodTrace) || strings.EqualFold(method, "TRACK")
}

// tunnels reports whether r is a CONNECT (RFC 9110 §9.3.6, any letter
// case) for a tunnel to a host the caller names: every CONNECT but an
// extended one for a websocket, which reverse_proxy sends as an HTTP/1.1
// upgrade (RFC 8441: the :protocol pseudo-header, which Go's server passes
// on as a header; RFC 9220: the HTTP/3 server sets Proto to it).
func tunnels(r *http.Request) bool {
	if !strings.EqualFold(r.Method, http.MethodConnect) {
		return false
	}
	websocket := r.ProtoMajor == 2 && r.Header.Get(":protocol") == "websocket" || r.ProtoMajor == 3 && r.Proto == "websocket"
	return !websocket
}

// Prepare applies the contract to a request about to be passed on with the
// Authorization value v: "Bearer <token>", or "DPoP <token>", which is
// not set (see IsDPoP).
func (o Contract) Prepare(r *http.Request, v string) {
	delete(r.Header, "Authorization")
	delete(r.Header, "Proxy-Authorization")
	delete(r.Header, DPoPHeader)
	if o.Merchant != "" {
		delete(r.Header, o.Merchant)
	}
	if o.Caller != "" {
		delete(r.Header, o.Caller)
	}
	if r.Trailer != nil && r.Body != nil && r.Body != http.NoBody {
		r.Body = &trailerFilter{ReadCloser: r.Body, r: r, o: o}
	}
	o.setToken(r, v)
	if o.Interaction && !slices.ContainsFunc(r.Header[InteractionIDHeader], hasValue) {
		r.Header[InteractionIDHeader] = []string{uuid.NewString()}
	}
}

// hasValue reports whether a header value is not empty nor only white
// space.
func hasValue(v string) bool { return strings.TrimSpace(v) != "" }

// setToken sets Authorization to v (also on a retry, from the request as
// later handlers left it), unless v is a DPoP-bound token (IsDPoP), and
// removes Connection options naming owned headers.
func (o Contract) setToken(r *http.Request, v string) {
	if !IsDPoP(v) {
		// A slice of its own: later handlers may change header values in
		// place.
		r.Header["Authorization"] = []string{v}
	}
	if c, ok := r.Header["Connection"]; ok {
		o.cleanConnection(r.Header, c)
	}
}

// cleanConnection removes from the Connection header c of h every option
// naming an owned header. It allocates only when there is one.
func (o Contract) cleanConnection(h http.Header, c []string) {
	dirty := false
	for _, f := range c {
		for opt := range strings.SplitSeq(f, ",") {
			if o.owns(strings.TrimSpace(opt)) {
				dirty = true
			}
		}
	}
	if !dirty {
		return
	}
	var kept []string
	for _, f := range c {
		for opt := range strings.SplitSeq(f, ",") {
			if opt = strings.TrimSpace(opt); opt != "" && !o.owns(opt) {
				kept = append(kept, opt)
			}
		}
	}
	if len(kept) == 0 {
		delete(h, "Connection")
		return
	}
	h["Connection"] = []string{strings.Join(kept, ", ")}
}

// IsDPoP reports whether the Authorization value v is a DPoP-bound token,
// "DPoP <token>" (any case): such a token leaves only with its proof, set
// by the transport (DPoP.Sign).
func IsDPoP(v string) bool { return len(v) >= 5 && strings.EqualFold(v[:5], "dpop ") }

// Carries reports whether r, as later handlers left it, still carries the
// Authorization value v exactly once and no Connection option would remove
// it: only a 401 to such a request may purge the token.
func (o Contract) Carries(r *http.Request, v string) bool {
	if vals := r.Header["Authorization"]; len(vals) != 1 || vals[0] != v {
		return false
	}
	for _, f := range r.Header["Connection"] {
		for opt := range strings.SplitSeq(f, ",") {
			if strings.EqualFold(strings.TrimSpace(opt), "Authorization") {
				return false
			}
		}
	}
	return true
}

// trailerFilter drops trailers naming owned headers when the body ends,
// before reverse_proxy reads them: the server fills r.Trailer, shared by
// every shallow copy of the request, at the body's last chunk.
type trailerFilter struct {
	io.ReadCloser
	r *http.Request
	o Contract
}

func (t *trailerFilter) Read(p []byte) (int, error) {
	n, err := t.ReadCloser.Read(p)
	if err == io.EOF {
		for name := range t.r.Trailer {
			if t.o.owns(name) {
				delete(t.r.Trailer, name)
			}
		}
	}
	return n, err
}
