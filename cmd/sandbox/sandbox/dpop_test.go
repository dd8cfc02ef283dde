package sandbox

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"golang.org/x/oauth2"
)

// dpopKey signs DPoP proofs in the tests.
type dpopKey struct {
	alg jose.SignatureAlgorithm
	key crypto.Signer
	jkt string
}

func newDPoPKey(t *testing.T, alg jose.SignatureAlgorithm) *dpopKey {
	t.Helper()
	var key crypto.Signer
	var err error
	switch alg {
	case jose.ES256:
		key, err = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	case jose.EdDSA:
		_, key, err = ed25519.GenerateKey(rand.Reader)
	case jose.PS256:
		testKeys(t)
		key = rsaOther
	}
	if err != nil {
		t.Fatal(err)
	}
	tp, err := (&jose.JSONWebKey{Key: key.Public()}).Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return &dpopKey{alg: alg, key: key, jkt: base64.RawURLEncoding.EncodeToString(tp)}
}

// proof signs a DPoP proof with header typ and claims, plus a random jti
// unless claims has one; a nil value leaves a claim out.
func (k *dpopKey) proof(t *testing.T, typ string, claims map[string]any) string {
	t.Helper()
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: k.alg, Key: k.key},
		(&jose.SignerOptions{EmbedJWK: true}).WithType(jose.ContentType(typ)))
	if err != nil {
		t.Fatal(err)
	}
	c := map[string]any{"jti": rand.Text()}
	for key, v := range claims {
		if v == nil {
			delete(c, key)
		} else {
			c[key] = v
		}
	}
	payload, err := json.Marshal(c)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := sig.Sign(payload)
	if err != nil {
		t.Fatal(err)
	}
	out, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// dpopBank is a sandbox bank with a client "sec" that may send proofs and
// a client "bound" that must.
func dpopBank(t *testing.T, nonce bool) (*Server, *httptest.Server, *clock) {
	t.Helper()
	clk := &clock{t: time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC)}
	s := New(Config{
		BankClients: []BankClient{
			{ID: "sec", Secret: "s3cret", RedirectURIs: []string{sbCallback}},
			{ID: "bound", Secret: "b0und", DPoP: true},
		},
		BankTokenLifetime: 15 * time.Minute,
		DPoPNonce:         nonce,
		Now:               clk.Now,
	})
	return s, serve(t, s), clk
}

// tokenClaims are a proof's claims for the bank's token endpoint.
func tokenClaims(srv *httptest.Server, clk *clock) map[string]any {
	return map[string]any{"htm": "POST", "htu": srv.URL + bankTokenPath, "iat": clk.Now().Unix()}
}

// dpopToken gets a DPoP-bound client_credentials token of client with k.
func dpopToken(t *testing.T, srv *httptest.Server, clk *clock, client, secret string, k *dpopKey) string {
	t.Helper()
	h := basicHdr(client, secret)
	h["DPoP"] = k.proof(t, "dpop+jwt", tokenClaims(srv, clk))
	r := do(t, srv, "POST", bankTokenPath, h, "grant_type=client_credentials")
	if r.status != 200 || r.body["token_type"] != "DPoP" {
		t.Fatalf("DPoP token request: %d %s", r.status, r.raw)
	}
	return r.body["access_token"].(string)
}

