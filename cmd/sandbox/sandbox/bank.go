package sandbox

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/subtle"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
)

// BankClient is a client registered at the bank's OAuth 2.0 authorization
// server. A client with a Secret may authenticate with client_secret_basic
// or client_secret_post; one with a PublicKeyPEM with private_key_jwt.
type BankClient struct {
	// ID is the client_id.
	ID string
	// Secret is the client_secret; empty disables the client_secret_*
	// methods.
	Secret string
	// PublicKeyPEM is the client's public key ("PUBLIC KEY", "RSA PUBLIC
	// KEY") or certificate ("CERTIFICATE"), RSA or EC P-256, that verifies
	// its private_key_jwt assertions; empty disables private_key_jwt.
	PublicKeyPEM []byte
	// Scopes are the scopes the client may ask for; empty means any.
	Scopes []string
	// RedirectURIs are the client's registered redirect URIs, for the
	// authorization-code grant (consent.go); empty disables it.
	RedirectURIs []string
	// DPoP makes every token request of the client carry a DPoP proof
	// (dpop.go); without it a proof is optional and binds the token.
	DPoP bool
}

// Bank authorization server defaults and limits.
const (
	defaultBankLifetime = time.Hour
	// maxAssertionLife bounds exp - now of a client assertion (FAPI: at
	// most 60 minutes).
	maxAssertionLife = time.Hour
	// clockSkew is the leeway on an assertion's iat and nbf.
	clockSkew = time.Minute
	bankKeyID = "sandbox-bank-1"
)

// Bank endpoint paths, below the issuer.
const (
	bankDiscoveryPath = "/.well-known/openid-configuration"
	bankTokenPath     = "/oauth2/token"
	bankRevokePath    = "/oauth2/revoke"
	bankJWKSPath      = "/oauth2/jwks"
)

// assertionAlgs are the algorithms accepted for client assertions.
var assertionAlgs = []jose.SignatureAlgorithm{jose.PS256, jose.ES256, jose.RS256}

// bankClient is a registered client with its parsed key.
type bankClient struct {
	BankClient
	key crypto.PublicKey // nil without PublicKeyPEM
}

// refreshGrant is an unused refresh token of the bank.
type refreshGrant struct {
	client, family string
	scopes         []string
}

// ParsePublicKey reads the first public key of a PEM file: "PUBLIC KEY"
// (PKIX), "RSA PUBLIC KEY" (PKCS#1) or the key of a "CERTIFICATE". Only RSA
// and EC P-256 keys are accepted.
func ParsePublicKey(pemBytes []byte) (crypto.PublicKey, error) {
	for rest := pemBytes; ; {
		var block *pem.Block
		block, rest = pem.Decode(rest)
		if block == nil {
			return nil, errors.New("no PEM public key found (want PUBLIC KEY, RSA PUBLIC KEY or CERTIFICATE)")
		}
		var key any
		var err error
		switch block.Type {
		case "PUBLIC KEY":
			key, err = x509.ParsePKIXPublicKey(block.Bytes)
		case "RSA PUBLIC KEY":
			key, err = x509.ParsePKCS1PublicKey(block.Bytes)
		case "CERTIFICATE":
			var c *x509.Certificate
			if c, err = x509.ParseCertificate(block.Bytes); err == nil {
				key = c.PublicKey
			}
		default:
			continue
		}
		if err != nil {
			return nil, fmt.Errorf("%s block: %v", block.Type, err)
		}
		switch k := key.(type) {
		case *rsa.PublicKey:
			return k, nil
		case *ecdsa.PublicKey:
			if k.Curve == elliptic.P256() {
				return k, nil
			}
		}
		return nil, fmt.Errorf("unsupported public key %T: use RSA or EC P-256", key)
	}
}

