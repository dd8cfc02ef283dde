package config

import (
	"slices"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
)

// TestConsentRequestParams: the consent table's authorization-request
// parameters reach the flow; a malformed one is an error that names it.
func TestConsentRequestParams(t *testing.T) {
	const params = `link_ttl = "5m"
  prompt = ["login"]
  acr_values = ["urn:bank:sca"]
  claims = '''
    {"id_token": {"acr": {"essential": true}}}
  '''
  authorization_details = '[{"type": "payment_initiation", "instructedAmount": {"currency": "EUR", "amount": "1.00"}}]'
  resources = ["https://api.bank.example/"]`
	opts := Options{LookupEnv: testEnv(), RefreshStore: &oauth.MemoryStore{}, ConsentStore: &oauth.MemoryPendingStore{}}
	srv, toml := consentOP(t, strings.Replace(consentProvider, `link_ttl = "5m"`, params, 1))
	reg, err := parseWith("m.toml", []byte(toml), opts)
	if err != nil {
		t.Fatal(err)
	}
	q := authorizationRequest(t, srv, reg.Providers["bank"].Consent)
	if !slices.Contains(strings.Fields(q.Get("prompt")), "login") || q.Get("acr_values") != "urn:bank:sca" ||
		!strings.Contains(q.Get("claims"), `"essential":true`) || !strings.Contains(q.Get("authorization_details"), `"payment_initiation"`) ||
		strings.Join(q["resource"], " ") != "https://api.bank.example/" {
		t.Errorf("authorization request %v", q)
	}

	rows := []struct {
		name, new, want string
	}{
		{"prompt none", `prompt = ["none"]`, `field consent: oauth2 provider bank, consent: prompt none cannot ask for a consent`},
		{"prompt not a list", `prompt = "consent"`, `consent.prompt`},
		{"claims not JSON", `claims = "{id_token}"`, `claims must be a JSON object`},
		{"authorization_details without type", `authorization_details = '[{"actions": ["read"]}]'`, `authorization_details must be a JSON array of objects, each with a string "type"`},
		{"relative resource", `resources = ["/accounts"]`, `resource "/accounts" is not an absolute URI`},
		{"acr value with a space", `acr_values = ["a b"]`, `acr_values entry "a b"`},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			data := strings.Replace(consentProvider, `link_ttl = "5m"`, `link_ttl = "5m"`+"\n  "+tc.new, 1)
			_, err := parseWith("m.toml", []byte(data), opts)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Errorf("err = %v, want %q", err, tc.want)
			}
		})
	}
}
