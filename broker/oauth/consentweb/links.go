package consentweb

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"strconv"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// LinkRequest is the body of a consent-link request.
type LinkRequest struct {
	// Merchant whose consent is asked.
	Merchant string `json:"merchant"`
	// ReturnURL is where the browser goes after the callback; it must be
	// on the provider's return_urls allow-list. Optional.
	ReturnURL string `json:"return_url,omitempty"`
	// CallbackHost picks the callback domain; default the first of the
	// provider's redirect_uris.
	CallbackHost string `json:"callback_host,omitempty"`
}

// LinkResponse is a created consent link.
type LinkResponse struct {
	// Merchant whose consent the link asks.
	Merchant string `json:"merchant"`
	// Provider whose consent it is.
	Provider string `json:"provider"`
	// URL is the consent link for the merchant's browser, usable until a
	// consent started from it completes or it expires.
	URL string `json:"url"`
	// Expires is when the link stops working.
	Expires time.Time `json:"expires"`
}

// link serves POST …/links: the CallerGate applies.
func (c *Handler) link(w http.ResponseWriter, r *http.Request) {
	caller, ok := c.o.Gate.admits(w, r, c.o.Logger)
	if !ok {
		return
	}
	req, err := DecodeLinkRequest(r.Body)
	if err != nil {
		linkError(w, http.StatusBadRequest, "bad_request", err.Error())
		return
	}
	if !c.o.Gate.allows(w, caller, req.Merchant) {
		return
	}
	provider := cmp.Or(ProviderOf(c.o.Registry, req.Merchant), c.o.Provider)
	ctx, span := c.span(r, provider, StepLink)
	link, status, err := CreateLink(ctx, c.o.Registry, req)
	c.done(span, provider, StepLink, req.Merchant, err)
	if err != nil {
		code := "bad_request"
		if ce, ok := errors.AsType[*oauth.ConsentError](err); ok {
			code = ce.Reason
		}
		SetRetryAfter(w, err)
		linkError(w, status, code, err.Error())
		return
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(link)
}

// DecodeLinkRequest reads the body of a consent-link request (the links
// route and the admin API): one JSON object of at most 16 KiB with the
// fields of LinkRequest and no other, naming a merchant. The error says
// what is wrong with it.
func DecodeLinkRequest(body io.Reader) (LinkRequest, error) {
	const form = `{"merchant": "...", "return_url": "...", "callback_host": "..."}`
	const limit = 16 << 10
	var req LinkRequest
	lr := &io.LimitedReader{R: body, N: limit + 1} // one byte more: a longer body is seen
	dec := json.NewDecoder(lr)
	dec.DisallowUnknownFields()
	if err := dec.Decode(&req); err != nil {
		return LinkRequest{}, fmt.Errorf("the body must be JSON %s (return_url and callback_host optional), at most %d bytes: %v", form, limit, err)
	}
	if _, err := dec.Token(); err != io.EOF || lr.N == 0 {
		return LinkRequest{}, fmt.Errorf("the body must be one JSON object %s, at most %d bytes, and nothing after it", form, limit)
	}
	if req.Merchant == "" {
		return LinkRequest{}, fmt.Errorf("the body names no merchant: send the merchant's id as %s", form)
	}
	return req, nil
}

// ProviderOf returns the provider of a merchant of reg, "" for a
// merchant it does not have.
func ProviderOf(reg *config.Registry, merchant string) string {
	if m := reg.Merchants[merchant]; m != nil {
		return m.Provider
	}
	return ""
}

// CreateLink creates the link of the merchant's provider; status is the
// HTTP status of a failure: 404 for a merchant not in the registry, 409
// for one whose provider has no consent table, 400 for a return URL or
// callback host refused, 429 for a link limit.
func CreateLink(ctx context.Context, reg *config.Registry, req LinkRequest) (LinkResponse, int, error) {
	m := reg.Merchants[req.Merchant]
	if m == nil {
		return LinkResponse{}, http.StatusNotFound, fmt.Errorf("merchant %q is not in the registry %s", req.Merchant, reg.Path)
	}
	p := reg.Providers[m.Provider]
	if p == nil || p.Consent == nil {
		return LinkResponse{}, http.StatusConflict, fmt.Errorf("merchant %q: provider %q has no consent table ([providers.%s.consent])", req.Merchant, m.Provider, m.Provider)
	}
	flow := p.Consent
	link, err := flow.NewLink(ctx, req.Merchant, req.ReturnURL, req.CallbackHost)
	if err != nil {
		status := http.StatusInternalServerError
		var ce *oauth.ConsentError
		var le *oauth.LinkLimitError
		switch {
		case errors.As(err, &le):
			status = http.StatusTooManyRequests
		case errors.As(err, &ce) && (ce.Reason == oauth.ReasonReturnURL || ce.Reason == oauth.ReasonWrongCallback):
			status = http.StatusBadRequest
		}
		return LinkResponse{}, status, err
	}
	return LinkResponse{Merchant: req.Merchant, Provider: flow.Provider(), URL: link.URL, Expires: link.Expires.UTC()}, 0, nil
}

// SetRetryAfter sets Retry-After (whole seconds, rounded up, at least 1)
// when err is a link limit, a callback kept for a reload
// (oauth.ReasonRetryCallback) or a consent step refused with a wait (its
// RetryAfter).
func SetRetryAfter(w http.ResponseWriter, err error) {
	if le, ok := errors.AsType[*oauth.LinkLimitError](err); ok {
		w.Header().Set("Retry-After", strconv.FormatInt(retryAfterSeconds(le.RetryAfter), 10))
	} else if ce, ok := errors.AsType[*oauth.ConsentError](err); ok && (ce.RetryAfter > 0 || ce.Reason == oauth.ReasonRetryCallback) {
		w.Header().Set("Retry-After", strconv.FormatInt(retryAfterSeconds(ce.RetryAfter), 10))
	}
}

// retryAfterSeconds is d in whole seconds, rounded up, at least 1.
func retryAfterSeconds(d time.Duration) int64 {
	return max(1, int64((d+time.Second-1)/time.Second))
}

// linkError writes a JSON error: {"error": code, "message": msg}, and
// "retry_after" (seconds) when Retry-After is set.
func linkError(w http.ResponseWriter, status int, code, msg string) {
	w.Header().Set("Content-Type", "application/json")
	body := map[string]any{"error": code, "message": msg}
	if ra, err := strconv.Atoi(w.Header().Get("Retry-After")); err == nil {
		body["retry_after"] = ra
	}
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(body)
}
