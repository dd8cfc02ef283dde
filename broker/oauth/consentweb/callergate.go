package consentweb

import (
	"fmt"
	"net/http"

	"github.com/tokenbroker/caddy-token-broker/broker/callers"
)

// CallerGate admits the requests of the links API with a site check and
// a caller policy, as the token_broker handler does. It is safe for
// concurrent use.
type CallerGate struct {
	// Hosts checks the request's Host and origin.
	Hosts callers.Site
	// Policy authenticates the caller and says which merchants it may
	// act for; nil admits every caller for every merchant.
	Policy *callers.Policy
}

// Site refuses a request that the site does not take, before its body
// is read; nil admits it.
func (g CallerGate) Site(r *http.Request) *Refusal {
	code, err := g.Hosts.Check(r)
	if code == 0 {
		return nil
	}
	return &Refusal{Status: code.Status(), Code: code.String(), Message: code.Message(""), Err: err}
}

// Caller refuses a request whose caller may not ask links for merchant;
// nil admits it.
func (g CallerGate) Caller(r *http.Request, merchant string) *Refusal {
	if g.Policy == nil {
		return nil
	}
	sub, cerr := g.Policy.Authenticate(r)
	if cerr != nil {
		return &Refusal{Status: cerr.Code.Status(), Code: cerr.Code.String(), Challenge: cerr.Challenge(),
			Message: "the caller must present a valid JWT from the trusted issuer as a Bearer token"}
	}
	if !g.Policy.Allows(sub, merchant) {
		return &Refusal{Status: http.StatusForbidden, Code: "merchant_not_allowed",
			Message: fmt.Sprintf("caller %q may not act for merchant %q", sub, merchant)}
	}
	return nil
}
