// Package sandbox is an in-memory imitation of the provider APIs the token
// broker talks to: the Nuapay Gatekeeper token, revoke and organisation list
// endpoints, the OneID partner token endpoint, a bank's OAuth 2.0
// authorization server (discovery, client credentials and rotating refresh
// tokens, client_secret_basic, client_secret_post and private_key_jwt,
// RFC 7009 revocation, DPoP-bound tokens of RFC 9449), and an echo upstream
// that reports what reached it (never the token itself) and checks DPoP
// proofs. It is meant for local runs and integration tests, not for
// production. Optionally it enforces a rate limit on its
// token endpoints (429 with Retry-After above it) and it counts their
// requests per second, answered at GET /_sandbox/token-stats (ratelimit.go).
//
// The bank's endpoints, below its issuer (by default the base URL a request
// reached, http(s)://Host):
//
//	GET  /.well-known/openid-configuration
//	GET  /oauth2/jwks
//	POST /oauth2/token
//	POST /oauth2/revoke
package sandbox

import (
	"bytes"
	"crypto/ecdsa"
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"errors"
	"io"
	"mime"
	"net/http"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
)

// Config of the sandbox.
type Config struct {
	// APIKeys are the Nuapay partner API keys accepted as the HTTP Basic
	// user name; the password must be empty ("key:").
	APIKeys []string
	// Organisations are the organisations linked to the partner; ID is the
	// encodedOrganisationId used in paths.
	Organisations []Organisation
	// OneIDClients maps OneID client_id to client_secret.
	OneIDClients map[string]string
	// BankClients are the clients of the bank's authorization server.
	BankClients []BankClient
	// BankIssuer is the bank's issuer: the sandbox's base URL as clients
	// reach it (scheme://host[:port], no path). Empty means the base URL of
	// each request, http(s)://Host.
	BankIssuer string
	// BankTokenLifetime is the expires_in of the bank's access tokens;
	// default 1h.
	BankTokenLifetime time.Duration
	// DPoPNonce makes the bank's token endpoint and the echo upstream
	// demand the sandbox's DPoP-Nonce in DPoP proofs (dpop.go).
	DPoPNonce bool
	// NuapayMaxLifetime, when set, caps the life of the Nuapay tokens: the
	// expiryTime answered is the earlier of expiresIn and now plus it, so
	// that tests run with tokens of a few seconds (expiresIn is at least
	// 10 s).
	NuapayMaxLifetime time.Duration
	// TokenRateLimit is the rate limit of the token endpoints (see
	// RateLimit); the zero value enforces none.
	TokenRateLimit RateLimit
	// Now is the clock; default time.Now. Tests inject one.
	Now func() time.Time
}

// Organisation is one organisation linked to the partner, as listed by
// GET /organisations (all have status ACTIVE).
type Organisation struct {
	ID, Name, Code string // ID is the encodedOrganisationId, unescaped
}

// Limits of expiresIn (seconds) and its default, from the Gatekeeper spec.
const (
	minExpiresIn     = 10
	maxExpiresIn     = 31556926
	defaultExpiresIn = 10
	oneIDExpiresIn   = 86400
	requestingOrg    = "sandbox-partner"
)

// Server is the sandbox; it implements http.Handler and is safe for
// concurrent use.
type Server struct {
	cfg      Config
	orgs     map[string]Organisation
	key      []byte // HS256 key of the tokens it mints
	tokReqs  atomic.Int64
	oneReqs  atomic.Int64
	bankReqs atomic.Int64
	bankRevs atomic.Int64
	gate     *tokenGate // rate limit and statistics of the token endpoints (ratelimit.go)

	bankClients map[string]*bankClient // read-only after New
	bankKey     *ecdsa.PrivateKey      // signs the bank's access tokens
	bankSigner  jose.Signer

	mu       sync.Mutex
	byToken  map[string]*token
	byID     map[string]*token // Nuapay tokens by id
	failN    int
	failCode int
	failRA   string
	refresh  map[string]*refreshGrant // unused bank refresh tokens
	codes    map[string]*authCode     // unused authorization codes (consent.go)

	statePath string // the file that keeps the refresh tokens (state.go); empty: memory only

	// jtis holds the jtis of the assertions (client_id NUL jti) and DPoP
	// proofs seen, until they expire.
	jtis dpoptest.JTIs
	// dpop checks DPoP proofs (dpop.go), with jtis.
	dpop *dpoptest.Checker
}

