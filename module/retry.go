package module

import (
	"bytes"
	"context"
	"errors"
	"io"
	"maps"
	"net/http"
	neturl "net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// DefaultRetryBodyLimit is the largest request body buffered so that a
// request rejected with 401 can be sent again with a new token.
const DefaultRetryBodyLimit = 64 << 10

// MaxRetryBodyLimit is the largest retry_body_limit accepted: each
// retryable request in flight holds its body in memory.
const MaxRetryBodyLimit = 16 << 20

// maxHeldBody is the largest 401 response body held back while the
// request is retried. A longer one is passed on to the caller as it comes
// (the token is still purged, the request is not retried): the broker never
// holds an unbounded upstream answer.
const maxHeldBody = 64 << 10

// rejectsToken reports whether an upstream answer says the token is no good
// and should be purged: by default a 401 with
// `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3.1); with
// retry_on_401 any, every 401. A 403 (insufficient_scope, IP filtering) is
// not about the token's validity and never purges.
func (h *Handler) rejectsToken(status int, header http.Header) bool {
	if status != http.StatusUnauthorized {
		return false
	}
	if h.RetryOn401 == "any" {
		return true
	}
	for _, v := range header.Values("WWW-Authenticate") {
		if len(v) >= 6 && strings.EqualFold(v[:6], "bearer") && strings.Contains(v, `error="invalid_token"`) {
			return true
		}
	}
	return false
}

// rejectRecorder passes a response through to the client unless its status
// and headers say the token was rejected (rejected): such a response is held
// back in buf (held), up to maxHeldBody bytes, so that the request can be
// sent again. With hold false, or past maxHeldBody, it is passed through and
// only rejected is recorded. Recorders are pooled: the request path
// allocates nothing for them.
type rejectRecorder struct {
	caddyhttp.ResponseWriterWrapper
	h           *Handler
	hold        bool // the request can be retried: hold a rejection back
	status      int
	rejected    bool // the upstream rejected the token
	held        bool // the rejection is held back in buf
	wroteHeader bool
	buf         bytes.Buffer
}

var recorderPool = sync.Pool{New: func() any { return new(rejectRecorder) }}

// maxPooledBody is the largest held-response buffer kept for reuse.
const maxPooledBody = 64 << 10

func (rr *rejectRecorder) WriteHeader(status int) {
	if rr.wroteHeader {
		return
	}
	if status >= 100 && status < 200 && status != http.StatusSwitchingProtocols {
		rr.ResponseWriter.WriteHeader(status) // informational: pass on, wait for the final one
		return
	}
	rr.wroteHeader, rr.status = true, status
	if rr.h.rejectsToken(status, rr.Header()) {
		rr.rejected = true
		if rr.hold {
			rr.held = true
			return
		}
	}
	rr.ResponseWriter.WriteHeader(status)
}

func (rr *rejectRecorder) Write(p []byte) (int, error) {
	rr.WriteHeader(http.StatusOK)
	if rr.held {
		if rr.buf.Len()+len(p) <= maxHeldBody {
			return rr.buf.Write(p)
		}
		if err := rr.release(); err != nil {
			return 0, err
		}
	}
	return rr.ResponseWriter.Write(p)
}

func (rr *rejectRecorder) ReadFrom(r io.Reader) (int64, error) {
	rr.WriteHeader(http.StatusOK)
	if rr.held {
		// Through Write, which bounds what is held.
		return io.Copy(struct{ io.Writer }{rr}, r)
	}
	return rr.ResponseWriterWrapper.ReadFrom(r)
}

// FlushError flushes a response that is passed through, and nothing of a
// held one.
func (rr *rejectRecorder) FlushError() error {
	if rr.held {
		return nil
	}
	return http.NewResponseController(rr.ResponseWriter).Flush()
}

// release stops holding a rejection that grew past maxHeldBody: what was
// held is sent, and the rest will follow as it comes.
func (rr *rejectRecorder) release() error {
	rr.held = false
	err := rr.writeHeld()
	rr.buf.Reset()
	return err
}

// writeHeld sends the held response as it was.
func (rr *rejectRecorder) writeHeld() error {
	rr.ResponseWriter.WriteHeader(rr.status)
	_, err := rr.ResponseWriter.Write(rr.buf.Bytes())
	return err
}

// headerSnapshot remembers a header map's entries without allocating for
// up to 8 keys (a Caddy response has a few at this point).
type headerSnapshot struct {
	n    int
	keys [8]string
	vals [8][]string
	full http.Header
}

func (s *headerSnapshot) take(h http.Header) {
	if len(h) > len(s.keys) {
		s.full = h.Clone()
		return
	}
	for k, v := range h {
		s.keys[s.n], s.vals[s.n] = k, v
		s.n++
	}
}

// restore puts h back as it was when taken. Values appended since then do
// not show: the saved slices keep their old length.
func (s *headerSnapshot) restore(h http.Header) {
	clear(h)
	if s.full != nil {
		maps.Copy(h, s.full)
		return
	}
	for i := range s.n {
		h[s.keys[i]] = s.vals[i]
	}
}

// forward calls next with the token of e set. When the upstream rejects the
// token (see rejectsToken) of a request that still carried it as it left
// (outbound.carries), the token is purged if it is still the cached one, so
// a burst of rejections causes one new fetch; a 401 to a request that did
// not carry it (a later handler removed it) purges nothing. The request is
// then sent once more with the new token, provided it is replayable (see
// replayBody) and the 401's body was at most maxHeldBody bytes. Otherwise
// the caller gets the 401, except when no new token can be had because the
// merchant must consent again (the provider refused the refresh token, as
// after a revocation of the whole grant): the caller then gets
// consent_required, not the 401.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, out outbound, b *binding, e *broker.Entry) error {
	if h.RetryOn401 == "off" {
		return next.ServeHTTP(w, r)
	}
	replayable, body, err := h.replayBody(r, out)
	if err != nil {
		return err
	}

	// The first attempt's response headers land in w's header map even when
	// its response is held back; keep what was there to start the retry
	// from it.
	var before headerSnapshot
	before.take(w.Header())
	// Handlers after this one may rewrite the request in place (rewrite,
	// uri, handle_path strip the path): the retry must start from the
	// request as it is now. Copies on the stack; the retry alone allocates.
	method, host, requestURI, url := r.Method, r.Host, r.RequestURI, *r.URL
	rec := recorderPool.Get().(*rejectRecorder)
	rec.ResponseWriter, rec.h, rec.hold = w, h, replayable
	rec.status, rec.rejected, rec.held, rec.wroteHeader = 0, false, false, false
	rec.buf.Reset()
	defer func() {
		rec.ResponseWriter, rec.h = nil, nil
		if rec.buf.Cap() > maxPooledBody {
			rec.buf = bytes.Buffer{} // do not keep a large held body's memory in the pool
		}
		recorderPool.Put(rec)
	}()
	if err := next.ServeHTTP(rec, r); err != nil || !rec.rejected {
		return err // passed through
	}

	rejected := e.Token()
	if !out.carries(r, e.Header()) {
		h.logger.Warn("upstream answered 401 to a request whose token header a later handler changed or removed; the token is kept",
			zap.String("merchant", b.Merchant), zap.String("fingerprint", rejected.Fingerprint()))
		if rec.held {
			return rec.writeHeld()
		}
		return nil
	}
	h.purge(b, rejected)
	if !rec.held {
		return nil // passed through: not replayable, or a long 401 body
	}
	fresh, _, err := h.broker.Get(r.Context(), &b.Binding)
	if cr := (*oauth.ConsentRequiredError)(nil); errors.As(err, &cr) {
		// The provider refused the refresh (invalid_grant: the grant was
		// revoked, which killed the rejected token too): the caller gets
		// consent_required, as the next call would, not the 401.
		before.restore(w.Header())
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		return h.fail(w, repl, refusal{code: errcode.Classify(err), merchant: b.Merchant, providerType: b.Provider.Type, cause: err})
	}
	if err != nil || fresh.Token().Value == rejected.Value {
		return rec.writeHeld() // nothing better to try: the caller gets the 401
	}
	before.restore(w.Header())
	// The first attempt may still have a connection dial in flight that
	// reads the request's variables; give the retry its own copy.
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, maps.Clone(vars)))
	}
	r.Method, r.Host, r.RequestURI = method, host, requestURI
	r.URL = new(neturl.URL)
	*r.URL = url
	out.setToken(r, fresh.Header())
	if body != nil {
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	// The retry is passed through; a rejection of the fresh token too is
	// reported to the broker, which then holds the key's purges (the 401
	// is not about the token).
	rec.ResponseWriter, rec.hold = w, false
	rec.status, rec.rejected, rec.held, rec.wroteHeader = 0, false, false, false
	rec.buf.Reset()
	if err := next.ServeHTTP(rec, r); err != nil || !rec.rejected {
		if err == nil && rec.status != 0 {
			h.broker.Accepted(&b.Binding, fresh.Token().Value)
		}
		return err
	}
	if out.carries(r, fresh.Header()) {
		h.purge(b, fresh.Token())
	}
	return nil
}