func TestBankDPoPTokenRequest(t *testing.T) {
	s, srv, clk := dpopBank(t, false)
	for _, alg := range []jose.SignatureAlgorithm{jose.ES256, jose.PS256, jose.EdDSA} {
		t.Run(string(alg), func(t *testing.T) {
			k := newDPoPKey(t, alg)
			tok := dpopToken(t, srv, clk, "bound", "b0und", k)
			claims := verifyAccessToken(t, srv, tok)
			if cnf, _ := claims["cnf"].(map[string]any); cnf["jkt"] != k.jkt {
				t.Errorf("cnf %v, want jkt %s", claims["cnf"], k.jkt)
			}
			if org, _, valid := s.Issued(tok); org != "bound" || !valid {
				t.Errorf("Issued = %q %v", org, valid)
			}
		})
	}

	k := newDPoPKey(t, jose.ES256)
	replayed := k.proof(t, "dpop+jwt", tokenClaims(srv, clk))
	if r := do(t, srv, "POST", bankTokenPath, with2(basicHdr("sec", "s3cret"), "DPoP", replayed), "grant_type=client_credentials"); r.status != 200 {
		t.Fatalf("first use of the proof: %d %s", r.status, r.raw)
	}
	for _, tc := range []struct {
		name   string
		client string
		proof  string // "" sends no DPoP header
		extra  string // a second DPoP header
		err    string
	}{
		{"bound client without a proof", "bound", "", "", "invalid_dpop_proof"},
		{"replayed jti", "sec", replayed, "", "invalid_dpop_proof"},
		{"typ JWT", "sec", k.proof(t, "JWT", tokenClaims(srv, clk)), "", "invalid_dpop_proof"},
		{"htm GET", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "htm", "GET")), "", "invalid_dpop_proof"},
		{"htu of another endpoint", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "htu", srv.URL+bankRevokePath)), "", "invalid_dpop_proof"},
		{"htu with a query", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "htu", srv.URL+bankTokenPath+"?a=b")), "", "invalid_dpop_proof"},
		{"iat too old", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "iat", clk.Now().Add(-dpopWindow-time.Second).Unix())), "", "invalid_dpop_proof"},
		{"iat in the future", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "iat", clk.Now().Add(dpopWindow+time.Second).Unix())), "", "invalid_dpop_proof"},
		{"no iat", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "iat", nil)), "", "invalid_dpop_proof"},
		{"empty jti", "sec", k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "jti", "")), "", "invalid_dpop_proof"},
		{"signature broken", "sec", tamper(k.proof(t, "dpop+jwt", tokenClaims(srv, clk))), "", "invalid_dpop_proof"},
		{"two proofs", "sec", k.proof(t, "dpop+jwt", tokenClaims(srv, clk)), k.proof(t, "dpop+jwt", tokenClaims(srv, clk)), "invalid_dpop_proof"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			secret := map[string]string{"sec": "s3cret", "bound": "b0und"}[tc.client]
			req, err := http.NewRequest("POST", srv.URL+bankTokenPath, strings.NewReader("grant_type=client_credentials"))
			if err != nil {
				t.Fatal(err)
			}
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth(tc.client, secret)
			for _, p := range []string{tc.proof, tc.extra} {
				if p != "" {
					req.Header.Add("DPoP", p)
				}
			}
			before := s.BankTokenRequests()
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			defer res.Body.Close()
			var body map[string]string
			_ = json.NewDecoder(res.Body).Decode(&body)
			if res.StatusCode != 400 || body["error"] != tc.err {
				t.Fatalf("%d %v, want 400 %s", res.StatusCode, body, tc.err)
			}
			if s.BankTokenRequests() != before+1 {
				t.Error("the request was not counted")
			}
		})
	}
}

// with2 returns h with one more header.
func with2(h map[string]string, k, v string) map[string]string {
	h[k] = v
	return h
}

// tamper changes a character inside a JWS's signature (not the last one,
// whose low bits may be padding).
func tamper(jws string) string {
	i := len(jws) - 10
	repl := byte('A')
	if jws[i] == 'A' {
		repl = 'B'
	}
	return jws[:i] + string(repl) + jws[i+1:]
}

