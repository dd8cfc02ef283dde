package module

import (
	"context"
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// This file holds every answer the handler gives a refused caller: the
// mapping of token failures to a status and an error code (classify), the
// message of each code, per provider type where the advice differs, and
// the JSON body.

// messages are the messages sent to callers, by error code. They tell the
// caller what to do and reveal nothing about credentials or tokens.
var messages = map[string]string{
	// The request itself (siteGuard.check, outbound.check, merchantOf,
	// the caller policy).
	"host_not_allowed":          "this token broker answers requests addressed to a loopback name (localhost, 127.0.0.1, [::1]) or to a host its operator allows (allowed_hosts in the token_broker global option), not to this Host; the request was not forwarded",
	"cross_site_request":        "a browser request from another site (Sec-Fetch-Site, or an Origin that is not this host) is not forwarded: the token broker serves the applications on its host, not web pages",
	"method_refused":            "TRACE and TRACK (in any letter case) are not forwarded: the upstream would echo the injected credential back",
	"forbidden_trailer":         "the request declares a trailer naming a header the token broker sets or reads (Authorization, Proxy-Authorization, the merchant or caller header): send these as headers, never as trailers",
	"missing_merchant":          "the request does not say which merchant it is for: set the merchant header (default X-Merchant-Id)",
	"ambiguous_merchant":        "the request names the merchant more than once: send one merchant header with one value",
	"invalid_merchant":          "the merchant id is malformed: 1 to 128 ASCII letters, digits and . _ - : @ (no comma), starting with a letter or digit",
	"unknown_merchant":          "this merchant is not in the token broker's registry: check the merchant id the request sends; if it is right, the token broker's operator must add the merchant to the registry (a [merchants.ID] table) and reload, and until then retrying will not help",
	"unlisted_organisation":     "this merchant's organisation is not among the organisations the provider lists for the partner, which the registry's wildcard entry is restricted to",
	"organisations_unavailable": "the provider's list of organisations, which the registry's wildcard entry is restricted to, could not be read yet; retry later",
	"too_many_merchants":        "the token broker serves as many merchants through its wildcard entry as max_active allows, each has been served a token and none has been idle long enough to make room; retry later",
	"caller_unauthenticated":    "the caller must present a valid JWT from the trusted issuer, for this sidecar's audience, as a Bearer token",
	"caller_keys_unavailable":   "the caller's JWT cannot be checked now: the issuer's keys are unavailable",
	"caller_forbidden":          "this caller may not act for this merchant",

	// The token API (classify).
	"token_unavailable":  "the provider's token API failed; the request was not forwarded",
	"token_timeout":      "the provider's token API did not answer in time; the request was not forwarded",
	"token_refused":      "the provider refused to issue a token for this merchant (the token broker's log has its answer): the token broker's operator must check the merchant's entry in the registry, its scopes and the provider's credentials; retrying will not help until then",
	"consent_required":   "the merchant's consent at the provider is missing, expired or revoked: the merchant must consent again (token_broker_consent start URL), or an operator must load a new refresh token; the request was not forwarded",
	"client_gone":        "the request was cancelled while waiting for a token",
	"token_api_down":     "the provider's token API keeps failing, so the broker is not calling it for a while; retry after the Retry-After delay",
	"token_rate_limited": "the provider's token API asked the broker to slow down; retry after the Retry-After delay",
	"token_bad_response": "the provider's token API answered with something that is not a usable token; the request was not forwarded",
}

// providerMessages override messages for one provider type ("nuapay",
// "oauth2"), where what to check is worded differently.
var providerMessages = map[string]map[string]string{
	"nuapay": {
		"token_refused": "Nuapay refused to issue a token for this merchant (the token broker's log has Nuapay's answer): the token broker's operator must check the partner API key, and the merchant's organisation (encodedOrganisationId) and scopes in the registry; retrying will not help until then",
	},
	"oauth2": {
		"token_refused": "the authorization server refused to issue a token for this merchant (the token broker's log has its answer): the token broker's operator must check the client id and credentials (secret or signing key), the scopes and audience, and the client's registration at the provider; retrying will not help until then",
	},
}

// message returns the caller-facing message of an error code, for a
// provider type ("" when the request did not get as far as a provider).
func message(code, providerType string) string {
	if m, ok := providerMessages[providerType][code]; ok {
		return m
	}
	return messages[code]
}

// errorBody is the JSON body of a refused request.
type errorBody struct {
	Error    string `json:"error"`
	Message  string `json:"message"`
	Merchant string `json:"merchant,omitempty"`
}

// classify maps a token failure to the caller's status and error code.
func classify(err error) (int, string) {
	var ae *broker.APIError
	var re *broker.RequestError
	var ue *broker.UnavailableError
	var ce *oauth.ConsentRequiredError
	switch {
	case errors.Is(err, context.Canceled):
		return 499, "client_gone"
	case errors.As(err, &ce):
		return http.StatusBadGateway, "consent_required"
	case errors.As(err, &ue):
		return http.StatusServiceUnavailable, "token_api_down"
	case broker.IsTimeout(err):
		return http.StatusGatewayTimeout, "token_timeout"
	case errors.As(err, &re):
		return http.StatusBadGateway, "token_refused"
	case errors.As(err, &ae) && ae.StatusCode == http.StatusTooManyRequests:
		return http.StatusServiceUnavailable, "token_rate_limited"
	case errors.As(err, &ae) && ae.StatusCode >= 200 && ae.StatusCode < 300:
		return http.StatusBadGateway, "token_bad_response"
	case errors.As(err, &ae) && !ae.Temporary():
		return http.StatusBadGateway, "token_refused"
	}
	return http.StatusBadGateway, "token_unavailable"
}

// refusal is what fail answers with.
type refusal struct {
	status       int
	code         string
	merchant     string // "" before the merchant is known
	providerType string // "" before the provider is known
	cause        error  // logged, never sent to the caller
}

// fail answers a refused request. The cause is logged (it never holds a
// secret) but not sent to the caller.
func (h *Handler) fail(w http.ResponseWriter, repl *caddy.Replacer, rf refusal) error {
	repl.Set("http.token_broker.error", rf.code)
	if rf.cause != nil {
		h.logger.Warn("no token for request", zap.String("merchant", rf.merchant), zap.String("error_code", rf.code),
			zap.Int("status", rf.status), zap.Error(rf.cause))
		if ra := broker.RetryAfterOf(rf.cause); ra > 0 && rf.status == http.StatusServiceUnavailable {
			w.Header().Set("Retry-After", strconv.Itoa(int((ra+time.Second-1)/time.Second)))
		}
	}
	if rf.status == http.StatusMethodNotAllowed {
		w.Header().Set("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
	}
	msg := message(rf.code, rf.providerType)
	if h.Errors == "caddy" {
		// Only the code and the message: {http.error.message} may be shown
		// to the caller, and the cause may quote the provider (it is
		// logged above instead).
		return caddyhttp.Error(rf.status, errors.New(rf.code+": "+msg))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(rf.status)
	return json.NewEncoder(w).Encode(errorBody{Error: rf.code, Message: msg, Merchant: rf.merchant})
}
