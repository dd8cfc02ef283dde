package outbound

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"maps"
	"net/http"
	neturl "net/url"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/challenge"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// DefaultRetryBodyLimit is the largest request body buffered so that a
// request rejected with 401 can be sent again with a new token.
const DefaultRetryBodyLimit = 64 << 10

// MaxRetryBodyLimit is the largest retry_body_limit accepted: each
// retryable request in flight keeps its body in memory.
const MaxRetryBodyLimit = 16 << 20

// maxBufferedBody is the largest 401 response body buffered while the
// request is retried; a longer one is passed on as it comes (the token is
// still purged, the request not retried).
const maxBufferedBody = 64 << 10

// minPurgeAge: with Mode "any", where a caller can provoke a 401 at will,
// a token younger than this is not purged (a purge costs a token request).
const minPurgeAge = time.Second

// Next is the handler a request is passed on to (caddyhttp.Handler).
type Next interface {
	// ServeHTTP passes the request on.
	ServeHTTP(http.ResponseWriter, *http.Request) error
}

// Entry is a token set on a request, as the retry sees it (*broker.Entry).
type Entry interface {
	// Header is the Authorization value, "Bearer <token>" or, for a
	// DPoP-bound token, "DPoP <token>".
	Header() string
	// ATH is the ath claim of the DPoP proofs that accompany the token
	// (dpop.ATH), computed once per token; used for DPoP-bound tokens
	// only.
	ATH() string
	// Token is the token.
	Token() broker.Token
}

// Tokens is what the retry asks of the token broker. Its methods are
// called on the request's goroutine.
type Tokens interface {
	// Get returns the binding's token, fetching a new one when the cached
	// one was purged.
	Get(ctx context.Context, b *broker.Binding) (Entry, error)
	// Purge reports a token the upstream rejected on a request that
	// carried it: it is purged if it is still the cached one.
	Purge(b *broker.Binding, rejected broker.Token)
	// Kept reports a 401 to a request that no longer carried the token (a
	// later handler changed or removed it): the token is kept.
	Kept(b *broker.Binding, rejected broker.Token)
	// Accepted reports that the upstream accepted the token of a retry.
	Accepted(b *broker.Binding, tok broker.Secret)
}

// Retry sends a request once more, with a new token, when the upstream
// rejects its token. It is a small value: build it per request from the
// handler's settings.
type Retry struct {
	// Mode says which upstream 401 answers purge the token and retry the
	// request: "invalid_token" or "" (a 401 with `WWW-Authenticate:
	// Bearer error="invalid_token"`), "any" (every 401) or "off". A DPoP
	// nonce challenge to a DPoP-bound request that brought a new nonce is
	// retried in every mode, "off" included.
	Mode string
	// BodyLimit is the largest request body kept in memory for a retry.
	// Default DefaultRetryBodyLimit.
	BodyLimit int64
	// Incremental reports whether a request's headers ask for its body to
	// be forwarded as it arrives (`Incremental: ?1`): such a body is never
	// buffered, so the request is not retried. nil: never.
	Incremental func(http.Header) bool
	// Isolate returns the request the retry sends, given the first
	// attempt's: the handler gives it its own copy of per-request state a
	// first attempt still in flight may read. nil: the same request.
	Isolate func(*http.Request) *http.Request
	// Tokens is the broker side.
	Tokens Tokens
	// NonceChallenged, when set, is told about each upstream 401 that asks
	// a DPoP-bound request for a nonce (see nonceChallenge), brought a new
	// one, and is answered with a retry.
	NonceChallenged func(b *broker.Binding)
	// NonceRefused, when set, is told about an upstream 401 that asks a
	// DPoP-bound request for a nonce the key refused (DPoP.Observe), with
	// the refusal, which never holds the nonce: the answer is passed on,
	// not retried. It is told once per request.
	NonceRefused func(b *broker.Binding, refused error)
	// DPoP is the request's DPoP binding, with the token set; nil for a
	// bearer token. An attempt no transport signed (DPoP.Signed false when
	// its answer starts) left without any credential: its answer passes
	// through, except a 401, which is dropped and Forward returns a
	// Refusal (ErrUnsigned) without writing anything. This holds in every
	// Mode.
	DPoP *DPoP
}