type token struct {
	id, access, org string // org is the client_id for OneID and bank tokens
	scopes          []string
	created, expiry time.Time
	revoked         time.Time // zero while active
	bank            bool      // issued by the bank's authorization server
	family          string    // bank: the refresh-token family it came from, if any
	jkt             string    // bank: the DPoP key thumbprint the token is bound to, if any
}

// New returns a sandbox serving cfg. It panics when a bank client is
// malformed (empty or duplicate ID, unreadable public key): check keys
// with ParsePublicKey first.
func New(cfg Config) *Server {
	if cfg.Now == nil {
		cfg.Now = time.Now
	}
	s := &Server{cfg: cfg, orgs: map[string]Organisation{}, key: make([]byte, 32),
		byToken: map[string]*token{}, byID: map[string]*token{}, gate: newTokenGate(cfg.TokenRateLimit, cfg.Now)}
	rand.Read(s.key)
	for _, o := range cfg.Organisations {
		s.orgs[o.ID] = o
	}
	s.newBank()
	return s
}

// TokenRequests returns how many POST .../tokens calls reached the Nuapay
// token endpoint, failed ones included.
func (s *Server) TokenRequests() int64 { return s.tokReqs.Load() }

// OneIDTokenRequests returns how many POST /v1/token calls reached the OneID
// token endpoint, failed ones included.
func (s *Server) OneIDTokenRequests() int64 { return s.oneReqs.Load() }

// Fail makes the next n token requests (Nuapay, OneID and bank together) answer
// status with the provider's error body, plus a Retry-After header when
// retryAfter is not empty. n <= 0 cancels a scripted failure.
func (s *Server) Fail(status int, retryAfter string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.failCode, s.failRA, s.failN = status, retryAfter, max(n, 0)
}

// Issued reports the organisation (the client_id for OneID and bank tokens) and
// scopes of a token the sandbox issued, and whether it is still valid
// (unexpired and unrevoked). For unknown tokens it returns "", nil, false.
func (s *Server) Issued(tok string) (org string, scopes []string, valid bool) {
	t, ok, valid := s.lookup(tok)
	if !ok {
		return "", nil, false
	}
	return t.org, t.scopes, valid
}

// lookup returns a copy of the token record, whether it exists and whether
// it is valid now.
func (s *Server) lookup(tok string) (token, bool, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	t, ok := s.byToken[tok]
	if !ok {
		return token{}, false, false
	}
	c := *t
	c.scopes = append([]string(nil), t.scopes...)
	return c, true, t.revoked.IsZero() && s.cfg.Now().Before(t.expiry)
}

// ServeHTTP routes Gatekeeper, OneID, bank and echo requests.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	seg, ok := segments(r.URL.EscapedPath())
	is := func(parts ...string) bool {
		if !ok || len(seg) != len(parts) {
			return false
		}
		for i, p := range parts {
			if p != "*" && seg[i] != p {
				return false
			}
		}
		return true
	}
	switch {
	case is("v1", "token"):
		s.oneIDToken(w, r)
	case is(".well-known", "openid-configuration"):
		s.bankDiscovery(w, r)
	case is("oauth2", "token"):
		s.bankToken(w, r)
	case is("oauth2", "revoke"):
		s.bankRevoke(w, r)
	case is("oauth2", "authorize"):
		s.bankAuthorize(w, r)
	case is("oauth2", "jwks"):
		s.bankJWKS(w, r)
	case r.URL.Path == TokenStatsPath:
		s.tokenStats(w, r)
	case is("organisations"), is("cust", "organisations"):
		s.listOrgs(w, r)
	case is("organisations", "*", "tokens"):
		s.requestToken(w, r, seg[1])
	case is("organisations", "*", "tokens", "revoke"):
		s.revokeAll(w, r, seg[1])
	case is("organisations", "*", "tokens", "*", "revoke"):
		s.revokeOne(w, r, seg[1], seg[3])
	default:
		s.echo(w, r)
	}
}

