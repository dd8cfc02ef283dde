package oauth

import (
	"context"
	"crypto"
	"errors"
	"net"
	"net/http"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/pkg/oidc"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/optest"
)

// checkNoSecrets fails when err's text holds any of the secrets.
func checkNoSecrets(t *testing.T, err error, secrets ...string) {
	t.Helper()
	for _, s := range append(secrets, secretValue) {
		if s != "" && strings.Contains(err.Error(), s) {
			t.Errorf("the error reveals a secret: %v", err)
		}
	}
}

// TestClientAuthMethodsAgainstZitadel: each client authentication method
// obtains a token from a real authorization server, and the server's
// refusals come back as *broker.APIError without any secret.
func TestClientAuthMethodsAgainstZitadel(t *testing.T) {
	pki := newPKI(t)
	rsaK, ecK, otherK := testRSAKey(t), testECKey(t), testECKey(t)
	clients := []*optest.Client{
		{ID: "basic-client", Secret: secretValue, Method: oidc.AuthMethodBasic},
		{ID: "post-client", Secret: secretValue, Method: oidc.AuthMethodPost},
		{ID: "jwt-client", Method: oidc.AuthMethodPrivateKeyJWT, Keys: map[string]crypto.PublicKey{"rsa-1": rsaK.Public(), "ec-1": ecK.Public()}},
		{ID: "mtls-client", Method: optest.AuthMethodTLS, TLS: true},
	}
	plain := optest.Start(t, optest.Options{}, clients...)
	mtls := optest.Start(t, optest.Options{TLS: &pki.Server, ClientCAs: pki.Pool}, clients...)

	type row struct {
		name    string
		srv     *optest.Server
		cfg     Config
		wantErr string // the APIError code, "" for success
	}
	plainCfg := func(id string, m AuthMethod, secret broker.Secret) Config {
		return Config{TokenURL: plain.URL + "/oauth/token", ClientID: id, AuthMethod: m, ClientSecret: secret}
	}
	jwtCfg := func(s *Signer, aud string) Config {
		c := plainCfg("jwt-client", PrivateKeyJWT, "")
		c.Signer, c.AssertionAudience = s, aud
		return c
	}
	mtlsCfg := func(client *http.Client) Config {
		return Config{TokenURL: mtls.URL + "/oauth/token", ClientID: "mtls-client", AuthMethod: TLSClientAuth, Client: client}
	}
	// zitadel checks that aud holds its issuer (RFC 7523 §3 allows the
	// issuer or the token endpoint), hence AssertionAudience.
	rows := []row{
		{"client_secret_basic", plain, plainCfg("basic-client", ClientSecretBasic, secretValue), ""},
		{"client_secret_post", plain, plainCfg("post-client", ClientSecretPost, secretValue), ""},
		{"private_key_jwt PS256", plain, jwtCfg(mustSigner(t, rsaK, PS256, "rsa-1"), plain.URL), ""},
		{"private_key_jwt RS256", plain, jwtCfg(mustSigner(t, rsaK, RS256, "rsa-1"), plain.URL), ""},
		{"private_key_jwt ES256", plain, jwtCfg(mustSigner(t, ecK, "", "ec-1"), plain.URL), ""},
		{"tls_client_auth", mtls, mtlsCfg(pki.client(t, "mtls-client")), ""},

		{"basic: wrong secret", plain, plainCfg("basic-client", ClientSecretBasic, secretValue+"x"), "invalid_client"},
		{"post: wrong secret", plain, plainCfg("post-client", ClientSecretPost, "wrong-"+secretValue), "invalid_client"},
		{"basic: unknown client", plain, plainCfg("nobody", ClientSecretBasic, secretValue), "invalid_client"},
		{"private_key_jwt: wrong audience", plain, jwtCfg(mustSigner(t, rsaK, PS256, "rsa-1"), "https://elsewhere.example"), "invalid_grant|invalid_client"},
		{"private_key_jwt: unregistered key", plain, jwtCfg(mustSigner(t, otherK, ES256, "ec-1"), plain.URL), "invalid_grant|invalid_client"},
		// A client from httpclient.New without a certificate is
		// refused by NewClientCredentials; behind a transport it cannot
		// see into, the server's refusal is what is checked.
		{"tls_client_auth: no client certificate", mtls, mtlsCfg(opaqueClient(pki.client(t, ""))), "invalid_client"},
		{"tls_client_auth: another client's certificate", mtls, mtlsCfg(pki.client(t, "someone-else")), "invalid_client"},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			cfg := tc.cfg
			if cfg.Client == nil && tc.srv == mtls {
				t.Fatal("mtls rows need a client")
			}
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			before := time.Now()
			tok, err := src.Token(context.Background(), broker.Request{Merchant: "m", Scopes: []string{"payments"}})
			if tc.wantErr == "" {
				if err != nil {
					t.Fatalf("Token: %v", err)
				}
				if tok.Value == "" || !strings.EqualFold(tok.Type, "bearer") {
					t.Errorf("token %+v", tok)
				}
				// zitadel's example storage issues 5-minute tokens.
				if d := tok.Expiry.Sub(before); d < 4*time.Minute || d > 6*time.Minute {
					t.Errorf("expiry in %s, want about 5m (the provider's, not shortened)", d)
				}
				return
			}
			var ae *broker.APIError
			if !errors.As(err, &ae) {
				t.Fatalf("err = %T %v, want *broker.APIError", err, err)
			}
			if !matchesAny(ae.Code, tc.wantErr) || ae.StatusCode < 400 || ae.Provider != "oauth2" {
				t.Errorf("APIError %+v, want code %s", ae, tc.wantErr)
			}
			if broker.IsTemporary(err) {
				t.Errorf("a refusal counts as temporary: %v", err)
			}
			checkNoSecrets(t, err)
		})
	}
}

