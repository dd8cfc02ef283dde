package dpopas

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"io"
	"maps"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"golang.org/x/oauth2"
)

// prover signs DPoP proofs with one ES256 key, as a client does.
type prover struct {
	signer jose.Signer
	jkt    string
}

func newProver(t testing.TB) *prover {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key},
		(&jose.SignerOptions{EmbedJWK: true}).WithType("dpop+jwt"))
	if err != nil {
		t.Fatal(err)
	}
	tp, err := (&jose.JSONWebKey{Key: key.Public()}).Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return &prover{signer: signer, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

// proof returns a DPoP proof for a request (RFC 9449 section 4.2).
func (p *prover) proof(t testing.TB, htm, htu, nonce string, now time.Time) string {
	t.Helper()
	claims := map[string]any{"jti": rand.Text(), "htm": htm, "htu": htu, "iat": now.Unix()}
	if nonce != "" {
		claims["nonce"] = nonce
	}
	payload, err := json.Marshal(claims)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := p.signer.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// testClient is a registered client with the key of its private_key_jwt
// assertions.
type testClient struct {
	Client
	key *ecdsa.PrivateKey
}

// privateKeyJWTClient returns a private_key_jwt client with a new key.
func privateKeyJWTClient(t testing.TB, c Client) testClient {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	c.AuthMethod = "private_key_jwt"
	c.JWKS = &jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key.Public(), KeyID: c.ID, Algorithm: "ES256", Use: "sig"}}}
	return testClient{Client: c, key: key}
}

// authenticate adds the client's authentication to a request to the
// endpoint.
func (c testClient) authenticate(t testing.TB, s *Server, req *http.Request, form url.Values) {
	t.Helper()
	switch c.AuthMethod {
	case "", "client_secret_basic":
		req.SetBasicAuth(url.QueryEscape(c.ID), url.QueryEscape(c.Secret))
	case "client_secret_post":
		form.Set("client_id", c.ID)
		form.Set("client_secret", c.Secret)
	case "none":
		form.Set("client_id", c.ID)
	case "private_key_jwt":
		signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: c.key},
			(&jose.SignerOptions{}).WithHeader("kid", c.ID))
		if err != nil {
			t.Fatal(err)
		}
		now := time.Now()
		assertion, err := jwt.Signed(signer).Claims(jwt.Claims{
			Issuer: c.ID, Subject: c.ID, Audience: jwt.Audience{s.Issuer}, ID: rand.Text(),
			IssuedAt: jwt.NewNumericDate(now), Expiry: jwt.NewNumericDate(now.Add(time.Minute)),
		}).Serialize()
		if err != nil {
			t.Fatal(err)
		}
		form.Set("client_assertion_type", "urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
		form.Set("client_assertion", assertion)
	default:
		t.Fatalf("no authentication for %q", c.AuthMethod)
	}
}

// answer is a token or PAR endpoint's answer.
type answer struct {
	status           int
	nonce            string // the DPoP-Nonce header
	AccessToken      string `json:"access_token"`
	TokenType        string `json:"token_type"`
	RefreshToken     string `json:"refresh_token"`
	ExpiresIn        int    `json:"expires_in"`
	RequestURI       string `json:"request_uri"`
	Error            string `json:"error"`
	ErrorDescription string `json:"error_description"`
}