// segments splits an escaped path and unescapes each segment on its own, so
// an escaped "/" stays inside its segment.
func segments(escaped string) ([]string, bool) {
	parts := strings.Split(strings.TrimPrefix(escaped, "/"), "/")
	for i, p := range parts {
		u, err := url.PathUnescape(p)
		if err != nil {
			return nil, false
		}
		parts[i] = u
	}
	return parts, true
}

// --- Nuapay Gatekeeper ---

type detail struct {
	Code        string  `json:"code"`
	Description string  `json:"description"`
	Field       *string `json:"field"`
	ResourceURI *string `json:"resourceUri"`
}

// nuapayError writes the Nuapay error envelope; field may be empty.
func nuapayError(w http.ResponseWriter, status int, desc, field string) {
	d := detail{Code: strconv.Itoa(status * 100), Description: desc}
	if field != "" {
		d.Field = &field
	}
	writeJSON(w, status, map[string]any{"returnCode": strconv.Itoa(status * 100),
		"returnDescription": http.StatusText(status), "details": []detail{d}})
}

// gatekeeper checks the method and the partner's Basic credentials and
// resolves the organisation (when org is non-nil); it answers the error
// itself and returns false on failure.
func (s *Server) gatekeeper(w http.ResponseWriter, r *http.Request, method string, org *string) (Organisation, bool) {
	if r.Method != method {
		w.Header().Set("Allow", method)
		nuapayError(w, http.StatusMethodNotAllowed, "method not allowed", "")
		return Organisation{}, false
	}
	user, pass, ok := r.BasicAuth()
	if !ok || pass != "" || !s.validKey(user) {
		w.Header().Set("WWW-Authenticate", `Basic realm="gatekeeper"`)
		nuapayError(w, http.StatusUnauthorized, "a valid partner API key with an empty password is required", "")
		return Organisation{}, false
	}
	if org == nil {
		return Organisation{}, true
	}
	o, found := s.orgs[*org]
	if !found || *org == "" || *org == "." || *org == ".." {
		nuapayError(w, http.StatusNotFound, "organisation not found", "encodedOrganisationId")
		return Organisation{}, false
	}
	return o, true
}

func (s *Server) validKey(k string) bool {
	ok := 0
	for _, want := range s.cfg.APIKeys {
		ok |= subtle.ConstantTimeCompare([]byte(k), []byte(want))
	}
	return ok == 1 && k != ""
}

// takeFail consumes one scripted failure, if any.
func (s *Server) takeFail() (int, string, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.failN == 0 {
		return 0, "", false
	}
	s.failN--
	return s.failCode, s.failRA, true
}

