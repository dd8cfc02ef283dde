package sandbox

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"fmt"
	"math/big"
	"net/http"
	"net/http/httptest"
	"net/url"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

var (
	keysOnce          sync.Once
	rsaKey, rsaOther  *rsa.PrivateKey
	ecKey             *ecdsa.PrivateKey
	rsaPEM, ecCertPEM []byte
)

// testKeys generates the clients' keys once per test binary.
func testKeys(t *testing.T) {
	t.Helper()
	keysOnce.Do(func() {
		rsaKey, _ = rsa.GenerateKey(rand.Reader, 2048)
		rsaOther, _ = rsa.GenerateKey(rand.Reader, 2048)
		ecKey, _ = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		der, _ := x509.MarshalPKIXPublicKey(&rsaKey.PublicKey)
		rsaPEM = pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der})
		tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "ec-client"},
			NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
		cert, _ := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &ecKey.PublicKey, ecKey)
		ecCertPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: cert})
	})
	if rsaKey == nil || ecKey == nil || ecCertPEM == nil {
		t.Fatal("generating keys failed")
	}
}

func newBank(t *testing.T, issuer string) (*Server, *httptest.Server, *clock) {
	t.Helper()
	testKeys(t)
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	s := New(Config{
		OneIDClients: map[string]string{"oneid": "x"},
		BankClients: []BankClient{
			{ID: "sec", Secret: "s3cret"},
			{ID: "we ird", Secret: "s&c=t:%"},
			{ID: "rsa", PublicKeyPEM: rsaPEM, Scopes: []string{"accounts", "payments"}},
			{ID: "ec", PublicKeyPEM: ecCertPEM, Secret: "ec-secret"},
			{ID: "oneid", Secret: "bank-side"},
		},
		BankIssuer:        issuer,
		BankTokenLifetime: 15 * time.Minute,
		Now:               clk.Now,
	})
	return s, serve(t, s), clk
}

// assertion signs claims with key.
func assertion(t *testing.T, key crypto.Signer, alg jose.SignatureAlgorithm, claims map[string]any) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: alg, Key: key}, (&jose.SignerOptions{}).WithType("JWT"))
	if err != nil {
		t.Fatal(err)
	}
	s, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

// claimsFor are valid assertion claims of client for the token endpoint.
func claimsFor(srv *httptest.Server, clk *clock, client string) map[string]any {
	now := clk.Now()
	return map[string]any{"iss": client, "sub": client, "aud": srv.URL + "/oauth2/token",
		"jti": rand.Text(), "iat": now.Unix(), "exp": now.Add(time.Minute).Unix()}
}

func with(m map[string]any, kv ...any) map[string]any {
	c := map[string]any{}
	for k, v := range m {
		c[k] = v
	}
	for i := 0; i+1 < len(kv); i += 2 {
		if kv[i+1] == nil {
			delete(c, kv[i].(string))
		} else {
			c[kv[i].(string)] = kv[i+1]
		}
	}
	return c
}

func formHdr() map[string]string {
	return map[string]string{"Content-Type": "application/x-www-form-urlencoded"}
}

func basicHdr(id, secret string) map[string]string {
	h := formHdr()
	h["Authorization"] = "Basic " + base64.StdEncoding.EncodeToString([]byte(url.QueryEscape(id)+":"+url.QueryEscape(secret)))
	return h
}

func jwtForm(a string, extra ...string) string {
	v := url.Values{"grant_type": {"client_credentials"}, "client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"},
		"client_assertion": {a}}
	for i := 0; i+1 < len(extra); i += 2 {
		v.Set(extra[i], extra[i+1])
	}
	return v.Encode()
}

