package consentweb

import (
	"fmt"
	"net/http"

	"go.uber.org/zap"

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

// admits answers a request that the site does not take, or whose caller
// the policy does not authenticate, before its body is read, and returns
// the caller's subject ("" without a policy) and whether it admitted the
// request.
func (g CallerGate) admits(w http.ResponseWriter, r *http.Request, logger *zap.Logger) (string, bool) {
	if code, err := g.Hosts.Check(r); code != 0 {
		logger.Warn("consent link refused", zap.String("error_code", code.String()), zap.Error(err))
		linkError(w, code.Status(), code.String(), code.Message(""))
		return "", false
	}
	sub, cerr := g.Policy.Authenticate(r)
	if cerr != nil {
		cerr.SetChallenge(w.Header())
		linkError(w, cerr.Code.Status(), cerr.Code.String(), "the caller must present a valid JWT from the trusted issuer as a Bearer token")
		return "", false
	}
	return sub, true
}

// allows answers a request whose authenticated caller may not ask links
// for merchant, and reports whether it admitted it.
func (g CallerGate) allows(w http.ResponseWriter, caller, merchant string) bool {
	if g.Policy.Allows(caller, merchant) {
		return true
	}
	linkError(w, http.StatusForbidden, "merchant_not_allowed", fmt.Sprintf("caller %q may not act for merchant %q", caller, merchant))
	return false
}
