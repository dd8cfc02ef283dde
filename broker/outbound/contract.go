// Package outbound decides what a request carries when it leaves for the
// upstream, in plain net/http: the outbound-header contract (Contract),
// the one retry after the upstream rejects the token (Retry: the body
// replayed, the token purged, consent_required when no new token can be
// had), and a request's DPoP binding (DPoP: the proof signed by the
// transport that sends the request, SignCopy). It has no Caddy import;
// the module builds Contract and Retry per request from the handler's
// settings, gives Retry the broker's tokens (BrokerTokens, a Tokens), and
// its reverse_proxy transport signs through DPoP.
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
// guarantees about a request it passes on to the next handler (normally
// reverse_proxy), whatever the caller sent. It is the one place that
// decides; the handler and the 401 retry (Retry) both go through it.
//
// The headers the contract owns are the caller's credentials
// (Authorization, which the token is set in, Proxy-Authorization, DPoP),
// the merchant header (when the merchant is read from a header), the
// caller-JWT header (with a caller policy) and x-fapi-interaction-id when
// the handler adds it (interaction_id). For these:
//
//   - Removed: every value the caller sent of Authorization,
//     Proxy-Authorization, DPoP, the merchant header and
//     the caller-JWT header. A caller's x-fapi-interaction-id is passed on.
//     A DPoP proof is made for the request as it leaves, by the
//     token_broker_dpop transport: nothing the caller sends can stand in
//     for it or come with it.
//   - Set: Authorization, to exactly one value, "Bearer <token>"; on a
//     401 retry, to the new token. A DPoP-bound token ("DPoP <token>") is
//     not set on the request at all: it goes in the request's DPoP
//     binding, and only the token_broker_dpop transport puts it, with its
//     proof, on the copy it sends (DPoP.Sign). With Interaction, a request
//     without x-fapi-interaction-id, or with only empty values of it, gets
//     a new random UUID in it.
//   - Connection: every option of the caller's Connection header that names
//     an owned header is removed (reverse_proxy would otherwise drop the
//     injected token as a hop-by-hop header, the upstream would answer 401
//     and each request would cost a token request). Other options stay, so
//     "Connection: Upgrade" (websockets) still works. A Connection header
//     left empty is removed.
//   - Trailers: a request that declares a trailer naming an owned header
//     (the Trailer header) is refused with 400 forbidden_trailer before any
//     token lookup; an undeclared trailer naming one, which HTTP/1.1 lets a
//     client send after a chunked body, is dropped when the body ends, before
//     reverse_proxy copies the trailers upstream.
//   - TRACE and TRACK, in any letter case, are refused with 405: an
//     upstream answering them echoes the request, injected token included,
//     back to the caller (see echoes).
//   - CONNECT, in any letter case, is refused with 405: it asks for a
//     tunnel to a host the caller names, not for an API call, and would
//     go to the upstream with the token. An extended CONNECT for a
//     websocket (RFC 8441, RFC 9220: over HTTP/2 and HTTP/3) is an
//     upgrade of a request to the upstream, as `Upgrade: websocket` is in
//     HTTP/1.1, and goes on (see tunnels).
//   - Incremental: a request with `Incremental: ?1` (Caddy's convention for
//     a body that must be forwarded as it arrives) is never buffered and
//     never retried after a 401; see Retry.Incremental.
//
// A Contract is a small value: build it per request from the handler's
// settings.
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

// echoes reports whether method asks the upstream to send the request back
// as its answer: TRACE (RFC 9110 §9.3.8) and TRACK (IIS's TRACE), compared
// in any letter case. Go's server passes the method on as the caller wrote
// it, reverse_proxy forwards it so, and servers that compare methods
// without regard to case (IIS among them) answer "trace" as TRACE.
func echoes(method string) bool {
	return strings.EqualFold(method, http.MethodTrace) || strings.EqualFold(method, "TRACK")
}

// tunnels reports whether r is a CONNECT (RFC 9110 §9.3.6, any letter
// case) that asks for a tunnel: every CONNECT but an extended one for a
// websocket, which reverse_proxy sends to the upstream as an HTTP/1.1
// upgrade (RFC 8441 over HTTP/2: the :protocol pseudo-header, which Go's
// server passes on as a header; RFC 9220 over HTTP/3: the HTTP/3 server
// sets Proto to it). reverse_proxy would send any other CONNECT to the
// upstream with the token, naming a host the caller chose.
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
	// The keys are canonical already: delete without canonicalising again.
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
func IsDPoP(v string) bool { return hasPrefixFold(v, "dpop ") }

// hasPrefixFold is strings.HasPrefix without regard to ASCII case.
func hasPrefixFold(s, prefix string) bool {
	return len(s) >= len(prefix) && strings.EqualFold(s[:len(prefix)], prefix)
}

// Carries reports whether r, as later handlers left it, still carries the
// Authorization value v exactly once and no Connection option would remove
// it. A 401 to a request that did not carry the broker's token says nothing
// about the token: it must not purge it (a purge costs a token request).
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
// before reverse_proxy (which reads the trailers at EOF) sees them. The
// server fills r.Trailer, a map shared with every shallow copy of the
// request, when the body's last chunk is read.
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
