package dpoprs

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// fixture is an authorization server key, a client key and a clock.
type fixture struct {
	as     *ecdsa.PrivateKey
	client ed25519.PrivateKey
	now    time.Time
}

func newFixture(t *testing.T) *fixture {
	as, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	_, client, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return &fixture{as: as, client: client, now: time.Unix(1_800_000_000, 0)}
}

func (f *fixture) keys(context.Context) (*jose.JSONWebKeySet, error) {
	return &jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: f.as.Public(), KeyID: "as-1", Algorithm: "ES256", Use: "sig"}}}, nil
}

func (f *fixture) jkt(t *testing.T) string {
	th, err := (&jose.JSONWebKey{Key: f.client.Public()}).Thumbprint(crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	return base64.RawURLEncoding.EncodeToString(th)
}

// token is an access token bound to jkt.
func (f *fixture) token(t *testing.T, jkt string) string {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: f.as},
		(&jose.SignerOptions{}).WithType("at+jwt").WithHeader("kid", "as-1"))
	if err != nil {
		t.Fatal(err)
	}
	claims := map[string]any{"sub": "client-1", "iss": "https://as.test", "exp": f.now.Add(time.Hour).Unix(),
		"iat": f.now.Unix(), "cnf": map[string]string{"jkt": jkt}}
	tok, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return tok
}

// proof is a DPoP proof by the client key with the given claims.
func (f *fixture) proof(t *testing.T, typ string, claims map[string]any) string {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.EdDSA, Key: f.client},
		(&jose.SignerOptions{EmbedJWK: true}).WithType(jose.ContentType(typ)))
	if err != nil {
		t.Fatal(err)
	}
	p, err := jwt.Signed(sig).Claims(claims).Serialize()
	if err != nil {
		t.Fatal(err)
	}
	return p
}

func ath(tok string) string {
	s := sha256.Sum256([]byte(tok))
	return base64.RawURLEncoding.EncodeToString(s[:])
}

// TestChecks: a request with a good proof and bound token is accepted;
// each broken part is refused with its reason, and a replayed proof too.
func TestChecks(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, f.jkt(t))
	const u = "http://rs.test/accounts/1"
	good := func() map[string]any {
		return map[string]any{"jti": "j-" + rand.Text(), "htm": "GET", "htu": u, "iat": f.now.Unix(), "ath": ath(tok)}
	}
	with := func(k string, v any) map[string]any { c := good(); c[k] = v; return c }
	other := f.token(t, "other-jkt")
	forged := tok[:len(tok)-4] + "AAAA"
	tests := []struct {
		name    string
		auth    string
		proofs  []string
		nonce   bool
		want    string // "" accepted
		wantErr string // WWW-Authenticate error
	}{
		{"good", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", good())}, false, "", ""},
		{"bearer scheme", "Bearer " + tok, []string{f.proof(t, "dpop+jwt", good())}, false, ReasonScheme, "invalid_token"},
		{"no proof", "DPoP " + tok, nil, false, ReasonNoProof, "invalid_dpop_proof"},
		{"two proofs", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", good()), f.proof(t, "dpop+jwt", good())}, false, ReasonManyProofs, "invalid_dpop_proof"},
		{"typ", "DPoP " + tok, []string{f.proof(t, "JWT", good())}, false, ReasonType, "invalid_dpop_proof"},
		{"htm", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("htm", "POST"))}, false, ReasonHTM, "invalid_dpop_proof"},
		{"htu path", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("htu", "http://rs.test/accounts"))}, false, ReasonHTU, "invalid_dpop_proof"},
		{"htu host", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("htu", "http://other.test/accounts/1"))}, false, ReasonHTU, "invalid_dpop_proof"},
		{"htu default port and case", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("htu", "HTTP://RS.test:80/accounts/1"))}, false, "", ""},
		{"ath", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("ath", ath("other")))}, false, ReasonATH, "invalid_dpop_proof"},
		{"iat old", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("iat", f.now.Add(-2*time.Minute).Unix()))}, false, ReasonIAT, "invalid_dpop_proof"},
		{"iat future", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", with("iat", f.now.Add(2*time.Minute).Unix()))}, false, ReasonIAT, "invalid_dpop_proof"},
		{"nonce missing", "DPoP " + tok, []string{f.proof(t, "dpop+jwt", good())}, true, ReasonNonce, "use_dpop_nonce"},
		{"token of another key", "DPoP " + other, []string{f.proof(t, "dpop+jwt", with("ath", ath(other)))}, false, ReasonBinding, "invalid_token"},
		{"token forged", "DPoP " + forged, []string{f.proof(t, "dpop+jwt", with("ath", ath(forged)))}, false, ReasonToken, "invalid_token"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(Options{Keys: f.keys, Issuer: "https://as.test", Nonce: tt.nonce, Now: func() time.Time { return f.now }})
			req := httptest.NewRequest(http.MethodGet, u, nil)
			req.Header.Set("Authorization", tt.auth)
			for _, p := range tt.proofs {
				req.Header.Add("DPoP", p)
			}
			rec := httptest.NewRecorder()
			s.ServeHTTP(rec, req)
			if tt.want == "" {
				if rec.Code != http.StatusOK || len(s.Accepted()) != 1 || s.Accepted()[0].JKT != f.jkt(t) {
					t.Fatalf("status %d, refusals %+v: want accepted", rec.Code, s.Refusals())
				}
				return
			}
			rs := s.Refusals()
			if rec.Code != http.StatusUnauthorized || len(rs) != 1 || rs[0].Reason != tt.want {
				t.Fatalf("status %d, refusals %+v: want 401 %q", rec.Code, rs, tt.want)
			}
			if wa := rec.Header().Get("WWW-Authenticate"); !strings.HasPrefix(wa, `DPoP error="`+tt.wantErr+`"`) {
				t.Errorf("WWW-Authenticate %q, want error %q", wa, tt.wantErr)
			}
			if tt.nonce && rec.Header().Get("DPoP-Nonce") == "" {
				t.Error("no DPoP-Nonce with the challenge")
			}
		})
	}
}