// Check checks the settings of rt given in the configuration (the
// handler's retry_on_401 and retry_body_limit): Mode is "",
// "invalid_token", "any" or "off", and BodyLimit is from 0 (the default)
// to MaxRetryBodyLimit.
func (rt Retry) Check() error {
	switch rt.Mode {
	case "", "invalid_token", "any", "off":
	default:
		return fmt.Errorf("retry_on_401 must be invalid_token, any or off, not %q", rt.Mode)
	}
	if rt.BodyLimit < 0 || rt.BodyLimit > MaxRetryBodyLimit {
		return fmt.Errorf("retry_body_limit %d: must be between 0 (the default, %d bytes) and %d bytes (%d MiB); the body of each retryable request is held in memory",
			rt.BodyLimit, DefaultRetryBodyLimit, MaxRetryBodyLimit, MaxRetryBodyLimit>>20)
	}
	return nil
}

// ErrUnsigned is the cause of the Refusal of a request with a DPoP-bound
// token that was answered 401 and that no DPoP transport had signed: it
// left without its token (only the transport puts it on, with its proof).
var ErrUnsigned = errors.New("a request with a DPoP-bound token was answered 401 without having been signed: no DPoP transport sent it, so it left without its token")

// Refusal is returned by Forward, before any response is written, when
// the caller is to be answered with Code rather than the upstream's
// answer: dpop_transport_missing (ErrUnsigned); the fetch's code
// (consent_required) when the upstream rejected the token and no new one
// can be had because the merchant must consent again (the provider
// refused the refresh token with invalid_grant, as after a revocation of
// the whole grant); unreadable_body when the request's body could not be
// read before it was passed on.
type Refusal struct {
	// Code is what the caller is told.
	Code errcode.Code
	// Err is the cause, to be logged, never sent to the caller.
	Err error
}

// Error describes the cause.
func (e *Refusal) Error() string { return e.Err.Error() }

// Unwrap returns the cause.
func (e *Refusal) Unwrap() error { return e.Err }

// rejectsToken reports whether an upstream answer says the token is no good
// and should be purged: a 401 with a Bearer or DPoP challenge of
// error="invalid_token" (RFC 6750 §3.1, RFC 9449 §7.1); in Mode "any",
// every 401 but a nonce challenge. A 403 never purges.
func rejectsToken(mode string, status int, header http.Header) bool {
	if status != http.StatusUnauthorized {
		return false
	}
	if mode == "any" {
		return !nonceChallenge(status, header)
	}
	return challenge.TokenError(header, "invalid_token")
}

// acceptsToken reports whether an answer of status to a retry shows that
// the upstream took the fresh token it carried: an answer was written,
// and it is not a 401, 429 or 5xx, which an upstream may answer before it
// looks at a token. Such an answer lifts the key's hold on purges
// (Tokens.Accepted).
func acceptsToken(status int) bool {
	return status != 0 && status != http.StatusUnauthorized && status != http.StatusTooManyRequests &&
		status < http.StatusInternalServerError
}

// nonceChallenge reports whether an upstream answer asks for a DPoP proof
// with the server's nonce (RFC 9449 §9): a 401 with a challenge of
// error="use_dpop_nonce". The token is fine.
func nonceChallenge(status int, header http.Header) bool {
	return status == http.StatusUnauthorized && challenge.TokenError(header, "use_dpop_nonce")
}

// rejectRecorder passes a response through unless it rejects the token or
// is a nonce challenge: such a response is buffered, up to
// maxBufferedBody bytes, when buffer is set, so that the request can be
// sent again; else it is passed through and only recorded.
type rejectRecorder struct {
	http.ResponseWriter
	mode       string // Retry.Mode
	buffer     bool   // the request can be retried: buffer a rejection
	dpop       *DPoP  // Retry.DPoP
	unsigned   bool   // the answer is a 401 to an unsigned DPoP request: dropped
	status     int
	rejected   bool // the upstream rejected the token
	challenged bool // the upstream asked a DPoP-bound request for a nonce (nonceChallenge)
	// refused is the refusal of the nonce of a challenge (nonceChallenge)
	// to a DPoP-bound request, which is then not challenged: passed on.
	refused     *dpop.NonceError
	buffered    bool // the rejection or challenge is buffered in buf
	wroteHeader bool
	buf         bytes.Buffer
}