func TestEchoDPoP(t *testing.T) {
	_, srv, clk := dpopBank(t, false)
	k, other := newDPoPKey(t, jose.ES256), newDPoPKey(t, jose.ES256)
	tok := dpopToken(t, srv, clk, "sec", "s3cret", k)
	bearer := do(t, srv, "POST", bankTokenPath, basicHdr("sec", "s3cret"), "grant_type=client_credentials").body["access_token"].(string)
	const path = "/accounts/list"
	echoClaims := func() map[string]any {
		return map[string]any{"htm": "GET", "htu": srv.URL + path, "iat": clk.Now().Unix(), "ath": athOf(tok)}
	}
	// echo sends a GET with auth and proof ("" for none) and returns the
	// answer and the echo's view of the credentials.
	echo := func(t *testing.T, auth, proof string, require bool) (resp, EchoAuth) {
		t.Helper()
		h := map[string]string{"Authorization": auth}
		if proof != "" {
			h["DPoP"] = proof
		}
		if require {
			h["X-Sandbox-Require-Token"] = "1"
		}
		r := do(t, srv, "GET", path, h, "")
		var e Echo
		if err := json.Unmarshal([]byte(r.raw), &e); err != nil {
			t.Fatal(err)
		}
		return r, e.Authorization
	}

	for _, tc := range []struct {
		name  string
		auth  string
		proof func() string // nil: no proof
		// refusal is the error of a refused request's DPoP challenge;
		// "" for a valid one.
		refusal  string
		wantDPoP bool
	}{
		{"DPoP with its proof", "DPoP " + tok, func() string { return k.proof(t, "dpop+jwt", echoClaims()) }, "", true},
		{"bound token as bearer", "Bearer " + tok, nil, "invalid_token", false},
		{"bound token without a proof", "DPoP " + tok, nil, "invalid_token", false},
		{"proof of another key", "DPoP " + tok, func() string { return other.proof(t, "dpop+jwt", echoClaims()) }, "invalid_token", false},
		{"proof without ath", "DPoP " + tok, func() string { return k.proof(t, "dpop+jwt", with(echoClaims(), "ath", nil)) }, "invalid_dpop_proof", false},
		{"proof for another path", "DPoP " + tok, func() string { return k.proof(t, "dpop+jwt", with(echoClaims(), "htu", srv.URL+"/other")) }, "invalid_dpop_proof", false},
		{"proof for POST", "DPoP " + tok, func() string { return k.proof(t, "dpop+jwt", with(echoClaims(), "htm", "POST")) }, "invalid_dpop_proof", false},
		{"bearer token", "Bearer " + bearer, nil, "", false},
		{"bearer token with the DPoP scheme", "DPoP " + bearer, nil, "invalid_token", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			proof := func() string {
				if tc.proof == nil {
					return ""
				}
				return tc.proof()
			}
			r, a := echo(t, tc.auth, proof(), false)
			valid := tc.refusal == ""
			if r.status != 200 || a.Valid != valid || a.DPoP != tc.wantDPoP || !a.IssuedBySandbox {
				t.Fatalf("%d %+v, want valid %v dpop %v", r.status, a, valid, tc.wantDPoP)
			}
			if (a.Refused == "") != valid || strings.Contains(a.Refused, tok) {
				t.Errorf("refused %q", a.Refused)
			}
			// As a resource server answers: 401 with a DPoP challenge.
			r, _ = echo(t, tc.auth, proof(), true)
			challenge := r.header.Get("WWW-Authenticate")
			switch {
			case valid && r.status != 200:
				t.Errorf("with X-Sandbox-Require-Token: %d, want 200", r.status)
			case !valid && (r.status != 401 || !strings.HasPrefix(challenge, "DPoP ") || !strings.Contains(challenge, `error="`+tc.refusal+`"`)):
				t.Errorf("%d WWW-Authenticate %q, want 401 DPoP error=%s", r.status, challenge, tc.refusal)
			}
		})
	}

	t.Run("htu names the Host a proxy kept", func(t *testing.T) {
		for _, tc := range []struct {
			htu   string
			valid bool
		}{
			{"http://front.example:8080" + path, true},
			{srv.URL + path, false},
		} {
			req, err := http.NewRequest("GET", srv.URL+path, nil)
			if err != nil {
				t.Fatal(err)
			}
			req.Host = "front.example:8080"
			req.Header.Set("Authorization", "DPoP "+tok)
			req.Header.Set("DPoP", k.proof(t, "dpop+jwt", with(echoClaims(), "htu", tc.htu)))
			res, err := srv.Client().Do(req)
			if err != nil {
				t.Fatal(err)
			}
			var e Echo
			err = json.NewDecoder(res.Body).Decode(&e)
			res.Body.Close()
			if err != nil || e.Authorization.Valid != tc.valid {
				t.Errorf("htu %s: %+v (%v), want valid %v", tc.htu, e.Authorization, err, tc.valid)
			}
		}
	})

	t.Run("replayed proof", func(t *testing.T) {
		proof := k.proof(t, "dpop+jwt", echoClaims())
		if _, a := echo(t, "DPoP "+tok, proof, true); !a.Valid {
			t.Fatalf("first use: %+v", a)
		}
		r, a := echo(t, "DPoP "+tok, proof, true)
		if r.status != 401 || a.Valid || !strings.Contains(a.Refused, "jti") {
			t.Fatalf("second use: %d %+v, want 401 refused for its jti", r.status, a)
		}
	})
}

