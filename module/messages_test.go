package module

import (
	"strings"
	"testing"
)

// TestRefusalsSayWhatToDo: the refusals a caller cannot mend by itself
// (an unknown merchant, a provider refusing the partner's credentials)
// say who must act, on what, that the log has the precise cause, and
// that retrying does not help; the caller-side check comes first for an
// unknown merchant.
func TestRefusalsSayWhatToDo(t *testing.T) {
	for _, tt := range []struct {
		code, typ string
		want      []string
	}{
		{"unknown_merchant", "", []string{"check the merchant id the request sends", "operator must add the merchant to the registry", "reload", "retrying will not help"}},
		{"token_refused", "", []string{"log has", "operator must check", "credentials", "retrying will not help"}},
		{"token_refused", "nuapay", []string{"log has Nuapay's answer", "operator must check the partner API key", "organisation", "retrying will not help"}},
		{"token_refused", "oauth2", []string{"log has", "operator must check the client id and credentials", "retrying will not help"}},
	} {
		m := message(tt.code, tt.typ)
		for _, w := range tt.want {
			if !strings.Contains(m, w) {
				t.Errorf("%s (%q): %q does not say %q", tt.code, tt.typ, m, w)
			}
		}
	}
}