func (s *Server) requestToken(w http.ResponseWriter, r *http.Request, orgID string) {
	if r.Method == http.MethodPost {
		s.tokReqs.Add(1)
		if !s.gateToken(w, rateLimitedNuapay) {
			return
		}
		if code, ra, ok := s.takeFail(); ok {
			if ra != "" {
				w.Header().Set("Retry-After", ra)
			}
			nuapayError(w, code, "scripted sandbox failure", "")
			return
		}
	}
	org, ok := s.gatekeeper(w, r, http.MethodPost, &orgID)
	if !ok {
		return
	}
	if mt, _, err := mime.ParseMediaType(r.Header.Get("Content-Type")); err != nil ||
		(mt != "application/json" && !strings.HasSuffix(mt, "+json")) {
		nuapayError(w, http.StatusUnsupportedMediaType, "Content-Type must be application/json", "")
		return
	}
	var req struct {
		Scopes    []string `json:"scopes"`
		ExpiresIn *int64   `json:"expiresIn"`
	}
	dec := json.NewDecoder(http.MaxBytesReader(w, r.Body, 1<<20))
	if err := dec.Decode(&req); err != nil || dec.Decode(&struct{}{}) != io.EOF {
		field := ""
		if te := (*json.UnmarshalTypeError)(nil); errors.As(err, &te) {
			field = te.Field
		}
		nuapayError(w, http.StatusBadRequest, "malformed JSON body", field)
		return
	}
	if len(req.Scopes) == 0 || hasEmpty(req.Scopes) {
		nuapayError(w, http.StatusUnprocessableEntity, "at least one non-empty scope is required", "scopes")
		return
	}
	exp := int64(defaultExpiresIn)
	if req.ExpiresIn != nil {
		exp = *req.ExpiresIn
	}
	if exp < minExpiresIn || exp > maxExpiresIn {
		nuapayError(w, http.StatusUnprocessableEntity, "expiresIn must be between 10 and 31556926 seconds", "expiresIn")
		return
	}
	now := s.cfg.Now()
	life := time.Duration(exp) * time.Second
	if m := s.cfg.NuapayMaxLifetime; m > 0 {
		life = min(life, m)
	}
	t := &token{id: strings.ToLower(rand.Text()), org: org.ID, scopes: req.Scopes, created: now,
		expiry: now.Add(life)}
	t.access = s.mint(map[string]any{"iss": "sandbox-gatekeeper", "sub": org.ID,
		"scope": strings.Join(req.Scopes, " "), "iat": now.Unix(), "exp": t.expiry.Unix(), "jti": t.id})
	c := *t // the copy written: a concurrent revoke may change t
	s.mu.Lock()
	s.byToken[t.access], s.byID[t.id] = t, t
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	s.writeToken(w, http.StatusCreated, c)
}

func hasEmpty(ss []string) bool {
	for _, s := range ss {
		if s == "" {
			return true
		}
	}
	return false
}

// writeToken writes the Gatekeeper token envelope of t (a copy taken under
// the lock).
func (s *Server) writeToken(w http.ResponseWriter, status int, t token) {
	uri := orgPath(t.org) + "/tokens/" + url.PathEscape(t.id)
	var revoked *int64
	state := "ACTIVE"
	if !t.revoked.IsZero() {
		ms := t.revoked.UnixMilli()
		revoked, state = &ms, "REVOKED"
	}
	data := map[string]any{"id": t.id, "uri": uri, "accessToken": t.access, "tokenType": "BEARER",
		"expiryTime": t.expiry.UnixMilli(), "scopes": t.scopes, "status": state,
		"createdTimestamp": t.created.UnixMilli(), "revokedTimestamp": revoked,
		"requestedOrganisation": t.org, "requestingOrganisation": requestingOrg,
		"ipFiltering": true, "mtlsFilter": false,
		"links": []map[string]string{{"id": t.id, "resourceType": "revoketoken", "uri": uri + "/revoke"}}}
	writeJSON(w, status, map[string]any{"uri": uri, "data": data})
}

func orgPath(id string) string { return "/organisations/" + url.PathEscape(id) }

func (s *Server) revokeOne(w http.ResponseWriter, r *http.Request, orgID, id string) {
	org, ok := s.gatekeeper(w, r, http.MethodPost, &orgID)
	if !ok {
		return
	}
	s.mu.Lock()
	t, found := s.byID[id]
	found = found && t.org == org.ID
	var c token
	if found {
		if t.revoked.IsZero() {
			t.revoked = s.cfg.Now()
		}
		c = *t
	}
	s.mu.Unlock()
	if !found {
		nuapayError(w, http.StatusNotFound, "token not found", "tokenId")
		return
	}
	s.writeToken(w, http.StatusOK, c)
}

func (s *Server) revokeAll(w http.ResponseWriter, r *http.Request, orgID string) {
	org, ok := s.gatekeeper(w, r, http.MethodPost, &orgID)
	if !ok {
		return
	}
	n, now := 0, s.cfg.Now()
	s.mu.Lock()
	for _, t := range s.byID {
		if t.org == org.ID && t.revoked.IsZero() {
			t.revoked, n = now, n+1
		}
	}
	s.mu.Unlock()
	uri := orgPath(org.ID) + "/tokens/revoke"
	writeJSON(w, http.StatusOK, map[string]any{"uri": uri, "data": map[string]any{"uri": uri, "revokedTokensCount": n}})
}