func TestDPoPNonce(t *testing.T) {
	s, srv, clk := dpopBank(t, true)
	k := newDPoPKey(t, jose.ES256)

	h := basicHdr("bound", "b0und")
	h["DPoP"] = k.proof(t, "dpop+jwt", tokenClaims(srv, clk))
	r := do(t, srv, "POST", bankTokenPath, h, "grant_type=client_credentials")
	nonce := r.header.Get("DPoP-Nonce")
	if r.status != 400 || r.body["error"] != "use_dpop_nonce" || nonce == "" {
		t.Fatalf("proof without a nonce: %d %s nonce %q, want 400 use_dpop_nonce with a DPoP-Nonce", r.status, r.raw, nonce)
	}
	h["DPoP"] = k.proof(t, "dpop+jwt", with(tokenClaims(srv, clk), "nonce", nonce))
	r = do(t, srv, "POST", bankTokenPath, h, "grant_type=client_credentials")
	if r.status != 200 || r.body["token_type"] != "DPoP" {
		t.Fatalf("proof with the nonce: %d %s", r.status, r.raw)
	}
	tok := r.body["access_token"].(string)

	// The echo demands the nonce too; the previous step's nonce still
	// passes, an older one does not.
	echo := func(nonce string) resp {
		c := map[string]any{"htm": "GET", "htu": srv.URL + "/x", "iat": clk.Now().Unix(), "ath": athOf(tok)}
		if nonce != "" {
			c["nonce"] = nonce
		}
		return do(t, srv, "GET", "/x", map[string]string{"Authorization": "DPoP " + tok, "DPoP": k.proof(t, "dpop+jwt", c),
			"X-Sandbox-Require-Token": "1"}, "")
	}
	for _, tc := range []struct {
		name    string
		advance time.Duration
		nonce   string
		want    int
	}{
		{"no nonce", 0, "", 401},
		{"current nonce", 0, nonce, 200},
		{"previous step's nonce", dpopNonceStep, nonce, 200},
		{"older nonce", dpopNonceStep, nonce, 401},
	} {
		t.Run(tc.name, func(t *testing.T) {
			clk.Advance(tc.advance)
			r := echo(tc.nonce)
			if r.status != tc.want {
				t.Fatalf("%d %s, want %d", r.status, r.raw, tc.want)
			}
			if r.header.Get("DPoP-Nonce") != s.dpopNonce(clk.Now()) {
				t.Errorf("DPoP-Nonce %q, want the current one", r.header.Get("DPoP-Nonce"))
			}
			if tc.want == 401 && !strings.Contains(r.header.Get("WWW-Authenticate"), `error="use_dpop_nonce"`) {
				t.Errorf("challenge %q, want use_dpop_nonce", r.header.Get("WWW-Authenticate"))
			}
		})
	}
}

func TestBankDPoPCodeBinding(t *testing.T) {
	_, srv, clk := dpopBank(t, false)
	k, other := newDPoPKey(t, jose.ES256), newDPoPKey(t, jose.ES256)
	const verifier = "a-pkce-verifier-of-at-least-forty-three-characters"
	code := func(t *testing.T) string {
		t.Helper()
		form := url.Values{"client_id": {"sec"}, "redirect_uri": {sbCallback}, "response_type": {"code"}, "state": {"st"},
			"scope": {"accounts"}, "code_challenge": {oauth2.S256ChallengeFromVerifier(verifier)}, "code_challenge_method": {"S256"},
			"dpop_jkt": {k.jkt}, "decision": {"approve"}}
		res, err := browser.PostForm(srv.URL+bankAuthorizePath, form)
		if err != nil {
			t.Fatal(err)
		}
		res.Body.Close()
		loc, err := url.Parse(res.Header.Get("Location"))
		if err != nil || loc.Query().Get("code") == "" {
			t.Fatalf("approve answered %d %s", res.StatusCode, res.Header.Get("Location"))
		}
		return loc.Query().Get("code")
	}
	redeem := url.Values{"grant_type": {"authorization_code"}, "redirect_uri": {sbCallback}, "code_verifier": {verifier}}
	for _, tc := range []struct {
		name  string
		key   *dpopKey // nil: no proof
		want  int
		jkt   string
		error string
	}{
		{"the bound key", k, 200, k.jkt, ""},
		{"another key", other, 400, "", "invalid_grant"},
		{"no proof", nil, 400, "", "invalid_grant"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			redeem.Set("code", code(t))
			h := basicHdr("sec", "s3cret")
			if tc.key != nil {
				h["DPoP"] = tc.key.proof(t, "dpop+jwt", tokenClaims(srv, clk))
			}
			r := do(t, srv, "POST", bankTokenPath, h, redeem.Encode())
			if r.status != tc.want || (tc.error != "" && r.body["error"] != tc.error) {
				t.Fatalf("%d %s, want %d %s", r.status, r.raw, tc.want, tc.error)
			}
			if tc.want == 200 {
				if cnf, _ := verifyAccessToken(t, srv, r.body["access_token"].(string))["cnf"].(map[string]any); cnf["jkt"] != tc.jkt {
					t.Errorf("cnf %v, want jkt %s", cnf, tc.jkt)
				}
			}
		})
	}
}

// athOf is a proof's ath for an access token: base64url(SHA-256(token)).
func athOf(accessToken string) string {
	sum := sha256.Sum256([]byte(accessToken))
	return base64.RawURLEncoding.EncodeToString(sum[:])
}