// post sends form to endpoint as client c with a DPoP proof ("" for none).
func post(t testing.TB, s *Server, endpoint string, c testClient, form url.Values, proof string) answer {
	t.Helper()
	req, err := http.NewRequest(http.MethodPost, endpoint, nil)
	if err != nil {
		t.Fatal(err)
	}
	c.authenticate(t, s, req, form)
	req.Body = io.NopCloser(strings.NewReader(form.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	if proof != "" {
		req.Header.Set("DPoP", proof)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	a := answer{status: resp.StatusCode, nonce: resp.Header.Get("DPoP-Nonce")}
	body, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	if err := json.Unmarshal(body, &a); err != nil {
		t.Fatalf("POST %s answered %s that is no JSON: %v\n%s", endpoint, resp.Status, err, body)
	}
	return a
}

// requireDPoPToken checks that a is a DPoP-bound access token for p's key
// and returns its claims.
func requireDPoPToken(t testing.TB, s *Server, a answer, p *prover) *AccessToken {
	t.Helper()
	if a.status != http.StatusOK || a.TokenType != "DPoP" {
		t.Fatalf("answer %d token_type %q (%s: %s), want 200 with token_type DPoP", a.status, a.TokenType, a.Error, a.ErrorDescription)
	}
	at, err := s.VerifyAccessToken(context.Background(), a.AccessToken, time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if at.Cnf.JKT != p.jkt {
		t.Fatalf("cnf.jkt = %q, want the proof key's thumbprint %q", at.Cnf.JKT, p.jkt)
	}
	return at
}

// requireError checks that a is a 400 with the OAuth error code want.
func requireError(t testing.TB, a answer, want string) {
	t.Helper()
	if a.status != http.StatusBadRequest || a.Error != want {
		t.Fatalf("answer %d error %q (%s), want 400 %s", a.status, a.Error, a.ErrorDescription, want)
	}
}

func TestClientCredentials(t *testing.T) {
	clients := []testClient{
		{Client: Client{ID: "cc-basic", Secret: "cc-basic-secret-0123456789abcdef"}},
		{Client: Client{ID: "cc-post", Secret: "cc-post-secret-0123456789abcdef", AuthMethod: "client_secret_post"}},
		privateKeyJWTClient(t, Client{ID: "cc-jwt"}),
	}
	bearer := testClient{Client: Client{ID: "cc-bearer", Secret: "cc-bearer-secret-0123456789abcdef", AllowBearer: true}}
	opts := Options{AccessTokenTTL: 5 * time.Minute}
	for _, c := range append(clients, bearer) {
		opts.Clients = append(opts.Clients, c.Client)
	}
	s := Start(t, opts)
	grant := func() url.Values { return url.Values{"grant_type": {"client_credentials"}, "scope": {"payments"}} }

	for _, c := range clients {
		t.Run(c.ID, func(t *testing.T) {
			p := newProver(t)
			proof := p.proof(t, http.MethodPost, s.TokenURL, "", time.Now())
			a := post(t, s, s.TokenURL, c, grant(), proof)
			at := requireDPoPToken(t, s, a, p)
			if at.ClientID != c.ID || at.Subject != c.ID || at.Scope != "payments" || a.ExpiresIn != 300 {
				t.Errorf("client_id %q sub %q scope %q expires_in %d, want %s, %s, payments, 300", at.ClientID, at.Subject, at.Scope, a.ExpiresIn, c.ID, c.ID)
			}

			t.Run("replayed proof", func(t *testing.T) {
				requireError(t, post(t, s, s.TokenURL, c, grant(), proof), "invalid_grant")
			})
			t.Run("no proof", func(t *testing.T) {
				requireError(t, post(t, s, s.TokenURL, c, grant(), ""), "invalid_grant")
			})
			t.Run("proof for another URL", func(t *testing.T) {
				wrong := p.proof(t, http.MethodPost, s.Issuer+"/elsewhere", "", time.Now())
				requireError(t, post(t, s, s.TokenURL, c, grant(), wrong), "invalid_dpop_proof")
			})
		})
	}

	t.Run("bearer allowed", func(t *testing.T) {
		a := post(t, s, s.TokenURL, bearer, grant(), "")
		if a.status != http.StatusOK || a.TokenType != "Bearer" {
			t.Fatalf("answer %d token_type %q (%s), want 200 Bearer", a.status, a.TokenType, a.ErrorDescription)
		}
		p := newProver(t)
		requireDPoPToken(t, s, post(t, s, s.TokenURL, bearer, grant(), p.proof(t, http.MethodPost, s.TokenURL, "", time.Now())), p)
	})
}

func TestNonce(t *testing.T) {
	c := testClient{Client: Client{
		ID: "nonce", Secret: "nonce-secret-0123456789abcdef",
		GrantTypes: []string{"client_credentials", "authorization_code", "refresh_token"}, RedirectURIs: []string{"http://127.0.0.1:1/callback"},
	}}
	s := Start(t, Options{Clients: []Client{c.Client}, RequireNonce: true})
	p := newProver(t)

	for _, ep := range []struct {
		name, url string
		form      url.Values
	}{
		{"token", s.TokenURL, url.Values{"grant_type": {"client_credentials"}}},
		{"PAR", s.PARURL, parForm(c.ID, "state", verifier(), "", "accounts")},
	} {
		t.Run(ep.name, func(t *testing.T) {
			a := post(t, s, ep.url, c, maps.Clone(ep.form), p.proof(t, http.MethodPost, ep.url, "", time.Now()))
			requireError(t, a, "use_dpop_nonce")
			if a.nonce == "" {
				t.Fatal("the use_dpop_nonce answer has no DPoP-Nonce header")
			}
			a = post(t, s, ep.url, c, maps.Clone(ep.form), p.proof(t, http.MethodPost, ep.url, a.nonce, time.Now()))
			if a.status/100 != 2 {
				t.Fatalf("with the nonce: answer %d %s (%s)", a.status, a.Error, a.ErrorDescription)
			}
		})
	}
}

func TestCodeFlow(t *testing.T) {
	const redirect = "http://127.0.0.1:1/callback"
	confidential := testClient{Client: Client{ID: "web", Secret: "web-secret-0123456789abcdef", RedirectURIs: []string{redirect}}}
	public := testClient{Client: Client{ID: "app", AuthMethod: "none", RedirectURIs: []string{redirect}}}
	s := Start(t, Options{Clients: []Client{confidential.Client, public.Client}})

	tests := []struct {
		name  string
		c     testClient
		par   bool
		scope string
		// rtBound: the refresh token is bound to the key (public clients).
		rtBound bool
	}{
		{"confidential PAR", confidential, true, "accounts", false},
		{"confidential dpop_jkt in the URL", confidential, false, "accounts", false},
		{"confidential OpenID with consent", confidential, true, "openid offline_access accounts", false},
		{"public PAR", public, true, "accounts", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := newProver(t)
			v := verifier()
			code := authorize(t, s, tt.c, p, v, tt.par, tt.scope)

			exchange := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirect}, "code_verifier": {v}}
			a := post(t, s, s.TokenURL, tt.c, exchange, p.proof(t, http.MethodPost, s.TokenURL, "", time.Now()))
			at := requireDPoPToken(t, s, a, p)
			if at.Subject != Subject || at.ClientID != tt.c.ID || at.Scope != "accounts" {
				t.Errorf("sub %q client_id %q scope %q, want %s, %s, accounts", at.Subject, at.ClientID, at.Scope, Subject, tt.c.ID)
			}
			if a.RefreshToken == "" {
				t.Fatal("the code grant issued no refresh token")
			}

			refresh := func(rt string) url.Values {
				return url.Values{"grant_type": {"refresh_token"}, "refresh_token": {rt}}
			}
			other := newProver(t)
			a2 := post(t, s, s.TokenURL, tt.c, refresh(a.RefreshToken), other.proof(t, http.MethodPost, s.TokenURL, "", time.Now()))
			if tt.rtBound {
				requireError(t, a2, "invalid_grant")
				a2 = post(t, s, s.TokenURL, tt.c, refresh(a.RefreshToken), p.proof(t, http.MethodPost, s.TokenURL, "", time.Now()))
				requireDPoPToken(t, s, a2, p)
			} else {
				requireDPoPToken(t, s, a2, other)
			}
		})
	}

	t.Run("code bound to dpop_jkt", func(t *testing.T) {
		p, other := newProver(t), newProver(t)
		v := verifier()
		code := authorize(t, s, confidential, p, v, true, "accounts")
		exchange := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {redirect}, "code_verifier": {v}}
		requireError(t, post(t, s, s.TokenURL, confidential, exchange, other.proof(t, http.MethodPost, s.TokenURL, "", time.Now())), "invalid_grant")
	})
}