func TestBankDiscovery(t *testing.T) {
	for _, configured := range []string{"", "https://bank.example/"} {
		t.Run("issuer="+configured, func(t *testing.T) {
			_, srv, _ := newBank(t, configured)
			r := do(t, srv, "GET", "/.well-known/openid-configuration", nil, "")
			iss := strings.TrimSuffix(configured, "/")
			if iss == "" {
				iss = srv.URL
			}
			want := map[string]any{"issuer": iss, "token_endpoint": iss + "/oauth2/token",
				"revocation_endpoint": iss + "/oauth2/revoke", "jwks_uri": iss + "/oauth2/jwks"}
			for k, v := range want {
				if r.body[k] != v {
					t.Errorf("%s = %v, want %v", k, r.body[k], v)
				}
			}
			for k, v := range map[string]string{
				"token_endpoint_auth_methods_supported": "[client_secret_basic client_secret_post private_key_jwt]",
				"grant_types_supported":                 "[client_credentials refresh_token authorization_code]",
				"scopes_supported":                      "[accounts payments]",
				"dpop_signing_alg_values_supported":     "[ES256 PS256 RS256 EdDSA]",
			} {
				if got := fmt.Sprint(r.body[k]); got != v {
					t.Errorf("%s = %s, want %s", k, got, v)
				}
			}
		})
	}
	_, srv, _ := newBank(t, "")
	r := do(t, srv, "GET", "/oauth2/jwks", nil, "")
	var set jose.JSONWebKeySet
	if err := json.Unmarshal([]byte(r.raw), &set); err != nil || len(set.Keys) != 1 || !set.Keys[0].Valid() || !set.Keys[0].IsPublic() {
		t.Fatalf("jwks %s: %v", r.raw, err)
	}
	if r := do(t, srv, "POST", "/.well-known/openid-configuration", nil, ""); r.status != 405 {
		t.Errorf("POST discovery: %d", r.status)
	}
}

