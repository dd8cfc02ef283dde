package oauth

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestClassify: only a refused client authentication backs off the
// whole source; a merchant's refused or missing refresh token is that merchant's.
func TestClassify(t *testing.T) {
	invalidClient := &broker.APIError{Provider: ProviderName, StatusCode: 401, Code: "invalid_client"}
	invalidGrant := &broker.APIError{Provider: ProviderName, StatusCode: 400, Code: "invalid_grant"}
	for _, tc := range []struct {
		name string
		err  error
		want broker.Class
	}{
		{"invalid_client", invalidClient, broker.ClassCredential},
		{"invalid_client wrapped", fmt.Errorf("merchant %q: %w", "m", invalidClient), broker.ClassCredential},
		{"refresh token refused", &ConsentRequiredError{Provider: "bank", Merchant: "m", Err: invalidGrant}, broker.ClassPermanent},
		{"no refresh token", &ConsentRequiredError{Provider: "bank", Merchant: "m", Err: ErrNoRefreshToken}, broker.ClassPermanent},
		{"401 without invalid_client", &broker.APIError{Provider: ProviderName, StatusCode: 401, Code: "unauthorized_client"}, broker.ClassPermanent},
		{"429", &broker.APIError{Provider: ProviderName, StatusCode: 429}, broker.ClassRateLimited},
		{"store down", fmt.Errorf("loading the refresh token: %w", errors.New("connection refused")), broker.ClassTemporary},
		{"deadline", context.DeadlineExceeded, broker.ClassTemporary},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if got := (&ClientCredentials{}).Classify(tc.err); got != tc.want {
				t.Errorf("ClientCredentials: class %d, want %d", got, tc.want)
			}
			if got := (&RefreshToken{}).Classify(tc.err); got != tc.want {
				t.Errorf("RefreshToken: class %d, want %d", got, tc.want)
			}
		})
	}
}
