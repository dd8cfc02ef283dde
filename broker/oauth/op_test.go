package oauth

// A real authorization server for the tests: zitadel's OpenID provider
// (github.com/zitadel/oidc/v3/pkg/op) with its example in-memory storage,
// on 127.0.0.1. testStorage overrides only what the example hard-codes:
// the clients, their secrets and keys, and the refresh tokens (seeded by
// the tests instead of an interactive authorization-code flow). Client
// authentication, grant handling, assertion verification (signature, aud,
// iss = sub, exp, iat), error answers and refresh-token rotation logic are
// zitadel's.
//
// Two things zitadel does not do are added around it, and only those:
//   - private_key_jwt on the client_credentials grant: zitadel's
//     VerifyClient checks a client_credentials request's client_id and
//     secret only, so opServer.VerifyClient hands requests that carry a
//     client assertion to zitadel's own op.AuthorizePrivateJWTKey;
//   - tls_client_auth (RFC 8705): zitadel has no mTLS client
//     authentication, so the tests run it behind a TLS listener that
//     verifies client certificates, and mtlsGate answers invalid_client
//     when the certificate's subject is not the client_id.

import (
	"context"
	"crypto"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"os"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/google/uuid"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// testClient is a registered client of the test server.
type testClient struct {
	id     string
	secret string
	method oidc.AuthMethod
	keys   map[string]crypto.PublicKey // private_key_jwt: by kid
	tls    bool                        // tls_client_auth
	// redirects are the registered redirect URIs (authorization-code
	// tests); default https://merchant.example/cb.
	redirects []string
}

func (c *testClient) GetID() string { return c.id }
func (c *testClient) RedirectURIs() []string {
	if c.redirects != nil {
		return c.redirects
	}
	return []string{"https://merchant.example/cb"}
}
func (c *testClient) PostLogoutRedirectURIs() []string    { return nil }
func (c *testClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeWeb }
func (c *testClient) AuthMethod() oidc.AuthMethod         { return c.method }
func (c *testClient) ResponseTypes() []oidc.ResponseType {
	return []oidc.ResponseType{oidc.ResponseTypeCode}
}
func (c *testClient) LoginURL(id string) string            { return "/login?id=" + id }
func (c *testClient) AccessTokenType() op.AccessTokenType  { return op.AccessTokenTypeBearer }
func (c *testClient) IDTokenLifetime() time.Duration       { return time.Hour }
func (c *testClient) DevMode() bool                        { return true }
func (c *testClient) IsScopeAllowed(string) bool           { return true }
func (c *testClient) IDTokenUserinfoClaimsAssertion() bool { return false }
func (c *testClient) ClockSkew() time.Duration             { return 0 }
func (c *testClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeClientCredentials, oidc.GrantTypeRefreshToken, oidc.GrantTypeCode}
}
func (c *testClient) RestrictAdditionalIdTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}
func (c *testClient) RestrictAdditionalAccessTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}

// testStorage is zitadel's example storage with test clients and seeded,
// rotating refresh tokens.
type testStorage struct {
	*storage.Storage
	mu      sync.Mutex
	clients map[string]*testClient
	refresh map[string]*storage.RefreshToken
}

func (s *testStorage) client(id string) (*testClient, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.clients[id]
	if !ok {
		return nil, oidc.ErrInvalidClient().WithDescription("client not found")
	}
	return c, nil
}

func (s *testStorage) GetClientByClientID(_ context.Context, id string) (op.Client, error) {
	return s.client(id)
}

func (s *testStorage) AuthorizeClientIDSecret(_ context.Context, id, secret string) error {
	c, err := s.client(id)
	if err != nil {
		return err
	}
	if c.secret == "" || c.secret != secret {
		return errors.New("invalid secret")
	}
	return nil
}

// ClientCredentials authenticates the client_credentials grant. A
// tls_client_auth client has no secret: mtlsGate has checked its
// certificate before the request got here.
func (s *testStorage) ClientCredentials(_ context.Context, id, secret string) (op.Client, error) {
	c, err := s.client(id)
	if err != nil {
		return nil, err
	}
	switch {
	case c.tls && secret == "":
	case c.method == oidc.AuthMethodBasic || c.method == oidc.AuthMethodPost:
		if c.secret != secret {
			return nil, oidc.ErrInvalidClient().WithDescription("wrong client id or secret")
		}
	default:
		return nil, oidc.ErrInvalidClient().WithDescription("client not allowed to use a secret")
	}
	return c, nil
}

func (s *testStorage) ClientCredentialsTokenRequest(_ context.Context, id string, scopes []string) (op.TokenRequest, error) {
	if _, err := s.client(id); err != nil {
		return nil, err
	}
	return &oidc.JWTTokenRequest{Subject: id, Audience: []string{id}, Scopes: scopes}, nil
}

