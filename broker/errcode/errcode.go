// Package errcode is the table of the answers the token broker gives a
// request it does not forward: for each error code, the HTTP status, the
// message (per provider type where the advice differs), whether a token
// API call can end with it (the token request metric's outcome), and
// whether the answer carries Retry-After; package admission writes it.
// Messages tell the caller what to do and reveal nothing about
// credentials or tokens.
package errcode

import (
	"context"
	"errors"
	"net/http"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// MerchantIDGrammar says in words what config.ValidMerchantID accepts as a
// merchant id or provider name.
const MerchantIDGrammar = "1 to 128 ASCII letters, digits and . _ - : @ (no comma), starting with a letter or digit"

// Code is an error code. The zero Code is no error.
type Code uint8

// The error codes. Those from ClientGone on are the outcomes of a token
// API call, in the order Classify tries them.
const (
	_ Code = iota

	// The request itself, before any token.
	HostNotAllowed
	CrossSiteRequest
	MethodRefused
	ForbiddenTrailer
	MissingMerchant
	AmbiguousMerchant
	InvalidMerchant
	UnknownMerchant
	UnlistedOrganisation
	OrganisationsUnavailable
	TooManyMerchants
	CallerUnauthenticated
	CallerKeysUnavailable
	CallerForbidden

	// The route, after the token.
	UnreadableBody
	DPoPTransportMissing

	// The token API, in Classify's order.
	ClientGone
	ConsentRequired
	TokenAPIDown
	TokenTimeout
	TokenRateLimited
	TokenBadResponse
	TokenRefused
	BudgetExhausted
	TokenUnavailable

	count
)

// rule is one row of the table.
type rule struct {
	name   string // the "error" of the JSON body
	status int
	// message is sent to callers; nuapay and oauth2 replace it for that
	// provider type when set.
	message, nuapay, oauth2 string
	// fetch reports whether a token API failure has this code; nil for a
	// code no token API call ends with.
	fetch func(error) bool
	// retryAfter: the answer carries the failure's wait, if any.
	retryAfter bool
}

var rules = [count]rule{
	HostNotAllowed: {name: "host_not_allowed", status: http.StatusMisdirectedRequest,
		message: "this token broker answers requests addressed to a loopback name (localhost, 127.0.0.1, [::1]) or to a host its operator allows (allowed_hosts in the token_broker global option), not to this Host; the request was not forwarded"},
	CrossSiteRequest: {name: "cross_site_request", status: http.StatusForbidden,
		message: "a browser request from another site (Sec-Fetch-Site, or an Origin that is not this host) is not forwarded: the token broker serves the applications on its host, not web pages"},
	MethodRefused: {name: "method_refused", status: http.StatusMethodNotAllowed,
		message: "TRACE and TRACK (in any letter case) are not forwarded: the upstream would echo the injected credential back; nor is CONNECT: a tunnel is not an API call"},
	ForbiddenTrailer: {name: "forbidden_trailer", status: http.StatusBadRequest,
		message: "the request declares a trailer naming a header the token broker sets or reads (Authorization, Proxy-Authorization, DPoP, the merchant or caller header): send these as headers, never as trailers"},
	MissingMerchant: {name: "missing_merchant", status: http.StatusBadRequest,
		message: "the request does not say which merchant it is for: set the merchant header (default X-Merchant-Id)"},
	AmbiguousMerchant: {name: "ambiguous_merchant", status: http.StatusBadRequest,
		message: "the request names the merchant more than once: send one merchant header with one value"},
	InvalidMerchant: {name: "invalid_merchant", status: http.StatusBadRequest,
		message: "the merchant id is malformed: " + MerchantIDGrammar},
	UnknownMerchant: {name: "unknown_merchant", status: http.StatusForbidden,
		message: "this merchant is not in the token broker's registry: check the merchant id the request sends; if it is right, the token broker's operator must add the merchant to the registry (a [merchants.ID] table) and reload, and until then retrying will not help"},
	UnlistedOrganisation: {name: "unlisted_organisation", status: http.StatusForbidden,
		message: "this merchant's organisation is not among the organisations the provider lists for the partner, which the registry's wildcard entry is restricted to"},
	OrganisationsUnavailable: {name: "organisations_unavailable", status: http.StatusServiceUnavailable, retryAfter: true,
		message: "the provider's list of organisations, which the registry's wildcard entry is restricted to, could not be read yet; retry later"},
	TooManyMerchants: {name: "too_many_merchants", status: http.StatusServiceUnavailable,
		message: "the token broker serves as many merchants through its wildcard entry as max_active allows, each has been served a token and none has been idle long enough to make room; retry later"},
	CallerUnauthenticated: {name: "caller_unauthenticated", status: http.StatusUnauthorized,
		message: "the caller must present a valid JWT from the trusted issuer, for this sidecar's audience, as a Bearer token"},
	CallerKeysUnavailable: {name: "caller_keys_unavailable", status: http.StatusServiceUnavailable,
		message: "the caller's JWT cannot be checked now: the issuer's keys are unavailable"},
	CallerForbidden: {name: "caller_forbidden", status: http.StatusForbidden,
		message: "this caller may not act for this merchant"},
	UnreadableBody: {name: "unreadable_body", status: http.StatusBadRequest,
		message: "the request body ended before the length its Content-Length announces, or could not be read in time: send the whole body; the request was not forwarded"},
	DPoPTransportMissing: {name: "dpop_transport_missing", status: http.StatusBadGateway,
		message: "this merchant's provider binds its tokens to a DPoP key, but this route's reverse_proxy does not sign requests, so the request was sent without any credential and was answered 401: the token broker's operator must add `transport token_broker_dpop` to the route's reverse_proxy (a DPoP-bound token is only ever sent with its proof)"},

	ClientGone: {name: "client_gone", status: 499, // nginx's "client closed request": logged, nobody reads it
		message: "the request was cancelled while waiting for a token",
		fetch:   func(err error) bool { return errors.Is(err, context.Canceled) }},
	ConsentRequired: {name: "consent_required", status: http.StatusBadGateway,
		message: "the merchant's consent at the provider is missing, expired or revoked: the merchant must consent again (token_broker_consent start URL), or an operator must load a new refresh token; the request was not forwarded",
		fetch:   isA[*oauth.ConsentRequiredError]},
	TokenAPIDown: {name: "token_api_down", status: http.StatusServiceUnavailable, retryAfter: true,
		message: "the provider's token API keeps failing, so the broker is not calling it for a while; retry after the Retry-After delay",
		fetch:   isA[*broker.UnavailableError]},
	TokenTimeout: {name: "token_timeout", status: http.StatusGatewayTimeout,
		message: "the provider's token API did not answer in time; the request was not forwarded",
		fetch:   broker.IsTimeout},
	TokenRateLimited: {name: "token_rate_limited", status: http.StatusServiceUnavailable, retryAfter: true,
		message: "the provider's token API asked the broker to slow down; retry after the Retry-After delay",
		fetch:   apiError(func(e *broker.APIError) bool { return e.StatusCode == http.StatusTooManyRequests })},
	TokenBadResponse: {name: "token_bad_response", status: http.StatusBadGateway,
		message: "the provider's token API answered with something that is not a usable token; the request was not forwarded",
		fetch:   apiError(func(e *broker.APIError) bool { return e.StatusCode >= 200 && e.StatusCode < 300 })},
	TokenRefused: {name: "token_refused", status: http.StatusBadGateway,
		message: "the provider refused to issue a token for this merchant (the token broker's log has its answer): the token broker's operator must check the merchant's entry in the registry, its scopes and the provider's credentials; retrying will not help until then",
		nuapay:  "Nuapay refused to issue a token for this merchant (the token broker's log has Nuapay's answer): the token broker's operator must check the partner API key, and the merchant's organisation (encodedOrganisationId) and scopes in the registry; retrying will not help until then",
		oauth2:  "the authorization server refused to issue a token for this merchant (the token broker's log has its answer): the token broker's operator must check the client id and credentials (secret or signing key), the scopes and audience, and the client's registration at the provider; retrying will not help until then",
		fetch: func(err error) bool {
			return isA[*broker.RequestError](err) || apiError(func(e *broker.APIError) bool { return !e.Temporary() })(err)
		}},
	BudgetExhausted: {name: "budget_exhausted", status: http.StatusServiceUnavailable, retryAfter: true,
		message: "the provider's token API rate limit, which the token broker spends on purpose, has no room before this request's deadline for the token request it needs; retry after the Retry-After delay",
		fetch:   func(err error) bool { return errors.Is(err, budget.ErrExhausted) }},
	TokenUnavailable: {name: "token_unavailable", status: http.StatusBadGateway,
		message: "the provider's token API failed; the request was not forwarded",
		fetch:   func(error) bool { return true }},
}

// isA reports whether err's chain contains an error of type E.
func isA[E error](err error) bool {
	var e E
	return errors.As(err, &e)
}

// apiError matches a provider's answer (*broker.APIError) by test.
func apiError(test func(*broker.APIError) bool) func(error) bool {
	return func(err error) bool {
		var ae *broker.APIError
		return errors.As(err, &ae) && test(ae)
	}
}

// Classify returns the code of a token failure: the first token API code
// whose test err passes, TokenUnavailable when none does.
func Classify(err error) Code {
	for c := ClientGone; c < count; c++ {
		if rules[c].fetch(err) {
			return c
		}
	}
	return TokenUnavailable
}

// FetchCodes returns the codes a token API call can end with (those
// Classify returns).
func FetchCodes() []Code {
	var out []Code
	for c := range count {
		if rules[c].fetch != nil {
			out = append(out, c)
		}
	}
	return out
}

// String returns the code as the JSON body carries it
// ("unknown_merchant"); "" for the zero Code.
func (c Code) String() string {
	if c >= count {
		return ""
	}
	return rules[c].name
}

// Status returns the HTTP status of an answer with the code; 0 for the
// zero Code.
func (c Code) Status() int {
	if c >= count {
		return http.StatusInternalServerError
	}
	return rules[c].status
}

// Message returns the message of the code for a provider type ("nuapay",
// "oauth2"; "" before the request reached a provider).
func (c Code) Message(providerType string) string {
	if c >= count {
		return ""
	}
	r := rules[c]
	switch {
	case providerType == "nuapay" && r.nuapay != "":
		return r.nuapay
	case providerType == "oauth2" && r.oauth2 != "":
		return r.oauth2
	}
	return r.message
}

// RetryAfter returns the wait an answer with the code tells the caller
// (broker.RetryAfterOf of cause); 0 when the code carries no Retry-After
// or the cause does not say.
func (c Code) RetryAfter(cause error) time.Duration {
	if c >= count || !rules[c].retryAfter || cause == nil {
		return 0
	}
	return broker.RetryAfterOf(cause)
}
