package adminapi

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/broker/telemetry"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// CheckResult is the answer of POST /token_broker/merchants/{id}/check:
// what the provider answered one token request for the merchant. Never
// the token: its fingerprint.
type CheckResult struct {
	// Merchant is the merchant checked.
	Merchant string `json:"merchant"`
	// Provider is its provider's name in the registry.
	Provider string `json:"provider"`
	// ProviderType is the provider's token API type ("nuapay", "oauth2").
	ProviderType string `json:"provider_type"`
	// OK is true when the provider issued a token.
	OK bool `json:"ok"`
	// Outcome is "ok" (telemetry.OutcomeOK), or the error code a request
	// would get (errcode: token_refused, consent_required, token_api_down,
	// ...).
	Outcome string `json:"outcome"`
	// Message says in words what happened and what to do.
	Message string `json:"message"`
	// ProviderStatus is the HTTP status of the provider's answer, 0 when
	// there was none (not called, network failure).
	ProviderStatus int `json:"provider_status"`
	// ProviderError is the provider's error code (Nuapay's returnCode,
	// OAuth's "error"), if any; never its whole answer.
	ProviderError string `json:"provider_error,omitempty"`
	// Fingerprint is the first 8 hex digits of the new token's SHA-256,
	// only when OK.
	Fingerprint string `json:"fingerprint,omitempty"`
	// ExpiresInSeconds is the new token's remaining lifetime, only when
	// OK.
	ExpiresInSeconds int64 `json:"expires_in_seconds,omitempty"`
	// Called is false when the failure policy refused the request
	// without calling the token API (a backoff, an open breaker).
	Called bool `json:"called"`
	// NotCalledUntil is until when the token API is not called for the
	// merchant, when Called is false.
	NotCalledUntil *time.Time `json:"not_called_until,omitempty"`
}

// Check performs one token request for a merchant of reg through br
// (broker.Broker.Check: the failure policy applies, the token is cached)
// and says what the provider answered. b is the merchant's binding as its
// requests use it (with their observer), nil to use one with the
// merchant's own scopes, observed by observer (nil: not observed); allow,
// when not nil, is asked about a wildcard merchant's organisation (the
// organisations list). now is the wall clock. A merchant that cannot be
// checked is an *Error.
func Check(ctx context.Context, reg *config.Registry, br *broker.Broker, b *broker.Binding, observer broker.Observer, allow func(organisation string) error, merchant string, now time.Time) (CheckResult, error) {
	if reg == nil {
		return CheckResult{}, &Error{Status: http.StatusNotFound, Err: errors.New("no merchant registry is loaded")}
	}
	m, wild, ok := reg.Merchant(merchant)
	if !ok {
		return CheckResult{}, &Error{Status: http.StatusNotFound, Err: fmt.Errorf("merchant %q is not in the registry %s (and it has no wildcard entry)", merchant, reg.Path)}
	}
	p := reg.Providers[m.Provider]
	if b == nil {
		var err error
		if b, err = reg.MerchantBinding(m, nil); err != nil {
			return CheckResult{}, &Error{Status: http.StatusConflict, Err: fmt.Errorf("merchant %q: %w", merchant, err)}
		}
		b.Observer = observer
	}
	if wild && allow != nil {
		if err := allow(b.Organisation); err != nil {
			return CheckResult{}, &Error{Status: http.StatusForbidden, Err: fmt.Errorf("merchant %q: %w", merchant, err)}
		}
	}
	res := CheckResult{Merchant: merchant, Provider: m.Provider, ProviderType: p.Type}
	checked, err := br.Check(ctx, b)
	res.Called = checked.Calls > 0 || (checked.Joined && broker.Called(err))
	if err == nil {
		tok := checked.Entry.Token()
		res.OK, res.Outcome, res.Called = true, telemetry.OutcomeOK, true
		res.Fingerprint = checked.Entry.Fingerprint()
		res.ExpiresInSeconds = int64(tok.Expiry.Sub(now) / time.Second)
		res.Message = fmt.Sprintf("%s issued a token (fingerprint %s, expires in %s); it is cached and served to the merchant's requests",
			m.Provider, res.Fingerprint, time.Duration(res.ExpiresInSeconds)*time.Second)
		return res, nil
	}
	code := errcode.Classify(err)
	res.Outcome = code.String()
	if ae, ok := errors.AsType[*broker.APIError](err); ok {
		res.ProviderStatus, res.ProviderError = ae.StatusCode, ae.Code
	}
	advice := failureAdvice(reg, m, wild, p, b, err, code)
	if res.Called {
		res.Message = advice
		return res, nil
	}
	// Refused by the failure policy: the remembered failure (or the one
	// that opened the breaker) is why.
	until := now.Add(broker.RetryAfterOf(err))
	res.NotCalledUntil = opstate.TimePtr(until)
	why := "the merchant's last token request failed"
	var ue *broker.UnavailableError
	switch srcUntil := br.SourceHealth(b.SourceID).BackoffUntil; {
	case errors.As(err, &ue):
		why = "its token API keeps failing (circuit breaker open)"
	case !srcUntil.IsZero():
		why = "it is not called for any merchant (its credentials were refused, or it asked to slow down)"
	}
	last := ""
	if res.ProviderStatus > 0 {
		last = fmt.Sprintf(" (HTTP %d %s)", res.ProviderStatus, res.ProviderError)
	}
	res.Message = fmt.Sprintf("the broker does not call %s for this merchant before %s (in %s): %s; its last answer%s: %s",
		m.Provider, until.UTC().Format(time.RFC3339), until.Sub(now).Round(time.Second), why, last, advice)
	return res, nil
}

// failureAdvice says what a failed token request means and what to do,
// naming the registry entry at fault where one is.
func failureAdvice(reg *config.Registry, m *config.Merchant, wild bool, p *config.Provider, b *broker.Binding, err error, code errcode.Code) string {
	switch {
	case code == errcode.TokenRefused && broker.ClassOf(b.Source, err) == broker.ClassCredential:
		fields := "client_id and client_secret (or private_key)"
		if p.Type == "nuapay" {
			fields = "api_key"
		}
		return fmt.Sprintf("the provider refused the credentials; check %s of [providers.%s] in %s", fields, p.Name, where(reg, p.Line))
	case errors.Is(err, broker.ErrUnknownOrganisation) && wild:
		return fmt.Sprintf("the provider does not know organisation %q (the merchant id, served by the wildcard entry); check the id, or the partner's organisations", b.Organisation)
	case errors.Is(err, broker.ErrUnknownOrganisation):
		return fmt.Sprintf("the provider does not know organisation %q; check organisation of [merchants.%s] in %s", b.Organisation, m.ID, where(reg, m.Line))
	case code == errcode.ConsentRequired:
		return code.Message(p.Type) + fmt.Sprintf(" (`caddy token-broker consent-link %s` prints a link)", b.Merchant)
	}
	return code.Message(p.Type)
}

// where names a line of reg: file:line when reg is one file, else the
// registry's path.
func where(reg *config.Registry, line int) string {
	if len(reg.Files) == 1 && line > 0 {
		return fmt.Sprintf("%s:%d", reg.Files[0], line)
	}
	if len(reg.Files) == 1 {
		return reg.Files[0]
	}
	return "the registry " + reg.Path
}