func (s *Server) listOrgs(w http.ResponseWriter, r *http.Request) {
	if _, ok := s.gatekeeper(w, r, http.MethodGet, nil); !ok {
		return
	}
	q := r.URL.Query()
	num, size := 1, 20
	for _, p := range []struct {
		name string
		v    *int
		max  int
	}{{"pagenumber", &num, 1 << 30}, {"pagesize", &size, 100}} {
		if s := q.Get(p.name); s != "" {
			n, err := strconv.Atoi(s)
			if err != nil || n < 1 || n > p.max {
				nuapayError(w, http.StatusBadRequest, "invalid "+p.name, p.name)
				return
			}
			*p.v = n
		}
	}
	name, status := strings.ToLower(q.Get("name")), q.Get("status")
	data := []map[string]string{}
	for _, o := range s.cfg.Organisations {
		if strings.Contains(strings.ToLower(o.Name), name) && (status == "" || strings.EqualFold(status, "ACTIVE")) {
			data = append(data, map[string]string{"id": o.ID, "name": o.Name, "code": o.Code, "status": "ACTIVE"})
		}
	}
	total := len(data)
	lo, hi := min((num-1)*size, total), min(num*size, total)
	writeJSON(w, http.StatusOK, map[string]any{"uri": r.URL.RequestURI(), "data": data[lo:hi],
		"page": map[string]int{"pageNumber": num, "pageSize": size, "totalElements": total,
			"totalPages": (total + size - 1) / size}})
}

// --- OneID ---

func (s *Server) oneIDToken(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Allow", http.MethodPost)
		oauthError(w, http.StatusMethodNotAllowed, "invalid_request", "use POST")
		return
	}
	s.oneReqs.Add(1)
	if !s.gateToken(w, rateLimitedOAuth) || s.scriptedOAuthFailure(w) {
		return
	}
	r.Body = http.MaxBytesReader(w, r.Body, 64<<10)
	if err := r.ParseForm(); err != nil {
		oauthError(w, http.StatusBadRequest, "invalid_request", "malformed form body")
		return
	}
	id, secret, basic := r.BasicAuth()
	if basic { // RFC 6749 §2.3.1: form-url-encoded before Basic encoding
		id, _ = url.QueryUnescape(id)
		secret, _ = url.QueryUnescape(secret)
	} else {
		id, secret = r.PostForm.Get("client_id"), r.PostForm.Get("client_secret")
	}
	want, known := s.cfg.OneIDClients[id]
	if !known || id == "" || subtle.ConstantTimeCompare([]byte(secret), []byte(want)) != 1 {
		if basic {
			w.Header().Set("WWW-Authenticate", `Basic realm="oneid"`)
		}
		oauthError(w, http.StatusUnauthorized, "invalid_client", "unknown client or wrong secret")
		return
	}
	switch gt := r.PostForm.Get("grant_type"); gt {
	case "client_credentials":
	case "":
		oauthError(w, http.StatusBadRequest, "invalid_request", "grant_type is required")
		return
	default:
		oauthError(w, http.StatusBadRequest, "unsupported_grant_type", "only client_credentials is supported")
		return
	}
	now := s.cfg.Now()
	t := &token{id: strings.ToLower(rand.Text()), org: id, created: now, expiry: now.Add(oneIDExpiresIn * time.Second)}
	t.access = s.mint(map[string]any{"iss": "sandbox-oneid", "sub": id, "iat": now.Unix(), "exp": t.expiry.Unix(), "jti": t.id})
	s.mu.Lock()
	s.byToken[t.access] = t
	s.mu.Unlock()
	w.Header().Set("Cache-Control", "no-store")
	w.Header().Set("Pragma", "no-cache")
	writeJSON(w, http.StatusOK, map[string]any{"access_token": t.access, "token_type": "bearer", "expires_in": oneIDExpiresIn})
}

