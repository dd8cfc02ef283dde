package integration

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"encoding/pem"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
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
	// jwks is the key set it serves; fetches counts requests to it.
	jwks    []byte
	fetches atomic.Int64
	// caFile is a PEM file trusting its certificate (TLS issuers only).
	caFile string
}

func newIssuer(t *testing.T) *issuer { return startIssuer(t, false) }

// startIssuer starts an issuer, over HTTPS with a self-signed certificate
// (its own CA, not in the system roots) when withTLS is set.
func startIssuer(t *testing.T, withTLS bool) *issuer {
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	jwk := jose.JSONWebKey{Key: key.Public(), KeyID: "k1", Algorithm: "ES256", Use: "sig"}
	jwks, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{jwk}})
	if err != nil {
		t.Fatal(err)
	}
	iss := &issuer{jwks: jwks}
	srv := httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		iss.fetches.Add(1)
		w.Write(jwks)
	}))
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // handshakes refused by untrusting clients
	if withTLS {
		srv.StartTLS()
		iss.caFile = filepath.Join(t.TempDir(), "issuer-ca.pem")
		pemBytes := pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: srv.Certificate().Raw})
		if err := os.WriteFile(iss.caFile, pemBytes, 0o600); err != nil {
			t.Fatal(err)
		}
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	iss.url = srv.URL
	iss.signer, err = jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: "k1"}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	return iss
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

// TestCallerPolicyKeySources loads the callers block through Caddy with
// each way of getting the issuer's keys: ca_file trusts an issuer behind
// TLS with a CA of its own (without it the keys are unavailable), and
// jwks_file needs no request to the issuer at all.
func TestCallerPolicyKeySources(t *testing.T) {
	startSandbox(t)
	const issURL = "https://kubernetes.default.svc"
	tlsIss := startIssuer(t, true)
	fileIss := newIssuer(t)
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(jwksFile, fileIss.jwks, 0o600); err != nil {
		t.Fatal(err)
	}
	tests := []struct {
		name       string
		iss        *issuer
		keys       string // the callers lines that give the keys
		wantStatus int
		wantFetch  bool
	}{
		{"ca_file", tlsIss, "jwks_url " + tlsIss.url + "\n\t\t\tca_file " + tlsIss.caFile, 200, true},
		{"system roots", tlsIss, "jwks_url " + tlsIss.url, 503, false},
		{"jwks_file", fileIss, "jwks_file " + jwksFile, 200, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cf := strings.Replace(sandboxCaddyfile(t), "\t\tconfig {$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}\n",
				"\t\tconfig {$TOKEN_BROKER_CONFIG:examples/sandbox/merchants.toml}\n"+
					"\t\tcallers {\n\t\t\tissuer "+issURL+"\n\t\t\taudience token-broker\n\t\t\t"+tt.keys+"\n"+
					"\t\t\tallow system:serviceaccount:payments:api acme\n\t\t}\n", 1)
			base := startCaddy(t, cf)
			before := tt.iss.fetches.Load()
			tok := tt.iss.token(t, issURL, "system:serviceaccount:payments:api", "token-broker", time.Now().Add(time.Hour))
			status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "acme", "Authorization", "Bearer "+tok)
			if status != tt.wantStatus {
				t.Fatalf("got %d %s, want %d", status, body, tt.wantStatus)
			}
			if fetched := tt.iss.fetches.Load() > before; fetched != tt.wantFetch {
				t.Fatalf("key set fetched: %v, want %v", fetched, tt.wantFetch)
			}
		})
	}
}
