// Package optest runs a real OpenID provider in tests: zitadel's
// (github.com/zitadel/oidc/v3/pkg/op) with its example in-memory storage,
// on 127.0.0.1, for the broker's own tests and the integration tests.
//
// Client authentication, grant handling, assertion verification (signature,
// aud, iss = sub, exp, iat), authorization-request validation (client,
// redirect URI, PKCE method), codes, ID tokens, token introspection and the
// error answers are zitadel's. Storage overrides what the example
// hard-codes (the clients, their secrets and keys) and keeps the tokens by
// grant. Around zitadel the server adds the strict defaults of a certified
// provider that zitadel leaves to its storage, and only those:
//
//   - PKCE (S256) for every client: an authorization request without a
//     code_challenge is refused (invalid_request), and a code exchange
//     without the verifier of a challenged code too (RFC 9700 §2.1.1);
//   - OpenID Connect Core §11: offline_access without prompt=consent is
//     dropped from the request, so the code gives no refresh token;
//   - pushed authorization requests (RFC 9126) with a PAR endpoint, required
//     per client registration (Client.RequirePAR, not advertised in
//     discovery: a plain authorization request of such a client is answered
//     invalid_request at its redirect URI), or for all clients and
//     advertised (Options.RequirePAR);
//   - RFC 7009 revocation of a refresh token revokes its whole grant: the
//     refresh token and every access token issued in it, which introspection
//     (RFC 7662) and the ResourceServer then see as inactive;
//   - RFC 9207 iss in authorization responses (Options.Iss);
//   - private_key_jwt on the client_credentials grant (zitadel checks only
//     a secret there) through zitadel's own op.AuthorizePrivateJWTKey;
//   - tls_client_auth (RFC 8705), which zitadel lacks: the server runs
//     behind a TLS listener that verifies client certificates, and answers
//     invalid_client when the certificate's subject is not the client_id;
//   - a login page for the merchant (Authorize plays its browser).
//
// The package is for tests only: nothing in the product imports it.
package optest

import (
	"context"
	"crypto"
	"errors"
	"slices"
	"sync"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/google/uuid"
	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// Client is a registered client of the test server.
type Client struct {
	// ID is the client_id.
	ID string
	// Secret is the client secret (client_secret_basic and _post).
	Secret string
	// Method is the registered token_endpoint_auth_method.
	Method oidc.AuthMethod
	// Keys are the private_key_jwt public keys, by kid.
	Keys map[string]crypto.PublicKey
	// TLS marks a tls_client_auth client.
	TLS bool
	// Redirects are the registered redirect URIs; default
	// https://merchant.example/cb.
	Redirects []string
	// RequirePAR makes the client's registration require pushed
	// authorization requests; the discovery document does not say so.
	RequirePAR bool
}

// AuthMethodTLS is RFC 8705's method, which zitadel has no constant for.
const AuthMethodTLS oidc.AuthMethod = "tls_client_auth"

// GetID implements op.Client.
func (c *Client) GetID() string { return c.ID }

// RedirectURIs implements op.Client.
func (c *Client) RedirectURIs() []string {
	if c.Redirects != nil {
		return c.Redirects
	}
	return []string{"https://merchant.example/cb"}
}

// PostLogoutRedirectURIs implements op.Client.
func (c *Client) PostLogoutRedirectURIs() []string { return nil }

// ApplicationType implements op.Client.
func (c *Client) ApplicationType() op.ApplicationType { return op.ApplicationTypeWeb }

// AuthMethod implements op.Client.
func (c *Client) AuthMethod() oidc.AuthMethod { return c.Method }

// ResponseTypes implements op.Client.
func (c *Client) ResponseTypes() []oidc.ResponseType {
	return []oidc.ResponseType{oidc.ResponseTypeCode}
}

// LoginURL implements op.Client.
func (c *Client) LoginURL(id string) string { return "/login?id=" + id }

// AccessTokenType implements op.Client.
func (c *Client) AccessTokenType() op.AccessTokenType { return op.AccessTokenTypeBearer }

// IDTokenLifetime implements op.Client.
func (c *Client) IDTokenLifetime() time.Duration { return time.Hour }

// DevMode implements op.Client: http redirect URIs are allowed.
func (c *Client) DevMode() bool { return true }

// IsScopeAllowed implements op.Client.
func (c *Client) IsScopeAllowed(string) bool { return true }

// IDTokenUserinfoClaimsAssertion implements op.Client.
func (c *Client) IDTokenUserinfoClaimsAssertion() bool { return false }

// ClockSkew implements op.Client.
func (c *Client) ClockSkew() time.Duration { return 0 }

// GrantTypes implements op.Client.
func (c *Client) GrantTypes() []oidc.GrantType {
	return []oidc.GrantType{oidc.GrantTypeClientCredentials, oidc.GrantTypeRefreshToken, oidc.GrantTypeCode}
}

// RestrictAdditionalIdTokenScopes implements op.Client.
func (c *Client) RestrictAdditionalIdTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}