func TestBankClientAuthentication(t *testing.T) {
	s, srv, clk := newBank(t, "")
	cc := "grant_type=client_credentials&scope=accounts"
	ok := claimsFor(srv, clk, "rsa")
	now := clk.Now()
	for _, tc := range []struct {
		name    string
		hdr     map[string]string
		body    string
		want    int
		err     string
		client  string
		wwwAuth bool
	}{
		{"basic", basicHdr("sec", "s3cret"), cc, 200, "", "sec", false},
		{"basic form-url-encoded", basicHdr("we ird", "s&c=t:%"), cc, 200, "", "we ird", false},
		{"basic with matching client_id", basicHdr("sec", "s3cret"), cc + "&client_id=sec", 200, "", "sec", false},
		{"basic with other client_id", basicHdr("sec", "s3cret"), cc + "&client_id=ec", 400, "invalid_request", "", false},
		{"basic wrong secret", basicHdr("sec", "nope"), cc, 401, "invalid_client", "", true},
		{"basic unknown client", basicHdr("who", "s3cret"), cc, 401, "invalid_client", "", true},
		{"basic client without secret", basicHdr("rsa", ""), cc, 401, "invalid_client", "", true},
		{"post", formHdr(), cc + "&client_id=sec&client_secret=s3cret", 200, "", "sec", false},
		{"post wrong secret", formHdr(), cc + "&client_id=sec&client_secret=s3cre", 401, "invalid_client", "", false},
		{"post empty secret", formHdr(), cc + "&client_id=rsa&client_secret=", 401, "invalid_client", "", false},
		{"no authentication", formHdr(), cc + "&client_id=sec", 401, "invalid_client", "", false},
		{"bearer", map[string]string{"Content-Type": "application/x-www-form-urlencoded", "Authorization": "Bearer x"}, cc, 401, "invalid_client", "", false},
		{"two methods", basicHdr("sec", "s3cret"), cc + "&client_id=sec&client_secret=s3cret", 400, "invalid_request", "", false},
		{"PS256", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, ok), "scope", "payments"), 200, "", "rsa", false},
		{"RS256", formHdr(), jwtForm(assertion(t, rsaKey, jose.RS256, with(ok, "jti", "j-rs"))), 200, "", "rsa", false},
		{"ES256 from certificate", formHdr(), jwtForm(assertion(t, ecKey, jose.ES256, claimsFor(srv, clk, "ec"))), 200, "", "ec", false},
		{"aud is the issuer", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j-iss", "aud", srv.URL))), 200, "", "rsa", false},
		{"aud list", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j-list", "aud", []string{"x", srv.URL + "/oauth2/token"}))), 200, "", "rsa", false},
		{"with client_id", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j-cid")), "client_id", "rsa"), 200, "", "rsa", false},
		{"other client_id", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j-cid2")), "client_id", "ec"), 400, "invalid_request", "", false},
		{"wrong aud", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j1", "aud", "https://elsewhere/oauth2/token"))), 401, "invalid_client", "", false},
		{"expired", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j2", "exp", now.Add(-time.Second).Unix()))), 401, "invalid_client", "", false},
		{"no exp", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j3", "exp", nil))), 401, "invalid_client", "", false},
		{"exp too far", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j4", "exp", now.Add(2*time.Hour).Unix()))), 401, "invalid_client", "", false},
		{"iat in the future", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j5", "iat", now.Add(10*time.Minute).Unix()))), 401, "invalid_client", "", false},
		{"no jti", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", nil))), 401, "invalid_client", "", false},
		{"iss is not sub", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j6", "iss", "ec"))), 401, "invalid_client", "", false},
		{"other key", formHdr(), jwtForm(assertion(t, rsaOther, jose.PS256, with(ok, "jti", "j7"))), 401, "invalid_client", "", false},
		{"HS256", formHdr(), jwtForm(hs256(t, with(ok, "jti", "j8"))), 401, "invalid_client", "", false},
		{"client without key", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, claimsFor(srv, clk, "sec"))), 401, "invalid_client", "", false},
		{"unknown subject", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, claimsFor(srv, clk, "who"))), 401, "invalid_client", "", false},
		{"wrong assertion type", formHdr(), strings.Replace(jwtForm(assertion(t, rsaKey, jose.PS256, with(ok, "jti", "j9"))), "jwt-bearer", "saml2-bearer", 1), 401, "invalid_client", "", false},
		{"not a JWS", formHdr(), jwtForm("a.b.c"), 401, "invalid_client", "", false},
		{"replayed jti", formHdr(), jwtForm(assertion(t, rsaKey, jose.PS256, ok)), 401, "invalid_client", "", false},
		{"repeated parameter", formHdr(), cc + "&client_id=sec&client_secret=s3cret&scope=payments", 400, "invalid_request", "", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, srv, "POST", "/oauth2/token", tc.hdr, tc.body)
			if r.status != tc.want || (tc.err != "" && r.body["error"] != tc.err) {
				t.Fatalf("%d %s, want %d %s", r.status, r.raw, tc.want, tc.err)
			}
			if got := r.header.Get("WWW-Authenticate") != ""; got != tc.wwwAuth {
				t.Errorf("WWW-Authenticate %q", r.header.Get("WWW-Authenticate"))
			}
			if r.header.Get("Cache-Control") != "no-store" {
				t.Errorf("Cache-Control %q", r.header.Get("Cache-Control"))
			}
			if tc.want != 200 {
				if r.body["error_description"] == "" || r.body["access_token"] != nil {
					t.Errorf("error body %s", r.raw)
				}
				return
			}
			tok, _ := r.body["access_token"].(string)
			if org, _, valid := s.Issued(tok); org != tc.client || !valid {
				t.Errorf("Issued = %q %v, want %q", org, valid, tc.client)
			}
		})
	}
	if got := s.BankTokenRequests(); got != 35 {
		t.Errorf("BankTokenRequests = %d", got)
	}
}

// revokeJWT is a revocation body authenticated by private_key_jwt.
func revokeJWT(a string) string {
	return url.Values{"token": {"nope"}, "client_assertion": {a},
		"client_assertion_type": {"urn:ietf:params:oauth:client-assertion-type:jwt-bearer"}}.Encode()
}

// hs256 signs claims with a shared key, an algorithm the server refuses.
func hs256(t *testing.T, claims map[string]any) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.HS256, Key: []byte("0123456789abcdef0123456789abcdef")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	s, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func TestBankClientCredentials(t *testing.T) {
	s, srv, clk := newBank(t, "")
	for _, tc := range []struct {
		name, body string
		want       int
		err        string
		scopes     []string
	}{
		{"scopes echoed", "grant_type=client_credentials&scope=payments+accounts", 200, "", []string{"payments", "accounts"}},
		{"no scope", "grant_type=client_credentials", 200, "", nil},
		{"scope not allowed", "grant_type=client_credentials&scope=accounts+admin", 400, "invalid_scope", nil},
		{"password grant", "grant_type=password&username=a&password=b", 400, "unsupported_grant_type", nil},
		{"no grant", "scope=accounts", 400, "invalid_request", nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			form, _ := url.ParseQuery(tc.body)
			form.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
			form.Set("client_assertion", assertion(t, rsaKey, jose.PS256, claimsFor(srv, clk, "rsa")))
			r := do(t, srv, "POST", "/oauth2/token", formHdr(), form.Encode())
			if r.status != tc.want || (tc.err != "" && r.body["error"] != tc.err) {
				t.Fatalf("%d %s, want %d %s", r.status, r.raw, tc.want, tc.err)
			}
			if tc.want != 200 {
				return
			}
			if r.body["token_type"] != "Bearer" || r.body["expires_in"] != float64(900) || r.body["refresh_token"] != nil {
				t.Errorf("body %s", r.raw)
			}
			if sc, _ := r.body["scope"].(string); sc != strings.Join(tc.scopes, " ") {
				t.Errorf("scope %q, want %q", sc, tc.scopes)
			}
			tok := r.body["access_token"].(string)
			org, scopes, valid := s.Issued(tok)
			if org != "rsa" || !slices.Equal(scopes, tc.scopes) || !valid {
				t.Errorf("Issued = %q %v %v", org, scopes, valid)
			}
			claims := verifyAccessToken(t, srv, tok)
			if claims["iss"] != srv.URL || claims["sub"] != "rsa" || claims["exp"] != float64(clk.Now().Add(15*time.Minute).Unix()) {
				t.Errorf("claims %v", claims)
			}
		})
	}
	tok := do(t, srv, "POST", "/oauth2/token", basicHdr("sec", "s3cret"), "grant_type=client_credentials").body["access_token"].(string)
	clk.Advance(15*time.Minute - time.Second)
	if _, _, valid := s.Issued(tok); !valid {
		t.Error("invalid before expiry")
	}
	clk.Advance(time.Second)
	if _, _, valid := s.Issued(tok); valid {
		t.Error("valid after expiry")
	}
	if r := do(t, srv, "GET", "/oauth2/token", nil, ""); r.status != 405 || r.body["error"] != "invalid_request" {
		t.Errorf("GET: %d %s", r.status, r.raw)
	}
}

// verifyAccessToken checks the token's signature with the published JWKS
// and returns its claims.
func verifyAccessToken(t *testing.T, srv *httptest.Server, tok string) map[string]any {
	t.Helper()
	var set jose.JSONWebKeySet
	if err := json.Unmarshal([]byte(do(t, srv, "GET", "/oauth2/jwks", nil, "").raw), &set); err != nil {
		t.Fatal(err)
	}
	parsed, err := jwt.ParseSigned(tok, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		t.Fatal(err)
	}
	var claims map[string]any
	if err := parsed.Claims(set.Keys[0].Key, &claims); err != nil {
		t.Fatalf("access token does not verify with the JWKS: %v", err)
	}
	return claims
}

func TestBankRefreshRotation(t *testing.T) {
	s, srv, _ := newBank(t, "")
	auth := basicHdr("sec", "s3cret")
	refresh := func(rt, extra string) resp {
		return do(t, srv, "POST", "/oauth2/token", auth, "grant_type=refresh_token&refresh_token="+url.QueryEscape(rt)+extra)
	}
	rt0 := s.IssueRefreshToken("sec", []string{"accounts", "payments"})
	if !s.RefreshTokenValid(rt0) {
		t.Fatal("minted refresh token is not valid")
	}
	r := refresh(rt0, "")
	rt1, _ := r.body["refresh_token"].(string)
	if r.status != 200 || rt1 == "" || rt1 == rt0 || r.body["scope"] != "accounts payments" || r.body["expires_in"] != float64(900) {
		t.Fatalf("first refresh: %d %s", r.status, r.raw)
	}
	if org, scopes, valid := s.Issued(r.body["access_token"].(string)); org != "sec" || len(scopes) != 2 || !valid {
		t.Errorf("Issued = %q %v %v", org, scopes, valid)
	}
	if s.RefreshTokenValid(rt0) || !s.RefreshTokenValid(rt1) {
		t.Error("rotation did not retire the old refresh token")
	}
	for _, tc := range []struct {
		name string
		hdr  map[string]string
		body string
		want int
		err  string
	}{
		{"old token after rotation", auth, "grant_type=refresh_token&refresh_token=" + url.QueryEscape(rt0), 400, "invalid_grant"},
		{"unknown token", auth, "grant_type=refresh_token&refresh_token=nope", 400, "invalid_grant"},
		{"other client", basicHdr("ec", "ec-secret"), "grant_type=refresh_token&refresh_token=" + url.QueryEscape(rt1), 400, "invalid_grant"},
		{"wider scope", auth, "grant_type=refresh_token&scope=admin&refresh_token=" + url.QueryEscape(rt1), 400, "invalid_scope"},
		{"missing token", auth, "grant_type=refresh_token", 400, "invalid_request"},
		{"unauthenticated", formHdr(), "grant_type=refresh_token&client_id=sec&refresh_token=" + url.QueryEscape(rt1), 401, "invalid_client"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := do(t, srv, "POST", "/oauth2/token", tc.hdr, tc.body)
			if r.status != tc.want || r.body["error"] != tc.err {
				t.Fatalf("%d %s, want %d %s", r.status, r.raw, tc.want, tc.err)
			}
		})
	}
	if !s.RefreshTokenValid(rt1) {
		t.Fatal("a failed refresh consumed the refresh token")
	}
	r = refresh(rt1, "&scope=accounts")
	rt2, _ := r.body["refresh_token"].(string)
	if r.status != 200 || r.body["scope"] != "accounts" || rt2 == "" {
		t.Fatalf("narrower refresh: %d %s", r.status, r.raw)
	}
	// The grant keeps its scopes: the next refresh may ask for all again.
	if r = refresh(rt2, ""); r.status != 200 || r.body["scope"] != "accounts payments" {
		t.Fatalf("refresh after narrowing: %d %s", r.status, r.raw)
	}
}

// TestBankConcurrentRefresh: of concurrent refreshes with one refresh
// token exactly one succeeds.
func TestBankConcurrentRefresh(t *testing.T) {
	s, srv, _ := newBank(t, "")
	rt := s.IssueRefreshToken("sec", nil)
	var wg sync.WaitGroup
	var mu sync.Mutex
	codes := map[int]int{}
	for range 8 {
		wg.Go(func() {
			req, _ := http.NewRequest("POST", srv.URL+"/oauth2/token", strings.NewReader("grant_type=refresh_token&refresh_token="+url.QueryEscape(rt)))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth("sec", "s3cret")
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Error(err)
				return
			}
			res.Body.Close()
			mu.Lock()
			codes[res.StatusCode]++
			mu.Unlock()
		})
	}
	wg.Wait()
	if codes[200] != 1 || codes[400] != 7 {
		t.Errorf("statuses %v, want one 200 and seven 400", codes)
	}
}

