package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// issuer is a workload-identity issuer: it signs caller JWTs and serves
// its JWKS on 127.0.0.1.
type issuer struct {
	url    string
	signer jose.Signer
}

func newIssuer(t *testing.T) *issuer {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk := jose.JSONWebKey{Key: key.Public(), KeyID: "k1", Algorithm: "ES256", Use: "sig"}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{jwk}})
	}))
	t.Cleanup(srv.Close)
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: "k1"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return &issuer{url: srv.URL, signer: signer}
}

func (i *issuer) token(t *testing.T, iss, sub, aud string, exp time.Time) string {
	s, err := jwt.Signed(i.signer).Claims(jwt.Claims{Issuer: iss, Subject: sub, Audience: jwt.Audience{aud},
		Expiry: jwt.NewNumericDate(exp), IssuedAt: jwt.NewNumericDate(time.Now().Add(-time.Minute))}).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestCallerPolicy(t *testing.T) {
	sb, _ := startSandbox(t)
	iss := newIssuer(t)
	const issURL = "https://kubernetes.default.svc"
	cf := strings.Replace(sandboxCaddyfile(t), "\t\tconfig {$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}\n",
		"\t\tconfig {$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}\n"+
			"\t\tcallers {\n\t\t\tissuer "+issURL+"\n\t\t\taudience token-broker\n\t\t\tjwks_url "+iss.url+"\n"+
			"\t\t\tallow system:serviceaccount:payments:api acme\n\t\t\tallow system:serviceaccount:ops:admin *\n\t\t}\n", 1)
	base := startCaddy(t, cf)

	const noToken, badToken = `Bearer realm="token_broker"`, `Bearer realm="token_broker", error="invalid_token"`
	payments := iss.token(t, issURL, "system:serviceaccount:payments:api", "token-broker", time.Now().Add(time.Hour))
	admin := iss.token(t, issURL, "system:serviceaccount:ops:admin", "token-broker", time.Now().Add(time.Hour))
	tests := []struct {
		name       string
		jwt        string
		merchant   string
		wantStatus int
		wantError  string
		// wantChallenge is the WWW-Authenticate answer (RFC 6750 §3.1):
		// no error code without a token, invalid_token for a bad one.
		wantChallenge string
	}{
		{"allowed merchant", payments, "acme", 200, "", ""},
		{"other merchant", payments, "globex", 403, "caller_forbidden", ""},
		{"wildcard", admin, "globex", 200, "", ""},
		{"no JWT", "", "acme", 401, "caller_unauthenticated", noToken},
		{"expired", iss.token(t, issURL, "system:serviceaccount:payments:api", "token-broker", time.Now().Add(-time.Minute)), "acme", 401, "caller_unauthenticated", badToken},
		{"wrong audience", iss.token(t, issURL, "system:serviceaccount:payments:api", "someone-else", time.Now().Add(time.Hour)), "acme", 401, "caller_unauthenticated", badToken},
		{"wrong issuer", iss.token(t, "https://evil", "system:serviceaccount:payments:api", "token-broker", time.Now().Add(time.Hour)), "acme", 401, "caller_unauthenticated", badToken},
		{"garbage", "not.a.jwt", "acme", 401, "caller_unauthenticated", badToken},
		{"unknown subject", iss.token(t, issURL, "system:serviceaccount:x:y", "token-broker", time.Now().Add(time.Hour)), "acme", 403, "caller_forbidden", ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := sb.TokenRequests()
			headers := []string{"X-Merchant-Id", tt.merchant}
			if tt.jwt != "" {
				headers = append(headers, "Authorization", "Bearer "+tt.jwt)
			}
			status, hdr, body := getWithHeader(t, base+"/tpp/payments", headers...)
			if status != tt.wantStatus || (tt.wantError != "" && !strings.Contains(string(body), `"`+tt.wantError+`"`)) {
				t.Fatalf("got %d %s, want %d %s", status, body, tt.wantStatus, tt.wantError)
			}
			if got := hdr.Get("WWW-Authenticate"); got != tt.wantChallenge {
				t.Fatalf("WWW-Authenticate %q, want %q", got, tt.wantChallenge)
			}
			if tt.wantStatus == 200 {
				var e echo
				json.Unmarshal(body, &e)
				if !e.Authorization.Valid {
					t.Fatalf("upstream did not get the merchant token: %s", body)
				}
				if strings.Contains(string(body), tt.jwt[:20]) {
					t.Fatal("the caller's JWT reached the upstream")
				}
			} else if sb.TokenRequests() != before {
				t.Fatal("a refused caller caused a token request")
			}
		})
	}
}

// getWithHeader sends a GET with headers (name, value pairs) and returns
// status, response header and body.
func getWithHeader(t testing.TB, url string, headers ...string) (int, http.Header, []byte) {
	t.Helper()
	req, err := http.NewRequest("GET", url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Add(headers[i], headers[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, resp.Header, body
}
