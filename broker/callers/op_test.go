package callers

// A real OpenID provider for the caller-policy tests: zitadel's op
// (github.com/zitadel/oidc/v3/pkg/op) with its example in-memory storage,
// on 127.0.0.1, issuing RS256 JWT access tokens to service clients with
// client_credentials. issuerStorage overrides only the signing keys (so a
// test can rotate them) and the service clients; discovery, the key set
// endpoint, client authentication and token signing are zitadel's.

import (
	"context"
	"crypto/rand"
	"crypto/rsa"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"log"
	"log/slog"
	"math/big"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
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

// callerAudience is the audience the test issuer puts in its tokens.
const callerAudience = "token-broker"

// serviceClient is a caller registered at the issuer: its access tokens
// are JWTs whose sub is its id.
type serviceClient struct{ id, secret string }

func (c *serviceClient) GetID() string                       { return c.id }
func (c *serviceClient) RedirectURIs() []string              { return nil }
func (c *serviceClient) PostLogoutRedirectURIs() []string    { return nil }
func (c *serviceClient) ApplicationType() op.ApplicationType { return op.ApplicationTypeWeb }
func (c *serviceClient) AuthMethod() oidc.AuthMethod         { return oidc.AuthMethodPost }
func (c *serviceClient) ResponseTypes() []oidc.ResponseType  { return nil }
func (c *serviceClient) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeClientCredentials}
}
func (c *serviceClient) LoginURL(string) string               { return "" }
func (c *serviceClient) AccessTokenType() op.AccessTokenType  { return op.AccessTokenTypeJWT }
func (c *serviceClient) IDTokenLifetime() time.Duration       { return time.Hour }
func (c *serviceClient) DevMode() bool                        { return true }
func (c *serviceClient) IsScopeAllowed(string) bool           { return true }
func (c *serviceClient) IDTokenUserinfoClaimsAssertion() bool { return false }
func (c *serviceClient) ClockSkew() time.Duration             { return 0 }
func (c *serviceClient) RestrictAdditionalIdTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}
func (c *serviceClient) RestrictAdditionalAccessTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}

// rsaKey is one signing key of the issuer.
type rsaKey struct {
	id   string
	priv *rsa.PrivateKey
}

func (k *rsaKey) SignatureAlgorithm() jose.SignatureAlgorithm { return jose.RS256 }
func (k *rsaKey) Key() any                                    { return k.priv }
func (k *rsaKey) ID() string                                  { return k.id }

// publicRSAKey is a published key of the issuer's key set.
type publicRSAKey struct{ *rsaKey }

func (k publicRSAKey) Algorithm() jose.SignatureAlgorithm { return jose.RS256 }
func (k publicRSAKey) Use() string                        { return "sig" }
func (k publicRSAKey) Key() any                           { return &k.priv.PublicKey }

// issuerStorage is zitadel's example storage with rotatable signing keys
// and service clients.
type issuerStorage struct {
	*storage.Storage
	mu      sync.Mutex
	signing *rsaKey
	keys    []*rsaKey // published
	clients map[string]*serviceClient
}

func newRSAKey(t *testing.T) *rsaKey {
	priv, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return &rsaKey{id: uuid.NewString(), priv: priv}
}

func (s *issuerStorage) SigningKey(context.Context) (op.SigningKey, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.signing, nil
}

func (s *issuerStorage) SignatureAlgorithms(context.Context) ([]jose.SignatureAlgorithm, error) {
	return []jose.SignatureAlgorithm{jose.RS256}, nil
}

func (s *issuerStorage) KeySet(context.Context) ([]op.Key, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	keys := make([]op.Key, len(s.keys))
	for i, k := range s.keys {
		keys[i] = publicRSAKey{k}
	}
	return keys, nil
}

func (s *issuerStorage) ClientCredentials(_ context.Context, id, secret string) (op.Client, error) {
	c, ok := s.clients[id]
	if !ok || c.secret != secret {
		return nil, oidc.ErrInvalidClient().WithDescription("wrong client id or secret")
	}
	return c, nil
}

func (s *issuerStorage) ClientCredentialsTokenRequest(_ context.Context, id string, scopes []string) (op.TokenRequest, error) {
	if _, ok := s.clients[id]; !ok {
		return nil, oidc.ErrInvalidClient()
	}
	return &oidc.JWTTokenRequest{Subject: id, Audience: []string{callerAudience}, Scopes: scopes}, nil
}

// testIssuer is a running OpenID provider.
type testIssuer struct {
	URL string
	st  *issuerStorage
	// JWKSFetches and Discoveries count requests to the key set and to
	// the discovery document.
	JWKSFetches, Discoveries atomic.Int64
	// CAFile is the PEM file of the CA of its certificate (TLS only).
	CAFile string
	// keysHeld, when set, holds each key-set request until the channel
	// is closed or the request ends.
	keysHeld atomic.Pointer[chan struct{}]
}

// withdraw signs from now on with a new key and publishes only it: the
// key it signed with before is no longer the issuer's.
func (i *testIssuer) withdraw(t *testing.T) {
	k := newRSAKey(t)
	i.st.mu.Lock()
	defer i.st.mu.Unlock()
	i.st.signing = k
	i.st.keys = []*rsaKey{k}
}

// rotate signs from now on with a new key, published beside the old one.
func (i *testIssuer) rotate(t *testing.T) {
	k := newRSAKey(t)
	i.st.mu.Lock()
	defer i.st.mu.Unlock()
	i.st.signing = k
	i.st.keys = append(i.st.keys, k)
}