// TestReplayAndNonce: the same proof twice is refused the second time; in
// nonce mode a proof with the current nonce passes and one with a rotated
// nonce is challenged again.
func TestReplayAndNonce(t *testing.T) {
	f := newFixture(t)
	tok := f.token(t, f.jkt(t))
	s := New(Options{Keys: f.keys, Nonce: true, Now: func() time.Time { return f.now }})
	send := func(p string) *httptest.ResponseRecorder {
		req := httptest.NewRequest(http.MethodPost, "http://rs.test/pay", strings.NewReader("{}"))
		req.Header.Set("Authorization", "DPoP "+tok)
		req.Header.Set("DPoP", p)
		rec := httptest.NewRecorder()
		s.ServeHTTP(rec, req)
		return rec
	}
	claims := func(jti, nonce string) map[string]any {
		return map[string]any{"jti": jti, "htm": "POST", "htu": "http://rs.test/pay", "iat": f.now.Unix(), "ath": ath(tok), "nonce": nonce}
	}
	first := send(f.proof(t, "dpop+jwt", claims("a", "")))
	nonce := first.Header().Get("DPoP-Nonce")
	if first.Code != http.StatusUnauthorized || nonce == "" {
		t.Fatalf("without nonce: status %d nonce %q, want 401 and a nonce", first.Code, nonce)
	}
	p := f.proof(t, "dpop+jwt", claims("b", nonce))
	if rec := send(p); rec.Code != http.StatusOK {
		t.Fatalf("with nonce: status %d, refusals %+v", rec.Code, s.Refusals())
	}
	if rec := send(p); rec.Code != http.StatusUnauthorized || s.Refusals()[1].Reason != ReasonReplay {
		t.Fatalf("replayed: status %d, refusals %+v", rec.Code, s.Refusals())
	}
	s.RotateNonce()
	if rec := send(f.proof(t, "dpop+jwt", claims("c", nonce))); rec.Code != http.StatusUnauthorized || s.Challenges() != 2 {
		t.Fatalf("stale nonce: status %d, refusals %+v", rec.Code, s.Refusals())
	}
}