// authorize runs the authorization request of client c for scope, bound
// to p's key (dpop_jkt), pushed (PAR, with a proof) or in the URL, approves
// it and returns the code.
func authorize(t testing.TB, s *Server, c testClient, p *prover, codeVerifier string, par bool, scope string) string {
	t.Helper()
	state := rand.Text()
	form := parForm(c.ID, state, codeVerifier, p.jkt, scope)
	authURL := s.AuthURL + "?" + form.Encode()
	if par {
		a := post(t, s, s.PARURL, c, form, p.proof(t, http.MethodPost, s.PARURL, "", time.Now()))
		if a.status != http.StatusCreated || a.RequestURI == "" {
			t.Fatalf("PAR answered %d %s (%s), want 201 with a request_uri", a.status, a.Error, a.ErrorDescription)
		}
		authURL = s.AuthURL + "?" + url.Values{"client_id": {c.ID}, "request_uri": {a.RequestURI}}.Encode()
	}
	code, gotState := s.Approve(t, nil, authURL)
	if gotState != state {
		t.Fatalf("state %q, want %q", gotState, state)
	}
	return code
}

// parForm is an authorization request of the code flow with PKCE, bound to
// a DPoP key when jkt is not "", as the broker sends it (with a nonce and
// prompt=consent for OpenID scopes).
func parForm(clientID, state, codeVerifier, jkt, scope string) url.Values {
	form := url.Values{
		"client_id":             {clientID},
		"response_type":         {"code"},
		"redirect_uri":          {"http://127.0.0.1:1/callback"},
		"scope":                 {scope},
		"state":                 {state},
		"code_challenge":        {oauth2.S256ChallengeFromVerifier(codeVerifier)},
		"code_challenge_method": {"S256"},
	}
	if jkt != "" {
		form.Set("dpop_jkt", jkt)
	}
	if strings.Contains(scope, "openid") {
		form.Set("nonce", rand.Text())
		form.Set("prompt", "consent")
	}
	return form
}