// reset prepares the recorder for an attempt written to w.
func (rr *rejectRecorder) reset(w http.ResponseWriter, buffer bool) {
	rr.ResponseWriter, rr.buffer = w, buffer
	rr.status, rr.rejected, rr.challenged, rr.buffered, rr.wroteHeader, rr.unsigned = 0, false, false, false, false, false
	rr.refused = nil
	rr.buf.Reset()
}

func (rr *rejectRecorder) WriteHeader(status int) {
	if rr.wroteHeader {
		return
	}
	if status >= 100 && status < 200 && status != http.StatusSwitchingProtocols {
		rr.ResponseWriter.WriteHeader(status) // informational: pass on, wait for the final one
		return
	}
	rr.wroteHeader, rr.status = true, status
	if rr.dpop != nil && !rr.dpop.Signed() {
		// The attempt left without the token: nothing to purge or retry.
		if status == http.StatusUnauthorized {
			rr.unsigned = true
			return
		}
		rr.ResponseWriter.WriteHeader(status)
		return
	}
	// A nonce challenge is retried only for a DPoP-bound request whose
	// answer's nonce the key took (no other proof can carry it), and only
	// when the key holds another nonce than the one sent: else it is
	// passed on as it came.
	if rr.dpop != nil && nonceChallenge(status, rr.Header()) {
		rr.refused = rr.dpop.refused.Load()
		rr.challenged = rr.refused == nil && rr.dpop.renewed.Load()
	}
	if rr.mode != "off" {
		rr.rejected = !rr.challenged && rejectsToken(rr.mode, status, rr.Header())
	}
	if rr.rejected || rr.challenged {
		if rr.buffer {
			rr.buffered = true
			return
		}
	}
	rr.ResponseWriter.WriteHeader(status)
}

func (rr *rejectRecorder) Write(p []byte) (int, error) {
	rr.WriteHeader(http.StatusOK)
	if rr.unsigned {
		return len(p), nil
	}
	if rr.buffered {
		if rr.buf.Len()+len(p) <= maxBufferedBody {
			return rr.buf.Write(p)
		}
		if err := rr.passOn(); err != nil {
			return 0, err
		}
	}
	return rr.ResponseWriter.Write(p)
}

// Push passes a server push on to the underlying writer (http.Pusher).
func (rr *rejectRecorder) Push(target string, opts *http.PushOptions) error {
	if p, ok := rr.ResponseWriter.(http.Pusher); ok {
		return p.Push(target, opts)
	}
	return http.ErrNotSupported
}

// Unwrap returns the underlying writer, for http.ResponseController.
func (rr *rejectRecorder) Unwrap() http.ResponseWriter { return rr.ResponseWriter }

// FlushError flushes a response that is passed through, and nothing of a
// buffered or dropped one.
func (rr *rejectRecorder) FlushError() error {
	if rr.buffered || rr.unsigned {
		return nil
	}
	return http.NewResponseController(rr.ResponseWriter).Flush()
}

// passOn stops buffering a rejection that grew past maxBufferedBody: what
// was buffered is sent, and the rest will follow as it comes.
func (rr *rejectRecorder) passOn() error {
	rr.buffered = false
	err := rr.writeBuffered()
	rr.buf.Reset()
	return err
}

// writeBuffered sends the buffered response as it was.
func (rr *rejectRecorder) writeBuffered() error {
	rr.ResponseWriter.WriteHeader(rr.status)
	_, err := rr.ResponseWriter.Write(rr.buf.Bytes())
	return err
}

// headerSnapshot remembers a header map's entries, values copied, so that
// handlers that change values in place do not change it. Taking one does
// not allocate for up to 16 keys with 24 values in all: key i's values are
// vals[ends[i-1]:ends[i]]. A larger header, or one with a nil value (which
// a copy must keep nil), is cloned instead.
type headerSnapshot struct {
	n, nv int
	keys  [16]string
	ends  [16]uint8 // the end of key i's values in vals
	vals  [24]string
	full  http.Header // a copy of the header, when it does not fit the arrays
}

