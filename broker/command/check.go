package command

import (
	"fmt"
	"net/http"
	"net/url"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
)

// ConsentLink prints on Out a consent link for merchant (usable until a
// consent started from it completes, or it expires), made by
// the token broker at admin address addr (POST
// /token_broker/consent/links); returnURL, when set, is where the browser
// goes afterwards (it must be on the provider's return_urls). When the
// link expires goes on Err, so that Out holds the link alone. It returns
// ErrFailed, with its message on Err, when there is no link: the
// merchant's provider does not use consent, say.
func ConsentLink(std IO, request AdminRequest, addr, merchant, returnURL string, now time.Time) error {
	var link consentweb.LinkResponse
	err := askAdmin(request, addr, http.MethodPost, "/token_broker/consent/links",
		consentweb.LinkRequest{Merchant: merchant, ReturnURL: returnURL}, &link)
	if refusedWith(err, http.StatusConflict) {
		return fail(std.Err, "no consent link for %s: its provider does not use consent (only a provider with grant refresh_token and a consent table does); %v", merchant, err)
	}
	if err != nil {
		return fail(std.Err, "no consent link for %s: %v", merchant, err)
	}
	fmt.Fprintln(std.Out, link.URL)
	fmt.Fprintf(std.Err, "consent link for %s at %s: one use, expires %s\n", merchant, link.Provider, when(&link.Expires, now))
	return nil
}

// Check validates the registries of the config cfg (read from file) as
// Validate does and, when merchant is not "", asks the token broker at
// the admin address that address finds for one token request for it
// (POST /token_broker/merchants/{id}/check), and prints what the
// provider answered in words. Without a config file (file ""), only the
// merchant is checked. It returns ErrFailed when the registries have
// problems or the check fails.
func Check(std IO, request AdminRequest, cfg []byte, file string, expand func(string) string, address func() (string, error), merchant string) error {
	var invalid error
	if file != "" || merchant == "" {
		invalid = Validate(std, cfg, file, expand)
	}
	if merchant == "" {
		return invalid
	}
	addr, err := address()
	if err != nil {
		return fail(std.Err, "%s: finding the admin address: %v", merchant, err)
	}
	var res adminapi.CheckResult
	if err := askAdmin(request, addr, http.MethodPost, "/token_broker/merchants/"+url.PathEscape(merchant)+"/check", nil, &res); err != nil {
		return fail(std.Err, "%s: not checked: %v", merchant, err)
	}
	if res.OK {
		fmt.Fprintf(std.Out, "%s: OK: %s\n", merchant, res.Message)
		return invalid
	}
	return fail(std.Err, "%s: %s: %s", merchant, headline(res), res.Message)
}

// headline says in a few words what the provider did with a failed
// check's token request: "REFUSED by nuapay (HTTP 401 40100)".
func headline(res adminapi.CheckResult) string {
	if !res.Called {
		return fmt.Sprintf("NOT CALLED (%s)", res.Provider)
	}
	var h string
	switch res.Outcome {
	case errcode.TokenRefused.String():
		h = "REFUSED by " + res.Provider
	case errcode.ConsentRequired.String():
		h = "CONSENT NEEDED at " + res.Provider
	case errcode.TokenRateLimited.String():
		h = "RATE LIMITED by " + res.Provider
	case errcode.TokenTimeout.String():
		h = "NO ANSWER in time from " + res.Provider
	case errcode.TokenBadResponse.String():
		h = "UNUSABLE ANSWER from " + res.Provider
	default:
		h = "FAILED at " + res.Provider
	}
	if res.ProviderStatus > 0 {
		h += fmt.Sprintf(" (HTTP %d", res.ProviderStatus)
		if res.ProviderError != "" {
			h += " " + printable(res.ProviderError)
		}
		h += ")"
	}
	return h
}