func verifier() string { return oauth2.GenerateVerifier() }

// TestServerLifetime: the server ends when its standard input closes (the
// test process that started it is gone), and a machine without Node.js
// fails the test with what to run.
func TestServerLifetime(t *testing.T) {
	if os.Getenv("DPOPAS_NO_NODE_CHILD") == "1" {
		Start(t, Options{Clients: []Client{{ID: "c", Secret: "c-secret-0123456789abcdef"}}})
		return
	}

	t.Run("standard input closed", func(t *testing.T) {
		s := Start(t, Options{Clients: []Client{{ID: "c", Secret: "c-secret-0123456789abcdef"}}})
		if err := s.stdin.Close(); err != nil {
			t.Fatal(err)
		}
		select {
		case <-s.exit:
		case <-time.After(startTimeout):
			t.Fatalf("the server still runs %s after its standard input closed", startTimeout)
		}
	})

	t.Run("no node", func(t *testing.T) {
		cmd := exec.Command(os.Args[0], "-test.run=^TestServerLifetime$", "-test.count=1")
		cmd.Env = append(os.Environ(), "DPOPAS_NO_NODE_CHILD=1", "PATH="+t.TempDir())
		out, err := cmd.CombinedOutput()
		if err == nil || !strings.Contains(string(out), "node is not installed: run make tools") {
			t.Fatalf("without node on PATH: %v\n%s", err, out)
		}
	})
}