// newBank registers the bank clients and creates the server's signing key.
// It panics on a malformed client: a mistake of the caller's configuration.
func (s *Server) newBank() {
	s.bankClients = map[string]*bankClient{}
	s.refresh = map[string]*refreshGrant{}
	s.codes = map[string]*authCode{}
	s.dpop = &dpoptest.Checker{Window: dpopWindow, Now: s.cfg.Now, JTIs: &s.jtis}
	for _, c := range s.cfg.BankClients {
		if c.ID == "" {
			panic("sandbox: a bank client has an empty ID")
		}
		if _, dup := s.bankClients[c.ID]; dup {
			panic(fmt.Sprintf("sandbox: bank client %q is registered twice", c.ID))
		}
		bc := &bankClient{BankClient: c}
		bc.Scopes = slices.Clone(c.Scopes)
		if len(c.PublicKeyPEM) > 0 {
			k, err := ParsePublicKey(c.PublicKeyPEM)
			if err != nil {
				panic(fmt.Sprintf("sandbox: bank client %q: %v", c.ID, err))
			}
			bc.key = k
		}
		s.bankClients[c.ID] = bc
	}
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		panic(err)
	}
	s.bankKey = key
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: key},
		(&jose.SignerOptions{}).WithType("at+jwt").WithHeader("kid", bankKeyID))
	if err != nil {
		panic(err)
	}
	s.bankSigner = sig
}

// BankTokenRequests returns how many POST /oauth2/token calls reached the
// bank's token endpoint, failed ones included.
func (s *Server) BankTokenRequests() int64 { return s.bankReqs.Load() }

// BankRevocations returns how many POST /oauth2/revoke calls reached the
// bank's revocation endpoint, failed ones included.
func (s *Server) BankRevocations() int64 { return s.bankRevs.Load() }

// IssueRefreshToken mints a refresh token of the bank for clientID and
// scopes, as the authorization code flow would after the merchant's
// consent. Only clientID can use it; it rotates on each use.
func (s *Server) IssueRefreshToken(clientID string, scopes []string) string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.newRefreshLocked(clientID, strings.ToLower(rand.Text()), slices.Clone(scopes))
}

// RefreshTokenValid reports whether tok is an unused refresh token of the
// bank.
func (s *Server) RefreshTokenValid(tok string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.refresh[tok]
	return ok
}

func (s *Server) newRefreshLocked(client, family string, scopes []string) string {
	tok := "rt-" + rand.Text() + rand.Text()
	s.refresh[tok] = &refreshGrant{client: client, family: family, scopes: scopes}
	s.saveStateLocked()
	return tok
}

// bankIssuer is the configured issuer, or the base URL the request reached.
func (s *Server) bankIssuer(r *http.Request) string {
	if s.cfg.BankIssuer != "" {
		return strings.TrimSuffix(s.cfg.BankIssuer, "/")
	}
	return requestOrigin(r)
}

// requestOrigin is the scheme and Host a request reached: http(s)://Host.
func requestOrigin(r *http.Request) string {
	scheme := "http"
	if r.TLS != nil {
		scheme = "https"
	}
	return scheme + "://" + r.Host
}

func oauthError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Cache-Control", "no-store")
	writeJSON(w, status, map[string]string{"error": code, "error_description": desc})
}

// scriptedOAuthFailure answers a scripted failure (see Fail) with an RFC
// 6749 §5.2 body; it reports whether it did.
func (s *Server) scriptedOAuthFailure(w http.ResponseWriter) bool {
	status, ra, ok := s.takeFail()
	if !ok {
		return false
	}
	if ra != "" {
		w.Header().Set("Retry-After", ra)
	}
	code := map[int]string{400: "invalid_request", 401: "invalid_client", 403: "access_denied",
		429: "temporarily_unavailable", 503: "temporarily_unavailable"}[status]
	if code == "" {
		code = "server_error"
	}
	oauthError(w, status, code, "scripted sandbox failure")
	return true
}

func (s *Server) bankDiscovery(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		oauthError(w, http.StatusMethodNotAllowed, "invalid_request", "use GET")
		return
	}
	iss := s.bankIssuer(r)
	methods := []string{"client_secret_basic", "client_secret_post", "private_key_jwt"}
	doc := map[string]any{
		"issuer":                                iss,
		"token_endpoint":                        iss + bankTokenPath,
		"revocation_endpoint":                   iss + bankRevokePath,
		"jwks_uri":                              iss + bankJWKSPath,
		"token_endpoint_auth_methods_supported": methods,
		"token_endpoint_auth_signing_alg_values_supported":      []string{"PS256", "ES256", "RS256"},
		"revocation_endpoint_auth_methods_supported":            methods,
		"revocation_endpoint_auth_signing_alg_values_supported": []string{"PS256", "ES256", "RS256"},
		"grant_types_supported":                                 []string{"client_credentials", "refresh_token"},
		"response_types_supported":                              []string{},
		"subject_types_supported":                               []string{"public"},
		"id_token_signing_alg_values_supported":                 []string{"ES256"},
	}
	consentDiscovery(doc, iss)
	dpopDiscovery(doc)
	var scopes []string
	for _, c := range s.bankClients {
		scopes = append(scopes, c.Scopes...)
	}
	if len(scopes) > 0 {
		slices.Sort(scopes)
		doc["scopes_supported"] = slices.Compact(scopes)
	}
	writeJSON(w, http.StatusOK, doc)
}