// token gets an access token (a JWT) for the service client id.
func (i *testIssuer) token(t *testing.T, client *http.Client, id string) string {
	t.Helper()
	resp, err := client.PostForm(i.URL+"/oauth/token", url.Values{"grant_type": {"client_credentials"},
		"client_id": {id}, "client_secret": {"secret-" + id}})
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	body, _ := io.ReadAll(resp.Body)
	var tok struct {
		AccessToken string `json:"access_token"`
	}
	if resp.StatusCode != 200 || json.Unmarshal(body, &tok) != nil || strings.Count(tok.AccessToken, ".") != 2 {
		t.Fatalf("token request: %d %s", resp.StatusCode, body)
	}
	return tok.AccessToken
}

// jwksJSON is the issuer's public key set, as its endpoint serves it.
func (i *testIssuer) jwksJSON(t *testing.T) []byte {
	i.st.mu.Lock()
	defer i.st.mu.Unlock()
	var set jose.JSONWebKeySet
	for _, k := range i.st.keys {
		set.Keys = append(set.Keys, jose.JSONWebKey{Key: &k.priv.PublicKey, KeyID: k.id, Algorithm: "RS256", Use: "sig"})
	}
	b, err := json.Marshal(set)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

var quietDefault sync.Once

// startIssuer starts zitadel's OP on 127.0.0.1 with service clients of
// the given ids (secret "secret-<id>"); withTLS serves HTTPS with a
// certificate from a CA of its own (not in the system roots).
func startIssuer(t *testing.T, withTLS bool, clients ...string) *testIssuer {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	scheme := "http"
	if withTLS {
		scheme = "https"
	}
	issuerURL := scheme + "://" + srv.Listener.Addr().String()
	k := newRSAKey(t)
	st := &issuerStorage{
		Storage: storage.NewStorageWithClients(storage.NewUserStore(issuerURL), map[string]*storage.Client{}),
		signing: k, keys: []*rsaKey{k}, clients: map[string]*serviceClient{},
	}
	for _, id := range clients {
		st.clients[id] = &serviceClient{id: id, secret: "secret-" + id}
	}
	var cryptoKey [32]byte
	if _, err := rand.Read(cryptoKey[:]); err != nil {
		t.Fatal(err)
	}
	quiet := slog.New(slog.NewTextHandler(io.Discard, nil))
	// zitadel logs its routes through slog's default logger.
	quietDefault.Do(func() { slog.SetDefault(quiet) })
	srv.Config.ErrorLog = log.New(io.Discard, "", 0) // TLS handshake errors of the trust tests
	opts := []op.Option{op.WithLogger(quiet)}
	if !withTLS {
		opts = append(opts, op.WithAllowInsecure())
	}
	provider, err := op.NewProvider(&op.Config{CryptoKey: cryptoKey, AuthMethodPost: true}, st, op.StaticIssuer(issuerURL), opts...)
	if err != nil {
		t.Fatal(err)
	}
	handler := op.RegisterLegacyServer(op.NewLegacyServer(provider, *op.DefaultEndpoints), op.AuthorizeCallbackHandler(provider),
		op.WithFallbackLogger(quiet))
	iss := &testIssuer{URL: issuerURL, st: st}
	srv.Config.Handler = http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/keys":
			iss.JWKSFetches.Add(1)
			if held := iss.keysHeld.Load(); held != nil {
				select {
				case <-*held:
				case <-r.Context().Done():
				}
			}
		case "/.well-known/openid-configuration":
			iss.Discoveries.Add(1)
		}
		handler.ServeHTTP(w, r)
	})
	if withTLS {
		leaf, caPEM := newCA(t, "127.0.0.1")
		srv.TLS = &tls.Config{Certificates: []tls.Certificate{leaf}}
		srv.StartTLS()
		iss.CAFile = filepath.Join(t.TempDir(), "issuer-ca.pem")
		if err := os.WriteFile(iss.CAFile, caPEM, 0o600); err != nil {
			t.Fatal(err)
		}
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return iss
}

// newCA makes a CA and a server certificate for ip signed by it.
func newCA(t *testing.T, ip string) (tls.Certificate, []byte) {
	t.Helper()
	caKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	caTmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test issuer CA"},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour), IsCA: true,
		KeyUsage: x509.KeyUsageCertSign, BasicConstraintsValid: true}
	caDER, err := x509.CreateCertificate(rand.Reader, caTmpl, caTmpl, &caKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(caDER)
	leafKey, _ := rsa.GenerateKey(rand.Reader, 2048)
	leafTmpl := &x509.Certificate{SerialNumber: big.NewInt(2), Subject: pkix.Name{CommonName: ip},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour),
		IPAddresses: []net.IP{net.ParseIP(ip)}, ExtKeyUsage: []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth},
		KeyUsage: x509.KeyUsageDigitalSignature}
	leafDER, err := x509.CreateCertificate(rand.Reader, leafTmpl, ca, &leafKey.PublicKey, caKey)
	if err != nil {
		t.Fatal(err)
	}
	return tls.Certificate{Certificate: [][]byte{leafDER}, PrivateKey: leafKey},
		pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: caDER})
}

// trusting is an HTTP client that trusts the CA in caFile.
func trusting(t *testing.T, caFile string) *http.Client {
	data, err := os.ReadFile(caFile)
	if err != nil {
		t.Fatal(err)
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(data) {
		t.Fatal(errors.New("no CA in " + caFile))
	}
	return &http.Client{Transport: &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}}
}