func (s *headerSnapshot) take(h http.Header) {
	for k, v := range h {
		if v == nil || s.n == len(s.keys) || len(v) > len(s.vals)-s.nv {
			s.full = h.Clone()
			return
		}
		s.keys[s.n] = k
		s.nv += copy(s.vals[s.nv:], v)
		s.ends[s.n] = uint8(s.nv)
		s.n++
	}
}

// restore puts h back as it was when taken, with values of its own: it
// may be restored again.
func (s *headerSnapshot) restore(h http.Header) {
	clear(h)
	if s.full != nil {
		maps.Copy(h, s.full.Clone())
		return
	}
	vals := make([]string, s.nv)
	copy(vals, s.vals[:s.nv])
	start := 0
	for i := range s.n {
		end := int(s.ends[i])
		h[s.keys[i]] = vals[start:end:end]
		start = end
	}
}

// Forward calls next with the token of e set (out.Prepare has set it).
// When the upstream rejects the token (rejectsToken) of a request that
// carried it as it left, the token is purged if it is still the cached
// one, and the request is sent once more with the new token, provided it
// is replayable (replayBody) and the 401's body was at most
// maxBufferedBody bytes; else the caller gets the 401. When the merchant
// must consent again, Forward writes nothing and returns a *Refusal.
//
// A DPoP nonce challenge purges nothing: a DPoP-bound request is sent once
// more with the same token and the new nonce, under the same replay rules,
// in every Mode (NonceChallenged is told); one that brought no new nonce
// (none, or the one the proof carried: DPoP.Observe), and a bearer
// request's, are passed through.
//
// When next fails, Forward returns its error with the request's
// Authorization removed: Caddy's handle_errors routes run on the same
// request and must neither send the token elsewhere nor show it.
func (rt Retry) Forward(w http.ResponseWriter, r *http.Request, next Next, out Contract, b *broker.Binding, e Entry) (err error) {
	defer func() {
		if err != nil {
			delete(r.Header, "Authorization")
		}
	}()
	if rt.Mode == "off" && rt.DPoP == nil {
		return next.ServeHTTP(w, r)
	}
	replayable, body, err := rt.replayBody(r)
	if err != nil {
		return err
	}

	// The first attempt's response headers land in w's header map even
	// when its response is buffered: the retry starts from what was there.
	var first sent
	first.before.take(w.Header())
	// Later handlers may rewrite the request in place: the retry starts
	// from the request as it is now (copies on the stack; the recorder is
	// the first attempt's one allocation).
	first.method, first.host, first.requestURI, first.url, first.body = r.Method, r.Host, r.RequestURI, *r.URL, body
	if replayable {
		first.header.take(r.Header)
	}
	rec := &rejectRecorder{mode: rt.Mode, dpop: rt.DPoP}
	rec.reset(w, replayable)
	err = next.ServeHTTP(rec, r)
	if rec.unsigned {
		first.before.restore(w.Header())
		return &Refusal{Code: errcode.DPoPTransportMissing, Err: ErrUnsigned}
	}
	rt.reportRefused(b, rec)
	if err != nil || !rec.rejected && !rec.challenged {
		return err // passed through
	}
	if rec.challenged {
		if !rec.buffered {
			return nil // passed through: not replayable, or a long 401 body
		}
		if rt.NonceChallenged != nil {
			rt.NonceChallenged(b)
		}
		first.before.restore(w.Header())
		return rt.again(w, r, next, out, b, e, rec, &first, false)
	}

	rejected := e.Token()
	if !rt.carries(out, r, e.Header()) {
		rt.Tokens.Kept(b, rejected)
		if rec.buffered {
			return rec.writeBuffered()
		}
		return nil
	}
	rt.purge(b, rejected)
	if !rec.buffered {
		return nil // passed through: not replayable, or a long 401 body
	}
	fresh, err := rt.Tokens.Get(r.Context(), b)
	if _, ok := errors.AsType[*oauth.ConsentRequiredError](err); ok {
		// The grant was revoked: the caller gets consent_required, as the
		// next call would, not the 401.
		first.before.restore(w.Header())
		return &Refusal{Code: errcode.Classify(err), Err: err}
	}
	if err != nil || fresh.Token().Value == rejected.Value {
		return rec.writeBuffered() // nothing better to try: the caller gets the 401
	}
	first.before.restore(w.Header())
	return rt.again(w, r, next, out, b, fresh, rec, &first, true)
}