func (s *Server) bankJWKS(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodGet && r.Method != http.MethodHead {
		w.Header().Set("Allow", "GET, HEAD")
		oauthError(w, http.StatusMethodNotAllowed, "invalid_request", "use GET")
		return
	}
	set := jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &s.bankKey.PublicKey, KeyID: bankKeyID, Algorithm: "ES256", Use: "sig"}}}
	writeJSON(w, http.StatusOK, set)
}

// authError is a failed client authentication or a malformed request,
// answered per RFC 6749 §5.2.
type authError struct {
	status      int
	code, desc  string
	basicScheme bool // the client tried HTTP Basic: answer WWW-Authenticate
}

func (e *authError) write(w http.ResponseWriter) {
	if e.status == http.StatusUnauthorized {
		if e.basicScheme {
			w.Header().Set("WWW-Authenticate", `Basic realm="sandbox-bank"`)
		}
	}
	oauthError(w, e.status, e.code, e.desc)
}

func invalidClient(basic bool, desc string) *authError {
	return &authError{http.StatusUnauthorized, "invalid_client", desc, basic}
}

func invalidRequest(desc string) *authError {
	return &authError{http.StatusBadRequest, "invalid_request", desc, false}
}

// bankForm checks the method and reads the form body; RFC 6749 §3.2 forbids
// repeated parameters.
func bankForm(w http.ResponseWriter, r *http.Request) *authError {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		return &authError{http.StatusMethodNotAllowed, "invalid_request", "use POST", false}
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		return invalidRequest("malformed form body")
	}
	for k, v := range r.PostForm {
		if len(v) > 1 {
			return invalidRequest("parameter " + k + " is repeated")
		}
	}
	return nil
}

// authenticate identifies the client by exactly one of client_secret_basic,
// client_secret_post and private_key_jwt.
func (s *Server) authenticate(r *http.Request) (*bankClient, *authError) {
	f := r.PostForm
	id, secret, basic := r.BasicAuth()
	_, hasSecret := f["client_secret"]
	_, hasAssertion := f["client_assertion"]
	n := 0
	for _, used := range []bool{basic, hasSecret, hasAssertion} {
		if used {
			n++
		}
	}
	switch {
	case n == 0:
		if r.Header.Get("Authorization") != "" {
			return nil, invalidClient(false, "unsupported Authorization scheme: use Basic, client_secret_post or private_key_jwt")
		}
		return nil, invalidClient(false, "client authentication is required")
	case n > 1:
		return nil, invalidRequest("more than one client authentication method is used")
	}
	bodyID, hasBodyID := f["client_id"]
	switch {
	case basic: // RFC 6749 §2.3.1: form-url-encoded before Basic encoding
		var err1, err2 error
		id, err1 = url.QueryUnescape(id)
		secret, err2 = url.QueryUnescape(secret)
		if err1 != nil || err2 != nil {
			return nil, invalidClient(true, "the Basic credentials are not form-url-encoded")
		}
		if hasBodyID && bodyID[0] != id {
			return nil, invalidRequest("client_id in the body differs from the authenticated client")
		}
		return s.checkSecret(id, secret, true)
	case hasSecret:
		return s.checkSecret(f.Get("client_id"), f.Get("client_secret"), false)
	}
	c, err := s.checkAssertion(r)
	if err == nil && hasBodyID && bodyID[0] != c.ID {
		return nil, invalidRequest("client_id in the body differs from the assertion's subject")
	}
	return c, err
}

func (s *Server) checkSecret(id, secret string, basic bool) (*bankClient, *authError) {
	c := s.bankClients[id]
	if c == nil || c.Secret == "" || subtle.ConstantTimeCompare([]byte(secret), []byte(c.Secret)) != 1 {
		return nil, invalidClient(basic, "unknown client, wrong secret, or a client without a secret")
	}
	return c, nil
}