// RestrictAdditionalAccessTokenScopes implements op.Client.
func (c *Client) RestrictAdditionalAccessTokenScopes() func([]string) []string {
	return func(s []string) []string { return s }
}

// accessToken is an issued access token.
type accessToken struct {
	client, subject, grant string
	scopes                 []string
	expiry                 time.Time
}

// refreshToken is a live refresh token and the grant it belongs to.
type refreshToken struct {
	storage.RefreshToken
	grant string
}

// Storage is zitadel's example storage with the test clients, and tokens
// kept by grant.
type Storage struct {
	*storage.Storage
	mu      sync.Mutex
	clients map[string]*Client
	refresh map[string]*refreshToken // by token
	access  map[string]*accessToken  // by token ID
}

func (s *Storage) client(id string) (*Client, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	c, ok := s.clients[id]
	if !ok {
		return nil, oidc.ErrInvalidClient().WithDescription("client not found")
	}
	return c, nil
}

// AddClient registers c (or replaces the client of the same ID).
func (s *Storage) AddClient(c *Client) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.clients[c.ID] = c
}

// GetClientByClientID implements op.Storage.
func (s *Storage) GetClientByClientID(_ context.Context, id string) (op.Client, error) {
	return s.client(id)
}

// AuthorizeClientIDSecret implements op.Storage.
func (s *Storage) AuthorizeClientIDSecret(_ context.Context, id, secret string) error {
	c, err := s.client(id)
	if err != nil {
		return err
	}
	if c.Secret == "" || c.Secret != secret {
		return errors.New("invalid secret")
	}
	return nil
}

// ClientCredentials authenticates the client_credentials grant. A
// tls_client_auth client has no secret: the mTLS gate has checked its
// certificate before the request got here.
func (s *Storage) ClientCredentials(_ context.Context, id, secret string) (op.Client, error) {
	c, err := s.client(id)
	if err != nil {
		return nil, err
	}
	switch {
	case c.TLS && secret == "":
	case c.Method == oidc.AuthMethodBasic || c.Method == oidc.AuthMethodPost:
		if c.Secret != secret {
			return nil, oidc.ErrInvalidClient().WithDescription("wrong client id or secret")
		}
	default:
		return nil, oidc.ErrInvalidClient().WithDescription("client not allowed to use a secret")
	}
	return c, nil
}

// ClientCredentialsTokenRequest implements op.ClientCredentialsStorage.
func (s *Storage) ClientCredentialsTokenRequest(_ context.Context, id string, scopes []string) (op.TokenRequest, error) {
	if _, err := s.client(id); err != nil {
		return nil, err
	}
	return &oidc.JWTTokenRequest{Subject: id, Audience: []string{id}, Scopes: scopes}, nil
}

// GetKeyByIDAndClientID implements op.Storage (private_key_jwt).
func (s *Storage) GetKeyByIDAndClientID(_ context.Context, kid, id string) (*jose.JSONWebKey, error) {
	c, err := s.client(id)
	if err != nil {
		return nil, err
	}
	k, ok := c.Keys[kid]
	if !ok {
		return nil, errors.New("key not found")
	}
	return &jose.JSONWebKey{KeyID: kid, Use: "sig", Key: k}, nil
}

// pushedKey marks the context of an authorization request that came
// through the PAR endpoint.
type pushedKey struct{}