// sent is a request as Forward got it, for a retry to start from.
type sent struct {
	method, host, requestURI string
	url                      neturl.URL
	body                     []byte         // the kept body; nil: none
	header                   headerSnapshot // the request headers
	before                   headerSnapshot // the response headers before the first attempt
}

// again sends the request once more, as it was when Forward got it
// (first), with the token of fresh, and passes the answer through. After a
// purge (purged), an answer that accepts the fresh token is reported
// (Tokens.Accepted); a rejection of the token sent is reported (Purge).
func (rt Retry) again(w http.ResponseWriter, r *http.Request, next Next, out Contract, b *broker.Binding, fresh Entry,
	rec *rejectRecorder, first *sent, purged bool) error {
	if rt.Isolate != nil {
		r = rt.Isolate(r)
	}
	r.Method, r.Host, r.RequestURI = first.method, first.host, first.requestURI
	r.URL = new(neturl.URL)
	*r.URL = first.url
	first.header.restore(r.Header)
	out.setToken(r, fresh.Header())
	if rt.DPoP != nil {
		rt.DPoP.SetToken(fresh.Header(), fresh.ATH())
	}
	if first.body != nil {
		r.Body = io.NopCloser(bytes.NewReader(first.body))
	}
	rec.reset(w, false)
	err := next.ServeHTTP(rec, r)
	if rec.unsigned {
		first.before.restore(w.Header())
		return &Refusal{Code: errcode.DPoPTransportMissing, Err: ErrUnsigned}
	}
	rt.reportRefused(b, rec)
	if err != nil || !rec.rejected {
		if err == nil && purged && acceptsToken(rec.status) {
			rt.Tokens.Accepted(b, fresh.Token().Value)
		}
		return err
	}
	if rt.carries(out, r, fresh.Header()) {
		rt.purge(b, fresh.Token())
	}
	return nil
}

// reportRefused tells NonceRefused about the attempt just answered when
// it was a nonce challenge passed on because the key refused its nonce (at
// most one attempt of a request).
func (rt Retry) reportRefused(b *broker.Binding, rec *rejectRecorder) {
	if rec.refused != nil && rt.NonceRefused != nil {
		rt.NonceRefused(b, rec.refused)
	}
}

// carries reports whether the attempt just answered carried the token
// header value v as it left (DPoP.Carries, else Contract.Carries).
func (rt Retry) carries(out Contract, r *http.Request, v string) bool {
	if rt.DPoP != nil {
		return rt.DPoP.Carries(v)
	}
	return out.Carries(r, v)
}

// purge reports a rejected token to Tokens, except in Mode "any" a token
// younger than minPurgeAge.
func (rt Retry) purge(b *broker.Binding, rejected broker.Token) {
	if rt.Mode == "any" && time.Since(rejected.IssuedAt) < minPurgeAge {
		return
	}
	rt.Tokens.Purge(b, rejected)
}

// replayBody decides whether r can be sent twice and, if it has a body,
// reads it into memory: a request that is not Incremental and has no
// body, or a Content-Length of at most BodyLimit. A body of unknown length
// is never read ahead: it may be a stream whose end is far away.
func (rt Retry) replayBody(r *http.Request) (bool, []byte, error) {
	if rt.Incremental != nil && rt.Incremental(r.Header) {
		return false, nil, nil
	}
	if r.Body == nil || r.Body == http.NoBody {
		return true, nil, nil
	}
	limit := rt.BodyLimit
	if limit == 0 {
		limit = DefaultRetryBodyLimit
	}
	if r.ContentLength < 0 || r.ContentLength > limit {
		return false, nil, nil
	}
	kept, err := io.ReadAll(io.LimitReader(r.Body, r.ContentLength+1))
	if err != nil {
		return false, nil, &Refusal{Code: errcode.UnreadableBody, Err: err}
	}
	if int64(len(kept)) > r.ContentLength {
		// More than announced (a handler changed the body): stream it.
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(kept), r.Body), r.Body}
		return false, nil, nil
	}
	r.Body = io.NopCloser(bytes.NewReader(kept))
	return true, kept, nil
}
