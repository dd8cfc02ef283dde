package oauth

import (
	"cmp"
	"context"
	"crypto"
	"crypto/ed25519"
	"crypto/rand"
	"errors"
	"net/http"
	"net/url"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/dpopas"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// countingTransport counts the requests that go out, under the DPoP
// transport: a nonce challenge shows as one request more.
type countingTransport struct {
	n atomic.Int64
}

func (c *countingTransport) RoundTrip(r *http.Request) (*http.Response, error) {
	c.n.Add(1)
	return http.DefaultTransport.RoundTrip(r)
}

// dpopKeyOf returns the DPoP key of a fresh private key of alg (EdDSA and
// Ed25519: an Ed25519 key, named so).
func dpopKeyOf(t *testing.T, alg string) *dpop.Key {
	t.Helper()
	var key crypto.Signer
	switch alg {
	case dpop.ES256:
		key = testECKey(t)
	case dpop.PS256:
		key = testRSAKey(t)
	default:
		_, priv, err := ed25519.GenerateKey(rand.Reader)
		if err != nil {
			t.Fatal(err)
		}
		key = priv
	}
	k, err := dpop.NewKey(key, alg)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// requireBound checks that tok is a DPoP token the server bound to key.
func requireBound(t *testing.T, as *dpopas.Server, tok broker.Token, key *dpop.Key) {
	t.Helper()
	if tok.Type != broker.DPoPType {
		t.Fatalf("token type %q, want DPoP", tok.Type)
	}
	at, err := as.VerifyAccessToken(context.Background(), tok.Value.Reveal(), time.Now())
	if err != nil {
		t.Fatal(err)
	}
	if at.Cnf.JKT != key.Thumbprint() {
		t.Fatalf("cnf.jkt %q, want the key's thumbprint %s", at.Cnf.JKT, key.Thumbprint())
	}
}

// TestDPoPClientCredentialsAgainstOIDCProvider: against a real DPoP
// authorization server that demands its nonce, each client authentication
// method and proof algorithm gets tokens bound to the key: the first
// request is challenged and retried once, the next one carries the
// remembered nonce at once. A key configured as Ed25519 (RFC 9864) signs
// as EdDSA, the name the server lists in dpop_signing_alg_values_supported.
func TestDPoPClientCredentialsAgainstOIDCProvider(t *testing.T) {
	jwtKey := testECKey(t)
	clients := []dpopas.Client{
		{ID: "cc-basic", Secret: secretValue},
		{ID: "cc-post", Secret: secretValue, AuthMethod: "client_secret_post"},
		{ID: "cc-jwt", AuthMethod: "private_key_jwt", JWKS: &jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: jwtKey.Public(), KeyID: "k1", Algorithm: ES256, Use: "sig"}}}},
	}
	as := dpopas.Start(t, dpopas.Options{Clients: clients, RequireNonce: true})
	for _, tc := range []struct {
		client string
		alg    string
		cfg    Config
	}{
		{"cc-basic", dpop.ES256, Config{AuthMethod: ClientSecretBasic, ClientSecret: secretValue}},
		{"cc-post", dpop.EdDSA, Config{AuthMethod: ClientSecretPost, ClientSecret: secretValue}},
		{"cc-post", dpop.Ed25519, Config{AuthMethod: ClientSecretPost, ClientSecret: secretValue}},
		{"cc-jwt", dpop.PS256, Config{AuthMethod: PrivateKeyJWT, Signer: mustSigner(t, jwtKey, ES256, "k1")}},
	} {
		t.Run(tc.client+"/"+tc.alg, func(t *testing.T) {
			key := dpopKeyOf(t, tc.alg)
			sent := &countingTransport{}
			cfg := tc.cfg
			cfg.Name, cfg.Issuer, cfg.ClientID, cfg.DPoP = "bank", as.Issuer, tc.client, key
			cfg.Client = &http.Client{Transport: sent, Timeout: 10 * time.Second}
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			// Discovery goes out without a proof: count the token requests.
			ep, err := src.ep.get(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if want := cmp.Or(map[string]string{dpop.Ed25519: dpop.EdDSA}[tc.alg], tc.alg); ep.dpop.Alg() != want {
				t.Errorf("proofs signed as %s, want %s", ep.dpop.Alg(), want)
			}
			sent.n.Store(0)
			for i := range 2 {
				tok, err := brokerToken(t, src, broker.Request{Scopes: []string{"accounts"}})
				if err != nil {
					t.Fatalf("token %d: %v", i, err)
				}
				requireBound(t, as, tok, key)
			}
			if n := sent.n.Load(); n != 3 {
				t.Errorf("%d token requests for two tokens, want 3 (one nonce challenge, then the nonce remembered)", n)
			}
		})
	}
}

