package module

import (
	"net/http"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/modules/caddyhttp"

	"github.com/tokenbroker/caddy-token-broker/broker/admission"
)

// fail answers a refused request: it sets {http.token_broker.error}, logs
// the cause (never sent to the caller) and answers with the JSON body
// (admission.Refusal), or returns a caddyhttp.Error with `errors caddy`.
func (h *Handler) fail(w http.ResponseWriter, repl *caddy.Replacer, rf admission.Refusal) error {
	repl.Set("http.token_broker.error", rf.Code.String())
	rf.Prepare(w.Header(), h.logger, h.refusals)
	if h.Errors == "caddy" {
		return caddyhttp.Error(rf.Code.Status(), rf.Public()) // {http.error.message} may be shown to the caller
	}
	return rf.Write(w)
}
