package module

import (
	"bytes"
	"context"
	"io"
	"maps"
	"net/http"
	neturl "net/url"
	"strings"
	"sync"
	"time"

	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// DefaultRetryBodyLimit is the largest request body buffered so that a
// request rejected with 401 can be sent again with a new token.
const DefaultRetryBodyLimit = 64 << 10

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
// and headers say the token was rejected: such a response is held back in
// buf, so that the request can be sent again. Recorders are pooled: the
// request path allocates nothing for them.
type rejectRecorder struct {
	caddyhttp.ResponseWriterWrapper
	h           *Handler
	status      int
	held        bool
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
		rr.held = true
		return
	}
	rr.ResponseWriter.WriteHeader(status)
}

func (rr *rejectRecorder) Write(p []byte) (int, error) {
	rr.WriteHeader(http.StatusOK)
	if rr.held {
		return rr.buf.Write(p)
	}
	return rr.ResponseWriter.Write(p)
}

func (rr *rejectRecorder) ReadFrom(r io.Reader) (int64, error) {
	rr.WriteHeader(http.StatusOK)
	if rr.held {
		return rr.buf.ReadFrom(r)
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
// token (see rejectsToken), the token is purged if it is still the cached
// one, so a burst of rejections causes one new fetch, and the request is
// sent once more with the new token, provided its body could be kept
// (at most retry_body_limit bytes). Otherwise the caller gets the 401.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, b *binding, e *broker.Entry) error {
	if h.RetryOn401 == "off" {
		return next.ServeHTTP(w, r)
	}
	var body []byte
	if r.Body != nil && r.Body != http.NoBody {
		limit := h.RetryBodyLimit
		if limit == 0 {
			limit = DefaultRetryBodyLimit
		}
		kept, err := io.ReadAll(io.LimitReader(r.Body, limit+1))
		if err != nil {
			return caddyhttp.Error(http.StatusBadRequest, err)
		}
		if int64(len(kept)) > limit {
			// Too large to keep: stream it and let a 401 through, but
			// still purge a rejected token for the requests that follow.
			r.Body = struct {
				io.Reader
				io.Closer
			}{io.MultiReader(bytes.NewReader(kept), r.Body), r.Body}
			rec := caddyhttp.NewResponseRecorder(w, nil, nil)
			err := next.ServeHTTP(rec, r)
			if h.rejectsToken(rec.Status(), rec.Header()) {
				h.purge(b, e.Token())
			}
			return err
		}
		body = kept
		r.Body = io.NopCloser(bytes.NewReader(body))
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
	rec.ResponseWriter, rec.h, rec.status, rec.held, rec.wroteHeader = w, h, 0, false, false
	rec.buf.Reset()
	defer func() {
		rec.ResponseWriter, rec.h = nil, nil
		if rec.buf.Cap() > maxPooledBody {
			rec.buf = bytes.Buffer{} // do not keep a large held body's memory in the pool
		}
		recorderPool.Put(rec)
	}()
	if err := next.ServeHTTP(rec, r); err != nil || !rec.held {
		return err // passed through
	}

	rejected := e.Token()
	h.purge(b, rejected)
	fresh, _, err := h.broker.Get(r.Context(), b.Binding)
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
	r.Header[h.header] = []string{fresh.Header()}
	if body != nil {
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	return next.ServeHTTP(w, r)
}

// minPurgeAge: with retry_on_401 any, a token younger than this is not
// purged. Any 401 then counts, including ones a caller can provoke at will
// (a wrong resource), and each purge costs a token request: this bounds
// them to one per token per second. With invalid_token the upstream says
// the token itself is bad, and it is purged at once.
const minPurgeAge = time.Second

// purge drops a token the upstream rejected, if it is still the cached one.
func (h *Handler) purge(b *binding, rejected broker.Token) {
	if h.RetryOn401 == "any" && time.Since(rejected.IssuedAt) < minPurgeAge {
		return
	}
	purged := h.broker.Purge(b.Binding, rejected.Value)
	if purged && h.metrics != nil {
		h.metrics.Purged(b.provider, b.Request.Merchant)
	}
	h.logger.Info("upstream rejected the token", zap.String("merchant", b.Request.Merchant),
		zap.String("fingerprint", rejected.Fingerprint()), zap.Bool("purged", purged))
}
