package integration

import (
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/json"
	"encoding/pem"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

const bankClientID = "it-bank-client"

// useOneID points the oneid example at the sandbox with secret.
func useOneID(t *testing.T, sandboxURL, secret string) string {
	t.Setenv("ONEID_API", sandboxURL)
	t.Setenv("ONEID_CLIENT_ID", oneIDID)
	t.Setenv("ONEID_CLIENT_SECRET", secret)
	return useExample(t, "oneid")
}

// TestExampleOneID: the partner's client credentials (client_secret_post)
// buy one 24 h token, used on every proxied route.
func TestExampleOneID(t *testing.T) {
	sb, url := startSandbox(t)
	base := startCaddy(t, useOneID(t, url, oneIDSecret))

	var fingerprint string
	for _, path := range []string{"/v1/organisations", "/v1/organisations/o-1/clients", "/v1/clients/c-1"} {
		e := getEcho(t, base+path)
		a := e.Authorization
		if e.Path != path || !a.Valid || a.Organisation != oneIDID || len(a.Scopes) != 0 {
			t.Errorf("%s: path %q, authorization %+v, want a valid token of %s", path, e.Path, a, oneIDID)
		}
		if fingerprint == "" {
			fingerprint = a.Fingerprint
		} else if a.Fingerprint != fingerprint {
			t.Errorf("%s: token %s, want the cached %s", path, a.Fingerprint, fingerprint)
		}
	}
	if status, _ := get(t, base+"/v1/token"); status != http.StatusNotFound {
		t.Errorf("/v1/token: %d, want 404 (the token endpoint is not proxied)", status)
	}
	if n := sb.OneIDTokenRequests(); n != 1 {
		t.Errorf("OneID token requests = %d, want 1", n)
	}
}

// TestExampleOneIDWrongSecret: OneID refuses the client; the caller gets a
// 502 token_refused that holds neither secret, and nothing is proxied.
func TestExampleOneIDWrongSecret(t *testing.T) {
	const wrong = "it-wrong-oneid-secret-55e1"
	sb, url := startSandbox(t)
	base := startCaddy(t, useOneID(t, url, wrong))

	status, body := get(t, base+"/v1/organisations")
	var b struct{ Error, Message string }
	if err := json.Unmarshal(body, &b); err != nil || status != http.StatusBadGateway || b.Error != "token_refused" {
		t.Fatalf("%d %s, want 502 token_refused", status, body)
	}
	for _, s := range []string{wrong, oneIDSecret, "client_secret"} {
		if strings.Contains(string(body), s) {
			t.Errorf("the body reveals %q: %s", s, body)
		}
	}
	if strings.Contains(string(body), `"method"`) {
		t.Errorf("the request reached the upstream: %s", body)
	}
	if sb.OneIDTokenRequests() == 0 {
		t.Error("no token request reached OneID")
	}
}

var (
	bankKeyOnce sync.Once
	bankKeyPEM  []byte // PKCS#8 private key
	bankPubPEM  []byte // PKIX public key
)

// bankKey writes the test's RSA private key to a fresh folder and returns
// its path and the public key in PEM; the key is generated once per run.
func bankKey(t *testing.T) (keyFile string, publicPEM []byte) {
	t.Helper()
	bankKeyOnce.Do(func() {
		key, err := rsa.GenerateKey(rand.Reader, 2048)
		if err != nil {
			return
		}
		der, _ := x509.MarshalPKCS8PrivateKey(key)
		pub, _ := x509.MarshalPKIXPublicKey(&key.PublicKey)
		bankKeyPEM = pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
		bankPubPEM = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pub})
	})
	if bankKeyPEM == nil {
		t.Fatal("generating the RSA key failed")
	}
	keyFile = filepath.Join(t.TempDir(), "bank-signing.key")
	if err := os.WriteFile(keyFile, bankKeyPEM, 0o600); err != nil {
		t.Fatal(err)
	}
	return keyFile, bankPubPEM
}