// TestDPoPConsentAgainstOIDCProvider: the consent flow against a real DPoP
// authorization server that demands its nonce, with and without PAR: the
// authorization request names the key (dpop_jkt), the code exchange and
// the refreshes send its proofs, and every access token is bound to it.
func TestDPoPConsentAgainstOIDCProvider(t *testing.T) {
	as := dpopas.Start(t, dpopas.Options{RequireNonce: true, Clients: []dpopas.Client{
		{ID: "consent", Secret: secretValue, RedirectURIs: []string{callbackURL}},
		{ID: "consent-par", Secret: secretValue, RedirectURIs: []string{callbackURL}, RequirePAR: true},
	}})
	for _, tc := range []struct {
		client string
		key    *dpop.Key
	}{
		{"consent", dpopKeyOf(t, dpop.ES256)},
		{"consent-par", dpopKeyOf(t, dpop.EdDSA)},
	} {
		t.Run(tc.client, func(t *testing.T) {
			ctx := context.Background()
			src, flow := newFlow(t, Config{Name: "bank", Issuer: as.Issuer, ClientID: tc.client, ClientSecret: secretValue, DPoP: tc.key}, &savingStore{},
				AuthCodeConfig{RedirectURIs: []string{callbackURL}, PAR: tc.client == "consent-par"})
			authURL, host, err := startLink(t, flow, "m1")
			if err != nil {
				t.Fatalf("Start: %v", err)
			}
			au, _ := url.Parse(authURL)
			if got := au.Query().Get("dpop_jkt"); tc.client == "consent" && got != tc.key.Thumbprint() {
				t.Errorf("the authorization URL's dpop_jkt is %q, want %s", got, tc.key.Thumbprint())
			}
			if tc.client == "consent-par" && !au.Query().Has("request_uri") {
				t.Fatalf("the provider requires PAR, the authorization URL has no request_uri: %s", au.Redacted())
			}
			code, state := as.Approve(t, &http.Client{Timeout: 10 * time.Second}, authURL)
			if _, err := flow.Callback(ctx, host, url.Values{"code": {code}, "state": {state}, "iss": {as.Issuer}}); err != nil {
				t.Fatalf("Callback: %v", err)
			}
			for i := range 2 {
				tok, err := brokerToken(t, src, broker.Request{Merchant: "m1"})
				if err != nil {
					t.Fatalf("refresh %d: %v", i, err)
				}
				requireBound(t, as, tok, tc.key)
			}
		})
	}
}

// TestDPoPWrongKeyCodeRefused: a code bound to one key (dpop_jkt) cannot
// be redeemed with proofs of another.
func TestDPoPWrongKeyCodeRefused(t *testing.T) {
	as := dpopas.Start(t, dpopas.Options{Clients: []dpopas.Client{{ID: "consent", Secret: secretValue, RedirectURIs: []string{callbackURL}}}})
	ctx := context.Background()
	mk := func(key *dpop.Key) (*RefreshToken, *AuthCode) {
		return newFlow(t, Config{Name: "bank", Issuer: as.Issuer, ClientID: "consent", ClientSecret: secretValue, DPoP: key}, &savingStore{}, AuthCodeConfig{RedirectURIs: []string{callbackURL}})
	}
	_, flow := mk(dpopKeyOf(t, dpop.EdDSA))
	authURL, _, err := startLink(t, flow, "m1")
	if err != nil {
		t.Fatal(err)
	}
	code, _ := as.Approve(t, &http.Client{Timeout: 10 * time.Second}, authURL)
	// Another key redeems the code, as a thief holding the code would.
	other, _ := mk(dpopKeyOf(t, dpop.ES256))
	grant := url.Values{"grant_type": {"authorization_code"}, "code": {code}, "redirect_uri": {callbackURL}}
	_, _, err = other.exchange(ctx, broker.Request{Merchant: "m1"}, grant, code)
	if err == nil {
		t.Fatal("a code bound to one key was redeemed with another's proofs")
	}
	var ae *broker.APIError
	if !errors.As(err, &ae) || ae.Code != "invalid_grant" {
		t.Errorf("err = %v, want invalid_grant", err)
	}
	checkNoSecrets(t, err, code, secretValue)
}