// requirePARKey marks the context of a server that requires PAR of every
// client.
type requirePARKey struct{}

// CreateAuthRequest checks what a strict provider checks before it stores
// an authorization request: PKCE S256 for every client, PAR when the
// client's registration (or the server) requires it; and it drops
// offline_access unless prompt holds consent (OpenID Connect Core §11).
// A refusal is redirected to the client's (validated) redirect URI by
// zitadel.
func (s *Storage) CreateAuthRequest(ctx context.Context, req *oidc.AuthRequest, userID string) (op.AuthRequest, error) {
	c, err := s.client(req.ClientID)
	if err != nil {
		return nil, err
	}
	pushed, _ := ctx.Value(pushedKey{}).(bool)
	if all, _ := ctx.Value(requirePARKey{}).(bool); (c.RequirePAR || all) && !pushed {
		return nil, oidc.ErrInvalidRequest().WithDescription("pushed authorization requests (RFC 9126) are required for this client")
	}
	if req.CodeChallenge == "" || req.CodeChallengeMethod != oidc.CodeChallengeMethodS256 {
		return nil, oidc.ErrInvalidRequest().WithDescription("PKCE with code_challenge_method S256 is required")
	}
	if !slices.Contains(req.Prompt, oidc.PromptConsent) {
		req.Scopes = slices.DeleteFunc(slices.Clone(req.Scopes), func(s string) bool { return s == oidc.ScopeOfflineAccess })
	}
	return s.Storage.CreateAuthRequest(ctx, req, userID)
}

// newAccess stores an access token of grant and returns its ID.
func (s *Storage) newAccessLocked(client, subject, grant string, scopes []string) (string, time.Time) {
	id := uuid.NewString()
	exp := time.Now().Add(5 * time.Minute)
	s.access[id] = &accessToken{client: client, subject: subject, grant: grant, scopes: slices.Clone(scopes), expiry: exp}
	return id, exp
}

// clientOf returns the client_id of a token request.
func clientOf(req op.TokenRequest) string {
	switch r := req.(type) {
	case op.AuthRequest:
		return r.GetClientID()
	case op.RefreshTokenRequest:
		return r.GetClientID()
	case *oidc.JWTTokenRequest:
		return r.Subject
	}
	return ""
}

// CreateAccessToken implements op.Storage: an access token without a
// refresh token (client credentials, or a code without offline_access),
// in a grant of its own.
func (s *Storage) CreateAccessToken(_ context.Context, req op.TokenRequest) (string, time.Time, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	id, exp := s.newAccessLocked(clientOf(req), req.GetSubject(), uuid.NewString(), req.GetScopes())
	return id, exp, nil
}

// CreateAccessAndRefreshTokens implements op.Storage. A code starts a
// grant with its first refresh token; a refresh rotates the refresh token
// (the old one stops working) within the grant.
func (s *Storage) CreateAccessAndRefreshTokens(_ context.Context, req op.TokenRequest, current string) (string, string, time.Time, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if current == "" {
		grant := uuid.NewString()
		rt := s.newRefreshLocked(clientOf(req), req.GetSubject(), grant, req.GetScopes())
		id, exp := s.newAccessLocked(clientOf(req), req.GetSubject(), grant, req.GetScopes())
		return id, rt, exp, nil
	}
	t, ok := s.refresh[current]
	if !ok {
		return "", "", time.Time{}, oidc.ErrInvalidGrant().WithDescription("refresh token already used or unknown")
	}
	delete(s.refresh, current)
	next := s.newRefreshLocked(t.ApplicationID, t.UserID, t.grant, t.Scopes)
	id, exp := s.newAccessLocked(t.ApplicationID, t.UserID, t.grant, t.Scopes)
	return id, next, exp, nil
}

func (s *Storage) newRefreshLocked(client, subject, grant string, scopes []string) string {
	rt := uuid.NewString()
	s.refresh[rt] = &refreshToken{grant: grant, RefreshToken: storage.RefreshToken{ID: rt, Token: rt, ApplicationID: client,
		UserID: subject, Audience: []string{client}, Scopes: slices.Clone(scopes), AuthTime: time.Now(), Expiration: time.Now().Add(time.Hour)}}
	return rt
}