func TestBankRevoke(t *testing.T) {
	s, srv, clk := newBank(t, "")
	auth := basicHdr("sec", "s3cret")
	token := func(hdr map[string]string, body string) (access, refresh string) {
		t.Helper()
		r := do(t, srv, "POST", "/oauth2/token", hdr, body)
		if r.status != 200 {
			t.Fatalf("token: %d %s", r.status, r.raw)
		}
		refresh, _ = r.body["refresh_token"].(string)
		return r.body["access_token"].(string), refresh
	}
	a1, _ := token(auth, "grant_type=client_credentials")
	a2, _ := token(auth, "grant_type=client_credentials")
	theirs, _ := token(basicHdr("ec", "ec-secret"), "grant_type=client_credentials")
	fromRT, rt := token(auth, "grant_type=refresh_token&refresh_token="+url.QueryEscape(s.IssueRefreshToken("sec", []string{"accounts"})))
	other, _ := token(auth, "grant_type=client_credentials")

	for _, tc := range []struct {
		name string
		hdr  map[string]string
		body string
		want int
		err  string
	}{
		{"access token", auth, "token=" + url.QueryEscape(a1) + "&token_type_hint=access_token", 200, ""},
		{"no hint", auth, "token=" + url.QueryEscape(a2), 200, ""},
		{"unknown token", auth, "token=nope&token_type_hint=refresh_token", 200, ""},
		{"other client's token", auth, "token=" + url.QueryEscape(theirs), 200, ""},
		{"refresh token", auth, "token=" + url.QueryEscape(rt) + "&token_type_hint=refresh_token", 200, ""},
		{"private_key_jwt", formHdr(), revokeJWT(assertion(t, rsaKey, jose.PS256, claimsFor(srv, clk, "rsa"))), 200, ""},
		{"missing token", auth, "token_type_hint=access_token", 400, "invalid_request"},
		{"wrong secret", basicHdr("sec", "x"), "token=" + url.QueryEscape(other), 401, "invalid_client"},
		{"unauthenticated", formHdr(), "client_id=sec&token=" + url.QueryEscape(other), 401, "invalid_client"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			req, _ := http.NewRequest("POST", srv.URL+"/oauth2/revoke", strings.NewReader(tc.body))
			for k, v := range tc.hdr {
				req.Header.Set(k, v)
			}
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			var body map[string]any
			json.NewDecoder(res.Body).Decode(&body)
			if res.StatusCode != tc.want || (tc.err != "" && body["error"] != tc.err) {
				t.Fatalf("%d %v, want %d %s", res.StatusCode, body, tc.want, tc.err)
			}
		})
	}
	for tok, want := range map[string]bool{a1: false, a2: false, theirs: true, fromRT: false, other: true} {
		if _, _, valid := s.Issued(tok); valid != want {
			t.Errorf("token %.12s…: valid = %v, want %v", tok, valid, want)
		}
	}
	if s.RefreshTokenValid(rt) {
		t.Error("revoked refresh token still valid")
	}
	if r := do(t, srv, "POST", "/oauth2/token", auth, "grant_type=refresh_token&refresh_token="+url.QueryEscape(rt)); r.body["error"] != "invalid_grant" {
		t.Errorf("refresh with a revoked token: %d %s", r.status, r.raw)
	}
	if s.BankRevocations() != 9 {
		t.Errorf("BankRevocations = %d", s.BankRevocations())
	}
}