// mint returns an HS256 JWT of claims signed with the server's random key.
func (s *Server) mint(claims map[string]any) string {
	enc := base64.RawURLEncoding
	c, _ := json.Marshal(claims)
	in := enc.EncodeToString([]byte(`{"alg":"HS256","typ":"JWT"}`)) + "." + enc.EncodeToString(c)
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte(in))
	return in + "." + enc.EncodeToString(m.Sum(nil))
}

// --- echo upstream ---

// EchoAuth is the "authorization" object of an echo response.
type EchoAuth struct {
	Present         bool     `json:"present"`
	Scheme          string   `json:"scheme,omitempty"`
	Fingerprint     string   `json:"fingerprint,omitempty"` // first 8 hex digits of sha256(credentials)
	IssuedBySandbox bool     `json:"issued_by_sandbox"`
	Valid           bool     `json:"valid"`
	Organisation    string   `json:"organisation,omitempty"`
	Scopes          []string `json:"scopes,omitempty"`
	// JKT is the DPoP key thumbprint a bank token is bound to, if any.
	JKT string `json:"jkt,omitempty"`
	// DPoP is true when a DPoP-bound token came with a valid proof of its
	// key for this request.
	DPoP bool `json:"dpop,omitempty"`
	// Refused says why the token's DPoP binding refuses this request
	// (error code: description), if it does; it never holds the token.
	Refused string `json:"refused,omitempty"`
}

// Echo is the body the echo upstream answers with; tests decode into it.
type Echo struct {
	Method        string            `json:"method"`
	Path          string            `json:"path"`
	EscapedPath   string            `json:"escaped_path"`
	Query         string            `json:"query"`
	Host          string            `json:"host"`
	Headers       map[string]string `json:"headers"` // all but Authorization and Proxy-Authorization, values joined by ", "
	Authorization EchoAuth          `json:"authorization"`
	BodyBytes     int64             `json:"body_bytes"`
}

// echo answers every other request with what reached it. A request with
// more than one Authorization header is never valid.
func (s *Server) echo(w http.ResponseWriter, r *http.Request) {
	n, _ := io.Copy(io.Discard, r.Body)
	e := Echo{Method: r.Method, Path: r.URL.Path, EscapedPath: r.URL.EscapedPath(), Query: r.URL.RawQuery,
		Host: r.Host, Headers: map[string]string{}, BodyBytes: n}
	for k, v := range r.Header {
		if k != "Authorization" && k != "Proxy-Authorization" {
			e.Headers[k] = strings.Join(v, ", ")
		}
	}
	var refused *dpopError // a DPoP binding the request does not satisfy
	if auth := r.Header.Values("Authorization"); len(auth) > 0 {
		scheme, cred, _ := strings.Cut(auth[0], " ")
		cred = strings.TrimSpace(cred)
		sum := sha256.Sum256([]byte(cred))
		e.Authorization = EchoAuth{Present: true, Scheme: scheme, Fingerprint: hex.EncodeToString(sum[:4])}
		if strings.EqualFold(scheme, "Bearer") || strings.EqualFold(scheme, "DPoP") {
			if t, ok, valid := s.lookup(cred); ok {
				a := &e.Authorization
				a.IssuedBySandbox, a.Valid, a.Organisation, a.Scopes = true, valid && len(auth) == 1, t.org, t.scopes
				if refused = s.echoDPoP(w, r, scheme, cred, t, a); refused != nil {
					a.Valid, a.Refused = false, refused.Error()
				}
			}
		}
	}
	status := http.StatusOK
	if r.Header.Get("X-Sandbox-Require-Token") == "1" && !e.Authorization.Valid {
		if refused != nil {
			dpopChallenge(w, refused)
		} else {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token"`)
		}
		status = http.StatusUnauthorized
	}
	writeJSON(w, status, e)
}

func writeJSON(w http.ResponseWriter, status int, v any) {
	var b bytes.Buffer
	enc := json.NewEncoder(&b)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(v); err != nil {
		http.Error(w, err.Error(), http.StatusInternalServerError)
		return
	}
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	w.Write(b.Bytes())
}
