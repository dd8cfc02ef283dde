package module

import (
	"encoding/json"
	"errors"
	"net/http"
	"strconv"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
)

// errorBody is the JSON body of a refused request.
type errorBody struct {
	Error    string `json:"error"`
	Message  string `json:"message"`
	Merchant string `json:"merchant,omitempty"`
}

// refusal is what fail answers with; its status, message and Retry-After
// come from the code (package errcode).
type refusal struct {
	code         errcode.Code
	merchant     string // "" before the merchant is known
	providerType string // "" before the provider is known
	cause        error  // logged, never sent to the caller
}

// fail answers a refused request. The cause is logged (it never holds a
// secret) but not sent to the caller.
func (h *Handler) fail(w http.ResponseWriter, repl *caddy.Replacer, rf refusal) error {
	code, status := rf.code.String(), rf.code.Status()
	repl.Set("http.token_broker.error", code)
	if rf.cause != nil {
		h.logger.Warn("no token for request", zap.String("merchant", rf.merchant), zap.String("error_code", code),
			zap.Int("status", status), zap.Error(rf.cause))
		if ra := rf.code.RetryAfter(rf.cause); ra > 0 {
			w.Header().Set("Retry-After", strconv.Itoa(int((ra+time.Second-1)/time.Second)))
		}
	}
	if rf.code == errcode.MethodRefused {
		w.Header().Set("Allow", "GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS")
	}
	msg := rf.code.Message(rf.providerType)
	if h.Errors == "caddy" {
		// Only the code and the message: {http.error.message} may be shown
		// to the caller, and the cause may quote the provider (it is
		// logged above instead).
		return caddyhttp.Error(status, errors.New(code+": "+msg))
	}
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(status)
	return json.NewEncoder(w).Encode(errorBody{Error: code, Message: msg, Merchant: rf.merchant})
}