func matchesAny(code, alternatives string) bool {
	for _, a := range strings.Split(alternatives, "|") {
		if code == a {
			return true
		}
	}
	return false
}

// TestDiscoveryAgainstZitadel: configured by issuer, the source reads the
// token and revocation endpoints from the discovery document; a failed
// discovery (server answering 503, or not listening) is retried on the
// next call, not cached.
func TestDiscoveryAgainstZitadel(t *testing.T) {
	srv := optest.Start(t, optest.Options{}, &optest.Client{ID: "c", Secret: secretValue, Method: oidc.AuthMethodBasic})
	src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()

	srv.DiscoveryStatus.Store(http.StatusServiceUnavailable)
	_, err = src.Token(ctx, broker.Request{Merchant: "m"})
	var de *DiscoveryError
	if !errors.As(err, &de) || de.Issuer != srv.URL || !broker.IsTemporary(err) {
		t.Fatalf("Token with discovery down = %v, want a temporary *DiscoveryError", err)
	}
	checkNoSecrets(t, err)

	srv.DiscoveryStatus.Store(0)
	tok, err := src.Token(ctx, broker.Request{Merchant: "m"})
	if err != nil || tok.Value == "" {
		t.Fatalf("Token after discovery came back = %v", err)
	}
	ep, err := src.ep.get(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ep.Token != srv.URL+"/oauth/token" || ep.Revocation != srv.URL+"/revoke" || !ep.supports(ClientSecretBasic) {
		t.Errorf("endpoints = %+v", ep)
	}
}

// TestDiscoveryServerDownThenUp: at first the issuer's address drops every
// connection (as a host that is down would); then the authorization server
// answers on it.
func TestDiscoveryServerDownThenUp(t *testing.T) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	dl := &droppingListener{Listener: ln}
	dl.down.Store(true)
	srv := optest.Start(t, optest.Options{Listener: dl}, &optest.Client{ID: "c", Secret: secretValue, Method: oidc.AuthMethodBasic})
	src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := src.Token(context.Background(), broker.Request{Merchant: "m"}); err == nil || !broker.IsTemporary(err) {
		t.Fatalf("Token with the issuer down = %v, want a temporary error", err)
	}
	dl.down.Store(false)
	if _, err := src.Token(context.Background(), broker.Request{Merchant: "m"}); err != nil {
		t.Fatalf("Token once the issuer is up = %v", err)
	}
}

// droppingListener closes every connection it accepts while down.
type droppingListener struct {
	net.Listener
	down atomic.Bool
}

func (l *droppingListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil || !l.down.Load() {
			return c, err
		}
		c.Close()
	}
}

// refreshFixture is a zitadel server with one client and a store seeded
// with a merchant's refresh token.
type refreshFixture struct {
	srv   *optest.Server
	store *MemoryStore
	cfg   Config
	rt0   string
}

const refreshMerchant = "acme"

func newRefreshFixture(t *testing.T, method AuthMethod) *refreshFixture {
	t.Helper()
	k := testRSAKey(t)
	c := &optest.Client{ID: "bank-client", Secret: secretValue, Method: oidc.AuthMethodBasic}
	cfg := Config{Name: "bank", ClientID: c.ID, ClientSecret: secretValue}
	if method == PrivateKeyJWT {
		c.Secret, c.Method, c.Keys = "", oidc.AuthMethodPrivateKeyJWT, map[string]crypto.PublicKey{"k1": k.Public()}
		cfg.ClientSecret, cfg.AuthMethod, cfg.Signer = "", PrivateKeyJWT, mustSigner(t, k, PS256, "k1")
	}
	srv := optest.Start(t, optest.Options{}, c)
	cfg.TokenURL = srv.URL + "/oauth/token"
	if method == PrivateKeyJWT {
		cfg.AssertionAudience = srv.URL
	}
	f := &refreshFixture{srv: srv, store: &MemoryStore{}, cfg: cfg}
	f.rt0 = srv.Storage.SeedRefreshToken(c.ID, "id1", "openid", "accounts")
	if err := f.store.Save(context.Background(), StoreKey(f.cfg, refreshMerchant), broker.Secret(f.rt0)); err != nil {
		t.Fatal(err)
	}
	return f
}

