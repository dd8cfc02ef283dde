package sandbox

import (
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/url"
	"strings"
	"testing"
)

// TestBankOfflineAccessNeedsPromptConsent: as OpenID Connect Core §11
// asks, the bank issues a refresh token for offline_access only when the
// authorization request's prompt holds consent.
func TestBankOfflineAccessNeedsPromptConsent(t *testing.T) {
	rows := []struct {
		name, prompt string
		refresh      bool
	}{
		{"no prompt", "", false},
		{"prompt login", "login", false},
		{"prompt consent", "consent", true},
		{"prompt login consent", "login consent", true},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			_, ts, _, _ := consentBank(t)
			const verifier = "a-verifier-of-at-least-forty-three-characters-0123456789"
			sum := sha256.Sum256([]byte(verifier))
			form := url.Values{"response_type": {"code"}, "client_id": {"rt-client"}, "redirect_uri": {sbCallback},
				"scope": {"openid offline_access accounts"}, "state": {"s1"}, "code_challenge": {base64.RawURLEncoding.EncodeToString(sum[:])},
				"code_challenge_method": {"S256"}, "decision": {"approve"}}
			if tc.prompt != "" {
				form.Set("prompt", tc.prompt)
			}
			resp, err := browser.PostForm(ts.URL+bankAuthorizePath, form)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			loc, _ := url.Parse(resp.Header.Get("Location"))
			code := loc.Query().Get("code")
			if code == "" {
				t.Fatalf("approve: %d %s", resp.StatusCode, loc)
			}
			grant := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {sbCallback}, "code_verifier": {verifier}}
			req, _ := http.NewRequest(http.MethodPost, ts.URL+bankTokenPath, strings.NewReader(grant.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth("rt-client", "rt-secret")
			resp, err = http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer resp.Body.Close()
			var body map[string]any
			if err := json.NewDecoder(resp.Body).Decode(&body); err != nil || resp.StatusCode != http.StatusOK {
				t.Fatalf("code exchange: %d %v", resp.StatusCode, err)
			}
			if _, got := body["refresh_token"]; got != tc.refresh {
				t.Errorf("refresh token issued: %v, want %v (scope %v)", got, tc.refresh, body["scope"])
			}
		})
	}
}
