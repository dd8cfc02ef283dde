package dpopas

import (
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"time"

	"github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// AccessToken is the content of an access token the server issued.
type AccessToken struct {
	jwt.Claims
	// ClientID is the client the token was issued to.
	ClientID string `json:"client_id"`
	// Scope is the granted scope, space separated.
	Scope string `json:"scope"`
	// Cnf is the confirmation claim: JKT is the RFC 7638 thumbprint of the
	// DPoP proof key the token is bound to.
	Cnf struct {
		JKT string `json:"jkt"`
	} `json:"cnf"`
}

// VerifyAccessToken checks an access token's signature with the server's
// JWKS, its issuer, audience (Server.Resource) and lifetime at now, and
// returns its claims.
func (s *Server) VerifyAccessToken(ctx context.Context, token string, now time.Time) (*AccessToken, error) {
	tok, err := jwt.ParseSigned(token, []jose.SignatureAlgorithm{jose.ES256})
	if err != nil {
		return nil, fmt.Errorf("the access token is no signed JWT: %w", err)
	}
	keys, err := s.keys(ctx)
	if err != nil {
		return nil, err
	}
	var at AccessToken
	if err := tok.Claims(keys, &at); err != nil {
		return nil, fmt.Errorf("the access token's signature does not verify with %s: %w", s.JWKSURL, err)
	}
	if err := at.ValidateWithLeeway(jwt.Expected{
		Issuer:      s.Issuer,
		AnyAudience: jwt.Audience{s.Resource},
		Time:        now,
	}, 0); err != nil {
		return nil, fmt.Errorf("the access token's claims: %w", err)
	}
	return &at, nil
}

// keys fetches the server's public signing keys.
func (s *Server) keys(ctx context.Context) (*jose.JSONWebKeySet, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.JWKSURL, nil)
	if err != nil {
		return nil, err
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("fetching the JWKS: %w", err)
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxPageSize))
	if err != nil {
		return nil, fmt.Errorf("reading the JWKS from %s: %w", s.JWKSURL, err)
	}
	if resp.StatusCode != http.StatusOK {
		return nil, fmt.Errorf("the JWKS at %s answered %s", s.JWKSURL, resp.Status)
	}
	var set jose.JSONWebKeySet
	if err := json.Unmarshal(body, &set); err != nil {
		return nil, fmt.Errorf("the JWKS at %s: %w", s.JWKSURL, err)
	}
	return &set, nil
}