// replayBody decides whether r can be sent twice and, if it has a body,
// reads it into memory. A request can be sent twice when it has no body, or
// a body whose length is known (Content-Length) and at most
// retry_body_limit, and it is not marked `Incremental: ?1`. Nothing else is
// read before forwarding: a body of unknown length (chunked) may be a
// stream whose end is far away, and waiting for it would stall the upload.
func (h *Handler) replayBody(r *http.Request, out outbound) (bool, []byte, error) {
	if out.incremental(r) {
		return false, nil, nil
	}
	if r.Body == nil || r.Body == http.NoBody {
		return true, nil, nil
	}
	limit := h.RetryBodyLimit
	if limit == 0 {
		limit = DefaultRetryBodyLimit
	}
	if r.ContentLength < 0 || r.ContentLength > limit {
		return false, nil, nil
	}
	kept, err := io.ReadAll(io.LimitReader(r.Body, r.ContentLength+1))
	if err != nil {
		return false, nil, caddyhttp.Error(http.StatusBadRequest, err)
	}
	if int64(len(kept)) > r.ContentLength {
		// More than announced (the server does not allow it; a handler
		// may have changed the body): stream it, do not retry.
		r.Body = struct {
			io.Reader
			io.Closer
		}{io.MultiReader(bytes.NewReader(kept), r.Body), r.Body}
		return false, nil, nil
	}
	r.Body = io.NopCloser(bytes.NewReader(kept))
	return true, kept, nil
}

// minPurgeAge: with retry_on_401 any, a token younger than this is not
// purged. Any 401 then counts, including ones a caller can provoke at will
// (a wrong resource), and each purge costs a token request. In every mode,
// the broker also limits purges by rejection per key (broker.Reject).
const minPurgeAge = time.Second

// purge reports a token the upstream rejected to the broker: it is purged
// if it is still the cached one, unless the key's purges by rejection are paused.
func (h *Handler) purge(b *binding, rejected broker.Token) {
	if h.RetryOn401 == "any" && time.Since(rejected.IssuedAt) < minPurgeAge {
		return
	}
	outcome := h.broker.Reject(&b.Binding, rejected.Value)
	if h.metrics != nil {
		switch outcome {
		case broker.RejectionPurged:
			h.metrics.Purged(b.Provider.Name, b.Merchant)
		case broker.RejectionKept:
			h.metrics.PurgeKept(b.Provider.Name, b.Merchant)
		}
	}
	h.logger.Info("upstream rejected the token", zap.String("merchant", b.Merchant),
		zap.String("fingerprint", rejected.Fingerprint()), zap.Stringer("outcome", outcome))
}