func (s *testStorage) GetKeyByIDAndClientID(_ context.Context, kid, id string) (*jose.JSONWebKey, error) {
	c, err := s.client(id)
	if err != nil {
		return nil, err
	}
	k, ok := c.keys[kid]
	if !ok {
		return nil, errors.New("key not found")
	}
	return &jose.JSONWebKey{KeyID: kid, Use: "sig", Key: k}, nil
}

// seedRefreshToken stores a refresh token as if the merchant had just
// consented through the authorization-code flow.
func (s *testStorage) seedRefreshToken(clientID, subject string, scopes ...string) string {
	rt := uuid.NewString()
	s.mu.Lock()
	defer s.mu.Unlock()
	s.refresh[rt] = &storage.RefreshToken{ID: rt, Token: rt, ApplicationID: clientID, UserID: subject,
		Audience: []string{clientID}, Scopes: scopes, AuthTime: time.Now(), Expiration: time.Now().Add(time.Hour)}
	return rt
}

func (s *testStorage) TokenRequestByRefreshToken(_ context.Context, rt string) (op.RefreshTokenRequest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.refresh[rt]
	if !ok {
		return nil, errors.New("invalid refresh_token")
	}
	return storage.RefreshTokenRequestFromBusiness(t), nil
}

// CreateAccessAndRefreshTokens rotates the refresh token: the old one
// stops working.
func (s *testStorage) CreateAccessAndRefreshTokens(_ context.Context, req op.TokenRequest, current string) (string, string, time.Time, error) {
	if current == "" { // the authorization-code grant: a first refresh token
		rt := s.seedRefreshToken(req.(op.AuthRequest).GetClientID(), req.GetSubject(), req.GetScopes()...)
		return uuid.NewString(), rt, time.Now().Add(5 * time.Minute), nil
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.refresh[current]
	if !ok {
		return "", "", time.Time{}, oidc.ErrInvalidGrant().WithDescription("refresh token already used or unknown")
	}
	delete(s.refresh, current)
	next := uuid.NewString()
	cp := *t
	cp.ID, cp.Token = next, next
	s.refresh[next] = &cp
	return uuid.NewString(), next, time.Now().Add(5 * time.Minute), nil
}

// GetRefreshTokenInfo and RevokeToken serve RFC 7009 revocation of the
// seeded refresh tokens.
func (s *testStorage) GetRefreshTokenInfo(_ context.Context, clientID, rt string) (string, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.refresh[rt]
	if !ok || t.ApplicationID != clientID {
		return "", "", op.ErrInvalidRefreshToken
	}
	return t.UserID, t.ID, nil
}

func (s *testStorage) RevokeToken(ctx context.Context, tokenOrID, userID, clientID string) *oidc.Error {
	s.mu.Lock()
	t, ok := s.refresh[tokenOrID]
	if ok && t.ApplicationID == clientID {
		delete(s.refresh, tokenOrID)
	}
	s.mu.Unlock()
	if ok {
		return nil
	}
	return s.Storage.RevokeToken(ctx, tokenOrID, userID, clientID)
}

// refreshTokenValid reports whether rt is a live refresh token.
func (s *testStorage) refreshTokenValid(rt string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.refresh[rt]
	return ok
}

// opServer adds private_key_jwt for the client_credentials grant to
// zitadel's legacy server, through zitadel's own assertion check.
type opServer struct {
	*op.LegacyServer
}

func (s opServer) VerifyClient(ctx context.Context, r *op.Request[op.ClientCredentials]) (op.Client, error) {
	if oidc.GrantType(r.Form.Get("grant_type")) == oidc.GrantTypeClientCredentials &&
		r.Data.ClientAssertionType == oidc.ClientAssertionTypeJWTAssertion {
		if r.Data.ClientSecret != "" {
			return nil, oidc.ErrInvalidRequest().WithDescription("client authentication must not use more than one method")
		}
		return op.AuthorizePrivateJWTKey(ctx, r.Data.ClientAssertion, s.Provider().(op.JWTAuthorizationGrantExchanger))
	}
	return s.LegacyServer.VerifyClient(ctx, r)
}

// quiet drops zitadel's logs.
var quiet = slog.New(slog.NewTextHandler(io.Discard, nil))

// authMethodTLS is RFC 8705's method, which zitadel has no constant for.
const authMethodTLS oidc.AuthMethod = "tls_client_auth"

// testOP is a running authorization server.
type testOP struct {
	URL     string // the issuer
	Storage *testStorage
	Server  *httptest.Server
	// Requests counts token requests by grant_type.
	Requests sync.Map // grant_type -> *atomic.Int64
	// CAPool trusts the server's certificate (TLS servers only).
	CAPool *x509.CertPool
	// DiscoveryDown makes the discovery document answer 503.
	DiscoveryDown atomic.Bool
	// BeforeToken, when set (before any request), runs before each token
	// request is handled.
	BeforeToken func(*http.Request)
}

func (o *testOP) count(grant string) int64 {
	v, _ := o.Requests.LoadOrStore(grant, new(atomic.Int64))
	return v.(*atomic.Int64).Load()
}

// opOptions select the server's transport.
type opOptions struct {
	// tls serves HTTPS with the given server certificate; clientCAs
	// verifies client certificates when given (tls_client_auth).
	tls       *tls.Certificate
	clientCAs *x509.CertPool
	// ln is the listener to serve on; default a new one on 127.0.0.1.
	ln net.Listener
	// wrap, when set, wraps the server's handler (authorization-code
	// tests: login page, PAR).
	wrap func(p *op.Provider, st *testStorage, h http.Handler) http.Handler
}

// startOPOn starts a plain-HTTP OP on ln.
func startOPOn(t *testing.T, ln net.Listener, clients ...*testClient) *testOP {
	return startOP(t, opOptions{ln: ln}, clients...)
}

// startOP starts zitadel's OP on 127.0.0.1 with the given clients.
func startOP(t *testing.T, o opOptions, clients ...*testClient) *testOP {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	if o.ln != nil {
		srv.Listener.Close()
		srv.Listener = o.ln
	}
	scheme := "http"
	if o.tls != nil {
		scheme = "https"
	}
	issuer := scheme + "://" + srv.Listener.Addr().String()

	st := &testStorage{
		Storage: storage.NewStorageWithClients(storage.NewUserStore(issuer), map[string]*storage.Client{}),
		clients: map[string]*testClient{},
		refresh: map[string]*storage.RefreshToken{},
	}
	for _, c := range clients {
		st.clients[c.id] = c
	}
	var key [32]byte
	if _, err := rand.Read(key[:]); err != nil {
		t.Fatal(err)
	}
	cfg := &op.Config{
		CryptoKey:               key,
		CodeMethodS256:          true,
		AuthMethodPost:          true,
		AuthMethodPrivateKeyJWT: true,
		GrantTypeRefreshToken:   true,
	}
	opts := []op.Option{op.WithLogger(quiet)}
	if scheme == "http" {
		opts = append(opts, op.WithAllowInsecure())
	}
	provider, err := op.NewProvider(cfg, st, op.StaticIssuer(issuer), opts...)
	if err != nil {
		t.Fatal(err)
	}
	handler := op.RegisterLegacyServer(opServer{op.NewLegacyServer(provider, *op.DefaultEndpoints)}, op.AuthorizeCallbackHandler(provider),
		op.WithFallbackLogger(quiet))

	top := &testOP{URL: issuer, Storage: st, Server: srv}
	if o.wrap != nil {
		handler = o.wrap(provider, st, handler)
	}
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path == "/.well-known/openid-configuration" && top.DiscoveryDown.Load() {
			http.Error(w, "discovery is down", http.StatusServiceUnavailable)
			return
		}
		if r.URL.Path == "/oauth/token" {
			if err := r.ParseForm(); err != nil {
				http.Error(w, "bad form", http.StatusBadRequest)
				return
			}
			v, _ := top.Requests.LoadOrStore(r.PostForm.Get("grant_type"), new(atomic.Int64))
			v.(*atomic.Int64).Add(1)
			if top.BeforeToken != nil {
				top.BeforeToken(r)
			}
			if !mtlsGate(w, r, st) {
				return
			}
		}
		handler.ServeHTTP(w, r)
	})
	if o.tls != nil {
		srv.TLS = &tls.Config{Certificates: []tls.Certificate{*o.tls}}
		if o.clientCAs != nil {
			srv.TLS.ClientAuth = tls.VerifyClientCertIfGiven
			srv.TLS.ClientCAs = o.clientCAs
		}
		srv.StartTLS()
		top.CAPool = x509.NewCertPool()
		top.CAPool.AddCert(o.tls.Leaf)
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return top
}

// mtlsGate is the RFC 8705 §2.1 check zitadel lacks: a tls_client_auth
// client must present a verified certificate whose subject CN is its
// client_id. It answers invalid_client otherwise.
func mtlsGate(w http.ResponseWriter, r *http.Request, st *testStorage) bool {
	c, err := st.client(r.PostForm.Get("client_id"))
	if err != nil || !c.tls {
		return true
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && r.TLS.PeerCertificates[0].Subject.CommonName == c.id {
		return true
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusUnauthorized)
	fmt.Fprint(w, `{"error":"invalid_client","error_description":"a client certificate for this client is required"}`)
	return false
}

// TestMain silences the logs zitadel writes through slog's default logger
// when it registers its routes.
func TestMain(m *testing.M) {
	slog.SetDefault(quiet)
	os.Exit(m.Run())
}