// checkAssertion verifies an RFC 7523 client assertion: the JWS with the
// client's key, iss = sub = client_id, aud naming the token endpoint or the
// issuer, exp in the future (at most an hour away), and a jti not seen
// before.
func (s *Server) checkAssertion(r *http.Request) (*bankClient, *authError) {
	f := r.PostForm
	if f.Get("client_assertion_type") != "urn:ietf:params:oauth:client-assertion-type:jwt-bearer" {
		return nil, invalidClient(false, "client_assertion_type must be urn:ietf:params:oauth:client-assertion-type:jwt-bearer")
	}
	tok, err := jwt.ParseSigned(f.Get("client_assertion"), assertionAlgs)
	if err != nil {
		return nil, invalidClient(false, "client_assertion is not a JWS signed with PS256, ES256 or RS256")
	}
	var unverified jwt.Claims
	if err := tok.UnsafeClaimsWithoutVerification(&unverified); err != nil {
		return nil, invalidClient(false, "client_assertion claims are not readable")
	}
	c := s.bankClients[unverified.Subject]
	if c == nil || c.key == nil {
		return nil, invalidClient(false, "the assertion's subject is not a client registered for private_key_jwt")
	}
	var claims jwt.Claims
	if err := tok.Claims(c.key, &claims); err != nil {
		return nil, invalidClient(false, "the assertion's signature does not verify with the client's registered key")
	}
	iss := s.bankIssuer(r)
	now := s.cfg.Now()
	switch {
	case claims.Issuer != c.ID || claims.Subject != c.ID:
		return nil, invalidClient(false, "the assertion's iss and sub must both be the client_id")
	case !claims.Audience.Contains(iss+bankTokenPath) && !claims.Audience.Contains(iss):
		return nil, invalidClient(false, "the assertion's aud must be the token endpoint URL or the issuer")
	case claims.Expiry == nil:
		return nil, invalidClient(false, "the assertion has no exp")
	case !now.Before(claims.Expiry.Time()):
		return nil, invalidClient(false, "the assertion has expired")
	case claims.Expiry.Time().Sub(now) > maxAssertionLife:
		return nil, invalidClient(false, "the assertion's exp is more than an hour away")
	case claims.NotBefore != nil && claims.NotBefore.Time().After(now.Add(clockSkew)),
		claims.IssuedAt != nil && claims.IssuedAt.Time().After(now.Add(clockSkew)):
		return nil, invalidClient(false, "the assertion is not valid yet (iat or nbf in the future)")
	case claims.ID == "":
		return nil, invalidClient(false, "the assertion has no jti")
	}
	if !s.jtis.Remember(c.ID+"\x00"+claims.ID, claims.Expiry.Time(), now) {
		return nil, invalidClient(false, "the assertion's jti was already used")
	}
	return c, nil
}