func TestBankFail(t *testing.T) {
	s, srv, _ := newBank(t, "")
	s.Fail(503, "3", 1)
	r := do(t, srv, "POST", "/oauth2/token", basicHdr("sec", "s3cret"), "grant_type=client_credentials")
	if r.status != 503 || r.header.Get("Retry-After") != "3" || r.body["error"] != "temporarily_unavailable" {
		t.Fatalf("%d %v %s", r.status, r.header, r.raw)
	}
	if r = do(t, srv, "POST", "/oauth2/token", basicHdr("sec", "s3cret"), "grant_type=client_credentials"); r.status != 200 {
		t.Fatalf("after the scripted failure: %d %s", r.status, r.raw)
	}
	if s.BankTokenRequests() != 2 {
		t.Errorf("BankTokenRequests = %d", s.BankTokenRequests())
	}
}

func TestBankSeparateFromOneID(t *testing.T) {
	s, srv, _ := newBank(t, "")
	// A OneID client and a bank client share the id "oneid": neither's
	// secret works at the other's endpoint, and bank revocation leaves the
	// OneID token alone.
	one := do(t, srv, "POST", "/v1/token", formHdr(), "grant_type=client_credentials&client_id=oneid&client_secret=x")
	if one.status != 200 {
		t.Fatalf("oneid: %d %s", one.status, one.raw)
	}
	if r := do(t, srv, "POST", "/oauth2/token", basicHdr("oneid", "x"), "grant_type=client_credentials"); r.status != 401 {
		t.Errorf("OneID secret at the bank: %d", r.status)
	}
	tok := one.body["access_token"].(string)
	req, _ := http.NewRequest("POST", srv.URL+"/oauth2/revoke", strings.NewReader("token="+url.QueryEscape(tok)))
	for k, v := range basicHdr("oneid", "bank-side") {
		req.Header.Set(k, v)
	}
	res, err := srv.Client().Do(req)
	if err != nil {
		t.Fatal(err)
	}
	res.Body.Close()
	if _, _, valid := s.Issued(tok); res.StatusCode != 200 || !valid {
		t.Errorf("bank revocation of a OneID token: %d, still valid %v", res.StatusCode, valid)
	}
}