func (f *refreshFixture) source(t *testing.T, store Store) *RefreshToken {
	t.Helper()
	s, err := NewRefreshToken(f.cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	return s
}

func (f *refreshFixture) stored(t *testing.T) string {
	t.Helper()
	rt, err := f.store.Load(context.Background(), StoreKey(f.cfg, refreshMerchant))
	if err != nil {
		t.Fatal(err)
	}
	return rt.Reveal()
}

// TestRefreshRotationAgainstZitadel: the server rotates refresh tokens;
// the new one is in the store when Token returns, the old one is dead, and
// a new source instance on the same store (a restart) goes on refreshing.
func TestRefreshRotationAgainstZitadel(t *testing.T) {
	for _, m := range []AuthMethod{ClientSecretBasic, PrivateKeyJWT} {
		t.Run(string(m), func(t *testing.T) {
			f := newRefreshFixture(t, m)
			req := broker.Request{Merchant: refreshMerchant, Scopes: []string{"accounts"}}
			tok, err := f.source(t, f.store).Token(context.Background(), req)
			if err != nil {
				t.Fatalf("first refresh: %v", err)
			}
			rt1 := f.stored(t)
			if tok.Value == "" || rt1 == f.rt0 || !f.srv.Storage.RefreshTokenValid(rt1) || f.srv.Storage.RefreshTokenValid(f.rt0) {
				t.Fatalf("after the first refresh: stored %q (was %q), valid %v", rt1, f.rt0, f.srv.Storage.RefreshTokenValid(rt1))
			}

			// A restart: a new source, the same store.
			tok2, err := f.source(t, f.store).Token(context.Background(), req)
			if err != nil {
				t.Fatalf("refresh after restart: %v", err)
			}
			if rt2 := f.stored(t); rt2 == rt1 || !f.srv.Storage.RefreshTokenValid(rt2) || tok2.Value == tok.Value {
				t.Errorf("after the second refresh: stored %q, valid %v", rt2, f.srv.Storage.RefreshTokenValid(rt2))
			}
			if n := f.srv.Count("refresh_token"); n != 2 {
				t.Errorf("%d refresh requests, want 2", n)
			}
		})
	}
}

// TestRefreshConcurrent: concurrent Token calls for one merchant send one
// refresh request.
func TestRefreshConcurrent(t *testing.T) {
	const n = 8
	f := newRefreshFixture(t, ClientSecretBasic)
	// The server blocks the refresh until every call is in Token, waiting
	// on the merchant's lock.
	cs := &countingStore{MemoryStore: f.store, n: n, all: make(chan struct{})}
	f.srv.BeforeToken = func(*http.Request) {
		select {
		case <-cs.all:
		case <-time.After(10 * time.Second):
		}
	}
	src := f.source(t, cs)
	req := broker.Request{Merchant: refreshMerchant, Scopes: []string{"accounts"}}
	var wg sync.WaitGroup
	toks := make([]broker.Token, n)
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			toks[i], errs[i] = src.Token(context.Background(), req)
		}()
	}
	wg.Wait()
	for i := range n {
		if errs[i] != nil {
			t.Fatalf("call %d: %v", i, errs[i])
		}
		if toks[i].Value != toks[0].Value {
			t.Errorf("call %d got another token", i)
		}
	}
	if got := f.srv.Count("refresh_token"); got != 1 {
		t.Errorf("%d refresh requests for %d concurrent calls, want 1", got, n)
	}
}

// countingStore closes all once n calls have asked for the lock.
type countingStore struct {
	*MemoryStore
	n, calls int
	mu       sync.Mutex
	all      chan struct{}
}

func (s *countingStore) Lock(ctx context.Context, key string) (func(), error) {
	s.mu.Lock()
	if s.calls++; s.calls == s.n {
		close(s.all)
	}
	s.mu.Unlock()
	return s.MemoryStore.Lock(ctx, key)
}

