package consentpage

import (
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// ForOutcome returns the page of a consent outcome: "ok" or a
// *oauth.ConsentError's reason.
func ForOutcome(outcome string) string {
	switch outcome {
	case "ok":
		return PageSuccess
	case oauth.ReasonDenied:
		return PageDenied
	case oauth.ReasonExpired:
		return PageExpired
	case oauth.ReasonUnknownState, oauth.ReasonTooManyStarts:
		return PageUsed
	case oauth.ReasonProviderError:
		return PageProviderError
	case oauth.ReasonWrongBrowser:
		return PageWrongBrowser
	case oauth.ReasonProviderFailure, oauth.ReasonStoreFailure:
		return PageUnavailable
	case oauth.ReasonRetryCallback:
		return PageRetryCallback
	}
	// exchange_failed, no_refresh_token, invalid_id_token, wrong_issuer,
	// wrong_provider, wrong_callback, unknown_merchant and anything new.
	return PageFailed
}

// ForStart returns the page of a refused /start: missing when there is no
// link, invalid when it is not shaped like the links oauth.AuthCode hands
// out (oauth.WellFormed: cut short or garbled), else the page of the
// outcome.
func ForStart(link, outcome string) string {
	if link == "" {
		return PageMissing
	}
	if !oauth.WellFormed(link) {
		return PageInvalid
	}
	return ForOutcome(outcome)
}
