package module

import (
	"context"
	"errors"
	"maps"
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/admission"
	"github.com/tokenbroker/caddy-token-broker/broker/bindings"
	"github.com/tokenbroker/caddy-token-broker/broker/outbound"
)

// outbound returns the handler's outbound-header contract. It is computed
// from the handler's fields, so it costs nothing to build per request.
func (h *Handler) outbound() outbound.Contract {
	return outbound.Contract{Merchant: h.merchant.Header(), Interaction: h.InteractionID, Caller: h.callers.Header()}
}

// forward calls next through the 401 retry of retry_on_401 and
// retry_body_limit (outbound.Retry), and answers its refusals
// (outbound.Refusal: consent_required, unreadable_body).
//
// A DPoP-bound token (its provider's profile has a DPoP key) is not put
// on the request: it goes in the request's binding to the key
// (outbound.DPoP, in the request variable dpopVar), from which the
// route's token_broker_dpop transport puts it, with its proof, on the
// copy it sends. A 401 to a request no transport signed is answered 502
// dpop_transport_missing (outbound.Retry.DPoP says which answers pass).
//
// The request variable is set before next runs and never written after:
// a connection dial reverse_proxy left running may still read the
// variables. The binding is ended (DPoP.End) when forward returns, so
// that what still finds it there (the handle_errors routes, which Caddy
// runs with the same variables) sends no credential.
func (h *Handler) forward(w http.ResponseWriter, r *http.Request, next caddyhttp.Handler, out outbound.Contract, b *bindings.Binding, e *broker.Entry) error {
	rt := h.retry // its hooks, made once in instrument
	rt.Mode, rt.BodyLimit = h.RetryOn401, h.RetryBodyLimit
	if k := b.DPoP; k != nil && outbound.IsDPoP(e.Header()) {
		d := outbound.NewDPoP(k)
		defer d.End()
		d.SetToken(e.Header(), e.ATH())
		caddyhttp.SetVar(r.Context(), dpopVar, d)
		rt.DPoP = d
	}
	err := rt.Forward(w, r, next, out, &b.Binding, e)
	if rf, ok := errors.AsType[*outbound.Refusal](err); ok {
		// Not forwarded, or its answer was dropped.
		repl, _ := r.Context().Value(caddy.ReplacerCtxKey).(*caddy.Replacer)
		return h.fail(w, repl, admission.Refusal{Code: rf.Code, Merchant: b.Merchant, ProviderType: b.Provider.Type, Cause: rf.Err})
	}
	return err
}

// isolateVars gives a retry its own copy of Caddy's request variables: the
// first attempt may still have a connection dial in flight that reads
// them.
func isolateVars(r *http.Request) *http.Request {
	if vars, ok := r.Context().Value(caddyhttp.VarsCtxKey).(map[string]any); ok {
		return r.WithContext(context.WithValue(r.Context(), caddyhttp.VarsCtxKey, maps.Clone(vars)))
	}
	return r
}