// TestRefreshInvalidGrant: a refused or missing refresh token is a
// permanent ConsentRequiredError that says what to do and shows no token.
func TestRefreshInvalidGrant(t *testing.T) {
	f := newRefreshFixture(t, ClientSecretBasic)
	const dead = "rt-DEAD-refresh-token-77"
	for _, tc := range []struct {
		name  string
		setup func(*MemoryStore)
		cause func(error) bool
	}{
		{"revoked token", func(s *MemoryStore) { s.Save(context.Background(), StoreKey(f.cfg, refreshMerchant), dead) },
			func(err error) bool {
				var ae *broker.APIError
				return errors.As(err, &ae) && ae.Code == "invalid_grant"
			}},
		{"no token stored", func(*MemoryStore) {}, func(err error) bool { return errors.Is(err, ErrNoRefreshToken) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			store := &MemoryStore{}
			tc.setup(store)
			_, err := f.source(t, store).Token(context.Background(), broker.Request{Merchant: refreshMerchant})
			var ce *ConsentRequiredError
			if !errors.As(err, &ce) || ce.Merchant != refreshMerchant || !tc.cause(err) {
				t.Fatalf("err = %T %v", err, err)
			}
			if !strings.Contains(err.Error(), "must consent again") || !strings.Contains(err.Error(), "load the new refresh token") {
				t.Errorf("message does not say what to do: %v", err)
			}
			if broker.IsTemporary(err) {
				t.Errorf("consent errors must be permanent")
			}
			checkNoSecrets(t, err, dead)
		})
	}
}

// failingStore fails Save while fail is set.
type failingStore struct {
	*MemoryStore
	mu   sync.Mutex
	fail bool
}

func (s *failingStore) Save(ctx context.Context, key string, rt broker.Secret) error {
	s.mu.Lock()
	fail := s.fail
	s.mu.Unlock()
	if fail {
		return errors.New("disk full")
	}
	return s.MemoryStore.Save(ctx, key, rt)
}

// TestRefreshSaveFailure: when the rotated token cannot be saved, no access
// token is handed out; the rotated token is kept and saved on the next
// call, which then succeeds.
func TestRefreshSaveFailure(t *testing.T) {
	f := newRefreshFixture(t, ClientSecretBasic)
	fs := &failingStore{MemoryStore: f.store, fail: true}
	src := f.source(t, fs)
	req := broker.Request{Merchant: refreshMerchant}
	tok, err := src.Token(context.Background(), req)
	var se *SaveError
	if !errors.As(err, &se) || tok.Value != "" {
		t.Fatalf("Token = %v, %v; want a SaveError and no token", tok, err)
	}
	if f.stored(t) != f.rt0 {
		t.Fatal("the store changed although Save failed")
	}
	fs.mu.Lock()
	fs.fail = false
	fs.mu.Unlock()
	if _, err := src.Token(context.Background(), req); err != nil {
		t.Fatalf("Token after the store recovered: %v", err)
	}
	if rt := f.stored(t); rt == f.rt0 || !f.srv.Storage.RefreshTokenValid(rt) {
		t.Errorf("stored refresh token %q is not the live one", rt)
	}
}

// TestRevokeRefreshTokenAgainstZitadel: RFC 7009 revocation of the stored
// refresh token; the next refresh needs consent.
func TestRevokeRefreshTokenAgainstZitadel(t *testing.T) {
	f := newRefreshFixture(t, ClientSecretBasic)
	// The revocation endpoint is discovered. The refresh token is stored
	// for the issuer: one stored for a token_url is not sent elsewhere.
	f.cfg.TokenURL, f.cfg.Issuer = "", f.srv.URL
	if err := f.store.Save(context.Background(), StoreKey(f.cfg, refreshMerchant), broker.Secret(f.rt0)); err != nil {
		t.Fatal(err)
	}
	src := f.source(t, f.store)
	if err := src.Revoke(context.Background(), broker.Secret(f.rt0), "refresh_token"); err != nil {
		t.Fatalf("Revoke: %v", err)
	}
	if f.srv.Storage.RefreshTokenValid(f.rt0) {
		t.Fatal("the refresh token is still valid after revocation")
	}
	_, err := src.Token(context.Background(), broker.Request{Merchant: refreshMerchant})
	var ce *ConsentRequiredError
	if !errors.As(err, &ce) {
		t.Errorf("Token after revocation = %v", err)
	}
}

// opaqueClient hides c's transport behind a wrapper that
// httpclient.HasClientCert cannot see into.
func opaqueClient(c *http.Client) *http.Client {
	cc := *c
	cc.Transport = opaqueTransport{c.Transport}
	return &cc
}

type opaqueTransport struct{ rt http.RoundTripper }

func (o opaqueTransport) RoundTrip(r *http.Request) (*http.Response, error) { return o.rt.RoundTrip(r) }