// useBank starts a sandbox whose bank knows bankClientID by its public key
// only (so only private_key_jwt can authenticate it) and points the
// bank-oauth2 example at it as clientID.
func useBank(t *testing.T, clientID string) (*sandbox.Server, string) {
	t.Helper()
	keyFile, pub := bankKey(t)
	sb, url := startSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: bankClientID, PublicKeyPEM: pub,
			Scopes: []string{"accounts", "payments"}})
	})
	t.Setenv("BANK_ISSUER", url)
	t.Setenv("BANK_API", url)
	t.Setenv("BANK_CLIENT_ID", clientID)
	t.Setenv("BANK_CLIENT_KEY", keyFile)
	return sb, startCaddy(t, useExample(t, "bank-oauth2"))
}

// TestExampleBankOAuth2: discovery by issuer, private_key_jwt, and a token
// per scope set: the routes ask for different scopes; the two merchants,
// served by one client registration, send identical token requests and so
// share each token.
func TestExampleBankOAuth2(t *testing.T) {
	sb, base := useBank(t, bankClientID)
	const aisp, pisp = "/open-banking/v3.1/aisp/accounts", "/open-banking/v3.1/pisp/domestic-payment-consents"
	tests := []struct {
		merchant, path string
		scopes         []string
	}{
		{"acme", aisp, []string{"accounts"}},
		{"acme", pisp, []string{"payments"}},
		{"globex", aisp, []string{"accounts"}},
		{"acme", aisp + "/a-1/balances", []string{"accounts"}},
		{"globex", pisp + "/c-1", []string{"payments"}},
	}
	tokens := map[string]string{} // scopes -> fingerprint
	for _, tt := range tests {
		e := getEcho(t, base+tt.path, "X-Merchant-Id", tt.merchant)
		a := e.Authorization
		if !a.Valid || a.Organisation != bankClientID || !slices.Equal(a.Scopes, tt.scopes) {
			t.Errorf("%s %s: %+v, want a valid %v token of %s", tt.merchant, tt.path, a, tt.scopes, bankClientID)
			continue
		}
		if e.Path != tt.path {
			t.Errorf("upstream path %q, want %q", e.Path, tt.path)
		}
		k := strings.Join(tt.scopes, " ")
		if old, ok := tokens[k]; ok && old != a.Fingerprint {
			t.Errorf("%s %s: token %s, want the cached %s", tt.merchant, tt.path, a.Fingerprint, old)
		}
		tokens[k] = a.Fingerprint
	}
	if tokens["accounts"] == tokens["payments"] {
		t.Errorf("the scope sets share a token: %v", tokens)
	}
	if status, _ := get(t, base+"/oauth2/token", "X-Merchant-Id", "acme"); status != http.StatusNotFound {
		t.Errorf("/oauth2/token: %d, want 404", status)
	}
	if n := sb.BankTokenRequests(); n != 2 {
		t.Errorf("bank token requests = %d, want 2 (accounts, payments)", n)
	}
}

// TestExampleBankOAuth2UnknownClient: the bank refuses an assertion for a
// client it does not know; the caller gets a 502 token_refused.
func TestExampleBankOAuth2UnknownClient(t *testing.T) {
	sb, base := useBank(t, "it-unregistered-client")
	status, body := get(t, base+"/open-banking/v3.1/aisp/accounts", "X-Merchant-Id", "acme")
	var b struct{ Error string }
	if err := json.Unmarshal(body, &b); err != nil || status != http.StatusBadGateway || b.Error != "token_refused" {
		t.Fatalf("%d %s, want 502 token_refused", status, body)
	}
	if strings.Contains(string(body), "PRIVATE KEY") || strings.Contains(string(body), "eyJ") {
		t.Errorf("the body reveals key material or an assertion: %s", body)
	}
	if sb.BankTokenRequests() == 0 {
		t.Error("no token request reached the bank")
	}
}