// SeedRefreshToken stores a refresh token, in a grant of its own, as if
// the merchant had just consented through the authorization-code flow.
func (s *Storage) SeedRefreshToken(clientID, subject string, scopes ...string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.newRefreshLocked(clientID, subject, uuid.NewString(), scopes)
}

// TokenRequestByRefreshToken implements op.Storage.
func (s *Storage) TokenRequestByRefreshToken(_ context.Context, rt string) (op.RefreshTokenRequest, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.refresh[rt]
	if !ok {
		return nil, errors.New("invalid refresh_token")
	}
	return storage.RefreshTokenRequestFromBusiness(&t.RefreshToken), nil
}

// GetRefreshTokenInfo implements op.Storage (RFC 7009 revocation).
func (s *Storage) GetRefreshTokenInfo(_ context.Context, clientID, rt string) (string, string, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.refresh[rt]
	if !ok || t.ApplicationID != clientID {
		return "", "", op.ErrInvalidRefreshToken
	}
	return t.UserID, t.ID, nil
}

// RevokeToken implements op.Storage (RFC 7009): a refresh token revokes
// its whole grant, an access token only itself. An unknown token is no
// error (RFC 7009 §2.2).
func (s *Storage) RevokeToken(_ context.Context, tokenOrID, _, clientID string) *oidc.Error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if t, ok := s.refresh[tokenOrID]; ok {
		if t.ApplicationID != clientID {
			return oidc.ErrInvalidClient().WithDescription("token was not issued for this client")
		}
		s.revokeGrantLocked(t.grant)
		return nil
	}
	if a, ok := s.access[tokenOrID]; ok {
		if a.client != clientID {
			return oidc.ErrInvalidClient().WithDescription("token was not issued for this client")
		}
		delete(s.access, tokenOrID)
	}
	return nil
}

func (s *Storage) revokeGrantLocked(grant string) {
	for k, t := range s.refresh {
		if t.grant == grant {
			delete(s.refresh, k)
		}
	}
	for k, a := range s.access {
		if a.grant == grant {
			delete(s.access, k)
		}
	}
}

// SetIntrospectionFromToken implements op.Storage (RFC 7662): a live
// access token is active, whichever registered client asks.
func (s *Storage) SetIntrospectionFromToken(_ context.Context, resp *oidc.IntrospectionResponse, tokenID, subject, _ string) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	a, ok := s.access[tokenID]
	if !ok || a.subject != subject || !time.Now().Before(a.expiry) {
		return errors.New("token is invalid or expired")
	}
	resp.Subject, resp.ClientID, resp.Scope = a.subject, a.client, a.scopes
	resp.Expiration = oidc.FromTime(a.expiry)
	return nil
}

// RefreshTokenValid reports whether rt is a live refresh token.
func (s *Storage) RefreshTokenValid(rt string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.refresh[rt]
	return ok
}

// RefreshTokens returns the live refresh tokens of clientID.
func (s *Storage) RefreshTokens(clientID string) []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []string
	for k, t := range s.refresh {
		if t.ApplicationID == clientID {
			out = append(out, k)
		}
	}
	return out
}

// CodeExchange makes zitadel's legacy server refuse a code exchange
// without the PKCE verifier when the authorization request had a
// challenge, as RFC 9700 §2.1.1 requires: zitadel checks the verifier of a
// confidential client only when one is sent (a PKCE downgrade).
func (s opServer) CodeExchange(ctx context.Context, r *op.ClientRequest[oidc.AccessTokenRequest]) (*op.Response, error) {
	authReq, err := op.AuthRequestByCode(ctx, s.Provider().Storage(), r.Data.Code)
	if err == nil && authReq.GetCodeChallenge() != nil && r.Data.CodeVerifier == "" {
		return nil, oidc.ErrInvalidRequest().WithDescription("code_verifier required")
	}
	return s.LegacyServer.CodeExchange(ctx, r)
}

// VerifyClient adds private_key_jwt for the client_credentials grant to
// zitadel's legacy server, through zitadel's own assertion check.
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

// opServer is zitadel's legacy server with the additions above.
type opServer struct {
	*op.LegacyServer
}
