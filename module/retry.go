package module

import (
	"bytes"
	"context"
	"io"
	"maps"
	"net/http"
	"strings"
	"sync"

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

var bufPool = sync.Pool{New: func() any { return new(bytes.Buffer) }}

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

	buf := bufPool.Get().(*bytes.Buffer)
	buf.Reset()
	defer bufPool.Put(buf)
	// The first attempt's response headers land in w's header map even when
	// its response is held back; keep what was there to start the retry
	// from it.
	before := w.Header().Clone()
	rec := caddyhttp.NewResponseRecorder(w, buf, h.rejectsToken)
	if err := next.ServeHTTP(rec, r); err != nil || !rec.Buffered() || rec.Status() == 0 {
		return err // streamed through (or nothing written at all)
	}

	rejected := e.Token()
	h.purge(b, rejected)
	fresh, _, err := h.broker.Get(r.Context(), b.Binding)
	if err != nil || fresh.Token().Value == rejected.Value {
		return rec.WriteResponse() // nothing better to try: the caller gets the 401
	}
	clear(w.Header())
	maps.Copy(w.Header(), before)
	// The first attempt may still have a connection dial in flight that
	// reads the request's variables; give the retry its own copy.
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		r = r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, maps.Clone(vars)))
	}
	r.Header[h.header] = []string{fresh.Header()}
	if body != nil {
		r.Body = io.NopCloser(bytes.NewReader(body))
	}
	return next.ServeHTTP(w, r)
}

// purge drops a token the upstream rejected, if it is still the cached one.
func (h *Handler) purge(b *binding, rejected broker.Token) {
	purged := h.broker.Purge(b.Binding, rejected.Value)
	if purged && h.metrics != nil {
		h.metrics.Purged(b.provider, b.Request.Merchant)
	}
	h.logger.Info("upstream rejected the token", zap.String("merchant", b.Request.Merchant),
		zap.String("fingerprint", rejected.Fingerprint()), zap.Bool("purged", purged))
}