func (s *Server) bankToken(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		s.bankReqs.Add(1)
		if !s.gateToken(w, rateLimitedOAuth) || s.scriptedOAuthFailure(w) {
			return
		}
	}
	if e := bankForm(w, r); e != nil {
		e.write(w)
		return
	}
	c, e := s.authenticate(r)
	if e != nil {
		e.write(w)
		return
	}
	jkt, ok := s.tokenDPoP(w, r, c)
	if !ok {
		return
	}
	f := r.PostForm
	asked := strings.Fields(f.Get("scope"))
	var scopes []string
	refresh, family, idToken := "", "", ""
	switch gt := f.Get("grant_type"); gt {
	case "authorization_code":
		g, ok := s.redeemCode(w, f, c, jkt)
		if !ok {
			return
		}
		scopes, family = g.scopes, strings.ToLower(rand.Text())
		if slices.Contains(g.scopes, "openid") {
			var err error
			if idToken, err = s.idToken(s.bankIssuer(r), c.ID, g.nonce, s.cfg.Now()); err != nil {
				oauthError(w, http.StatusInternalServerError, "server_error", "signing the ID token failed")
				return
			}
		}
		if slices.Contains(g.scopes, "offline_access") { // granted only with prompt=consent
			s.mu.Lock()
			refresh = s.newRefreshLocked(c.ID, family, g.scopes)
			s.mu.Unlock()
		}
	case "client_credentials":
		if bad := c.disallowed(asked); bad != "" {
			oauthError(w, http.StatusBadRequest, "invalid_scope", fmt.Sprintf("scope %q is not allowed for this client", bad))
			return
		}
		scopes = asked
	case "refresh_token":
		old := f.Get("refresh_token")
		if old == "" {
			oauthError(w, http.StatusBadRequest, "invalid_request", "refresh_token is required")
			return
		}
		s.mu.Lock()
		g := s.refresh[old]
		switch {
		case g == nil || g.client != c.ID:
			s.mu.Unlock()
			oauthError(w, http.StatusBadRequest, "invalid_grant", "the refresh token is unknown, already used, revoked, or issued to another client")
			return
		case len(asked) > 0 && slices.ContainsFunc(asked, func(sc string) bool { return !slices.Contains(g.scopes, sc) }):
			s.mu.Unlock()
			oauthError(w, http.StatusBadRequest, "invalid_scope", "the requested scope exceeds the scope of the grant")
			return
		}
		// Rotation: the old refresh token stops working now.
		delete(s.refresh, old)
		scopes, family = g.scopes, g.family
		if len(asked) > 0 {
			scopes = asked
		}
		refresh = s.newRefreshLocked(c.ID, g.family, g.scopes)
		s.mu.Unlock()
	case "":
		oauthError(w, http.StatusBadRequest, "invalid_request", "grant_type is required")
		return
	default:
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "only client_credentials, refresh_token and authorization_code are supported")
		return
	}

	now := s.cfg.Now()
	life := s.cfg.BankTokenLifetime
	if life <= 0 {
		life = defaultBankLifetime
	}
	t := &token{id: strings.ToLower(rand.Text()), org: c.ID, scopes: slices.Clone(scopes), created: now,
		expiry: now.Add(life), bank: true, family: family, jkt: jkt}
	claims := map[string]any{"iss": s.bankIssuer(r), "sub": c.ID, "client_id": c.ID, "aud": s.bankIssuer(r),
		"iat": now.Unix(), "exp": t.expiry.Unix(), "jti": t.id}
	tokenType := "Bearer"
	if jkt != "" {
		claims["cnf"], tokenType = map[string]string{"jkt": jkt}, "DPoP"
	}
	if len(scopes) > 0 {
		claims["scope"] = strings.Join(scopes, " ")
	}
	access, err := jwt.Signed(s.bankSigner).Claims(claims).Serialize()
	if err != nil {
		oauthError(w, http.StatusInternalServerError, "server_error", "signing the access token failed")
		return
	}
	t.access = access
	s.mu.Lock()
	s.byToken[access] = t
	s.mu.Unlock()

	body := map[string]any{"access_token": access, "token_type": tokenType, "expires_in": int64(life / time.Second)}
	if len(scopes) > 0 {
		body["scope"] = strings.Join(scopes, " ")
	}
	if refresh != "" {
		body["refresh_token"] = refresh
	}
	if idToken != "" {
		body["id_token"] = idToken
	}
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, body)
}

// disallowed returns the first scope the client may not ask for.
func (c *bankClient) disallowed(scopes []string) string {
	if len(c.Scopes) == 0 {
		return ""
	}
	for _, sc := range scopes {
		if !slices.Contains(c.Scopes, sc) {
			return sc
		}
	}
	return ""
}

// bankRevoke implements RFC 7009: after client authentication it revokes
// an access token or a refresh token (and the access tokens obtained with
// it) issued to that client, and answers 200 whatever the token.
func (s *Server) bankRevoke(w http.ResponseWriter, r *http.Request) {
	if r.Method == http.MethodPost {
		s.bankRevs.Add(1)
	}
	if e := bankForm(w, r); e != nil {
		e.write(w)
		return
	}
	c, e := s.authenticate(r)
	if e != nil {
		e.write(w)
		return
	}
	tok := r.PostForm.Get("token")
	if tok == "" {
		oauthError(w, http.StatusBadRequest, "invalid_request", "token is required")
		return
	}
	now := s.cfg.Now()
	s.mu.Lock()
	if t := s.byToken[tok]; t != nil && t.bank && t.org == c.ID && t.revoked.IsZero() {
		t.revoked = now
	}
	if g := s.refresh[tok]; g != nil && g.client == c.ID {
		delete(s.refresh, tok)
		s.saveStateLocked()
		for _, t := range s.byToken {
			if t.bank && t.family == g.family && t.org == c.ID && t.revoked.IsZero() {
				t.revoked = now
			}
		}
	}
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(http.StatusOK)
}
