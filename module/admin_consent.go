package module

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"

	"github.com/caddyserver/caddy/v2"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
)

// merchants serves GET /token_broker/consent/merchants.
func (adminAPI) merchants(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodGet {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use GET")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	if app.registry == nil {
		return writeJSON(w, map[string]any{"merchants": []consentweb.State{}})
	}
	out, err := consentweb.States(r.Context(), app.registry, r.URL.Query().Get("provider"))
	if err != nil {
		return caddy.APIError{HTTPStatus: http.StatusInternalServerError, Err: err}
	}
	return writeJSON(w, map[string]any{"merchants": out})
}

// links serves POST /token_broker/consent/links.
func (adminAPI) links(w http.ResponseWriter, r *http.Request) error {
	if r.Method != http.MethodPost {
		return caddy.APIError{HTTPStatus: http.StatusMethodNotAllowed, Err: errors.New("method not allowed: use POST")}
	}
	app, err := running()
	if err != nil {
		return err
	}
	var req consentweb.LinkRequest
	if err := json.NewDecoder(io.LimitReader(r.Body, 16<<10)).Decode(&req); err != nil || req.Merchant == "" {
		return caddy.APIError{HTTPStatus: http.StatusBadRequest, Err: errors.New(`the body must be {"merchant": "...", "return_url": "..."}`)}
	}
	if app.registry == nil {
		return caddy.APIError{HTTPStatus: http.StatusNotFound, Err: fmt.Errorf("merchant %q is not in the registry: the app has none", req.Merchant)}
	}
	link, status, err := consentweb.CreateLink(r.Context(), app.registry, req)
	consentweb.LogStep(app.logger, consentweb.ProviderOf(app.registry, req.Merchant), consentweb.StepLink, req.Merchant, err)
	if err != nil {
		consentweb.SetRetryAfter(w, err)
		return caddy.APIError{HTTPStatus: status, Err: err}
	}
	return writeJSON(w, link)
}