func TestParsePublicKey(t *testing.T) {
	testKeys(t)
	der1 := x509.MarshalPKCS1PublicKey(&rsaKey.PublicKey)
	p224, _ := ecdsa.GenerateKey(elliptic.P224(), rand.Reader)
	der224, _ := x509.MarshalPKIXPublicKey(&p224.PublicKey)
	for _, tc := range []struct {
		name string
		pem  []byte
		ok   bool
	}{
		{"PKIX RSA", rsaPEM, true},
		{"PKCS#1 RSA", pem.EncodeToMemory(&pem.Block{Type: "RSA PUBLIC KEY", Bytes: der1}), true},
		{"certificate", ecCertPEM, true},
		{"after other blocks", append(pem.EncodeToMemory(&pem.Block{Type: "EC PARAMETERS", Bytes: []byte{1}}), rsaPEM...), true},
		{"P-224", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der224}), false},
		{"garbage", pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte("x")}), false},
		{"empty", nil, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if _, err := ParsePublicKey(tc.pem); (err == nil) != tc.ok {
				t.Errorf("err = %v, want ok %v", err, tc.ok)
			}
		})
	}
	defer func() {
		if recover() == nil {
			t.Error("New accepted a bank client with a bad key")
		}
	}()
	New(Config{BankClients: []BankClient{{ID: "x", PublicKeyPEM: []byte("nope")}}})
}
