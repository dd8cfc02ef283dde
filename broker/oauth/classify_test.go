package oauth

import (
	"context"
	"errors"
	"fmt"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestClassify: only a refusal of the client (its authentication, or
// its registration for the grant) backs off the whole source, whatever
// status and code the server spells it with; a merchant's refused or
// missing refresh token is that merchant's.
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
		{"Keycloak's wrong secret: 401 unauthorized_client", &broker.APIError{Provider: ProviderName, StatusCode: 401, Code: "unauthorized_client",
			Description: "Invalid client or Invalid client credentials"}, broker.ClassCredential},
		{"400 unauthorized_client: grant not allowed", &broker.APIError{Provider: ProviderName, StatusCode: 400, Code: "unauthorized_client"}, broker.ClassCredential},
		{"400 invalid_client", &broker.APIError{Provider: ProviderName, StatusCode: 400, Code: "invalid_client"}, broker.ClassCredential},
		{"401 without a code (HTML or empty body)", &broker.APIError{Provider: ProviderName, StatusCode: 401, Description: "Unauthorized"}, broker.ClassCredential},
		{"403 without a code", &broker.APIError{Provider: ProviderName, StatusCode: 403, Description: "Forbidden"}, broker.ClassPermanent},
		{"invalid_scope", &broker.APIError{Provider: ProviderName, StatusCode: 400, Code: "invalid_scope"}, broker.ClassPermanent},
		{"invalid_grant outside a refresh", invalidGrant, broker.ClassPermanent},
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
