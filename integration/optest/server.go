package optest

import (
	"context"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"fmt"
	"io"
	"log/slog"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/example/server/storage"
	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"
)

// The merchant who logs in at the server's login page (a user of zitadel's
// example user store).
const (
	Username = "test-user2"
	Password = "verysecure"
)

// ResourceClientID and ResourceClientSecret are the credentials of the
// resource server (ResourceServer) at the introspection endpoint.
const (
	ResourceClientID     = "optest-resource-server"
	ResourceClientSecret = "optest-resource-secret"
)

// Options select the server's transport and its server-wide policies.
type Options struct {
	// TLS serves HTTPS with the given server certificate; ClientCAs
	// verifies client certificates when given (tls_client_auth).
	TLS       *tls.Certificate
	ClientCAs *x509.CertPool
	// Listener is the listener to serve on; default a new one on
	// 127.0.0.1.
	Listener net.Listener
	// RequirePAR requires pushed authorization requests of every client
	// and says so in the discovery document
	// (require_pushed_authorization_requests).
	RequirePAR bool
	// Iss adds iss to the authorization responses (RFC 9207) and
	// advertises it.
	Iss bool
}

// Server is a running authorization server.
type Server struct {
	// URL is the issuer.
	URL     string
	Storage *Storage
	Server  *httptest.Server
	// CAPool trusts the server's certificate (TLS servers only).
	CAPool *x509.CertPool
	// DiscoveryStatus, when not 0, is the status the discovery document
	// is answered with (a gateway in front of the server that fails).
	DiscoveryStatus atomic.Int32
	// TokenStatus, when not 0, is the status the token requests are
	// answered with, counted (Count) but before zitadel sees them: no
	// code or refresh token is used.
	TokenStatus atomic.Int32
	// TokenRetryAfter, when not 0, is the Retry-After (seconds) of the
	// TokenStatus answers.
	TokenRetryAfter atomic.Int32
	// EditDiscovery, when set (before any request), edits the discovery
	// document before it is served (a bank whose document is wrong).
	EditDiscovery func(doc map[string]any)
	// BeforeToken, when set (before any request), runs before each token
	// request is handled.
	BeforeToken func(*http.Request)
	// Pushed counts the pushed authorization requests accepted.
	Pushed atomic.Int64

	opts     Options
	provider *op.Provider
	requests sync.Map // grant_type -> *atomic.Int64

	mu         sync.Mutex
	pushedReqs map[string]url.Values // by request_uri
	authorized []url.Values          // authorization requests, as zitadel got them
}

// Count returns the number of token requests of a grant type.
func (s *Server) Count(grant string) int64 {
	v, _ := s.requests.LoadOrStore(grant, new(atomic.Int64))
	return v.(*atomic.Int64).Load()
}

// AuthorizationRequests returns the parameters of the authorization
// requests received so far (those of the pushed request for a request_uri).
func (s *Server) AuthorizationRequests() []url.Values {
	s.mu.Lock()
	defer s.mu.Unlock()
	out := make([]url.Values, len(s.authorized))
	for i, q := range s.authorized {
		out[i] = cloneValues(q)
	}
	return out
}

func cloneValues(q url.Values) url.Values {
	c := url.Values{}
	for k, v := range q {
		c[k] = append([]string(nil), v...)
	}
	return c
}

// Quiet is a logger that drops zitadel's logs.
func Quiet() *slog.Logger { return slog.New(slog.NewTextHandler(io.Discard, nil)) }

// Start starts zitadel's OP on 127.0.0.1 with the given clients, and stops
// it when the test ends.
func Start(t testing.TB, o Options, clients ...*Client) *Server {
	t.Helper()
	srv := httptest.NewUnstartedServer(nil)
	if o.Listener != nil {
		srv.Listener.Close()
		srv.Listener = o.Listener
	}
	scheme := "http"
	if o.TLS != nil {
		scheme = "https"
	}
	issuer := scheme + "://" + srv.Listener.Addr().String()

	st := &Storage{
		Storage: storage.NewStorageWithClients(storage.NewUserStore(issuer), map[string]*storage.Client{}),
		clients: map[string]*Client{ResourceClientID: {ID: ResourceClientID, Secret: ResourceClientSecret, Method: oidc.AuthMethodBasic}},
		refresh: map[string]*refreshToken{},
		access:  map[string]*accessToken{},
	}
	for _, c := range clients {
		st.clients[c.ID] = c
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
	quiet := Quiet()
	opts := []op.Option{op.WithLogger(quiet)}
	if scheme == "http" {
		opts = append(opts, op.WithAllowInsecure())
	}
	provider, err := op.NewProvider(cfg, st, op.StaticIssuer(issuer), opts...)
	if err != nil {
		t.Fatal(err)
	}
	zh := op.RegisterLegacyServer(opServer{op.NewLegacyServer(provider, *op.DefaultEndpoints)}, op.AuthorizeCallbackHandler(provider),
		op.WithFallbackLogger(quiet))

	s := &Server{URL: issuer, Storage: st, Server: srv, opts: o, provider: provider, pushedReqs: map[string]url.Values{}}
	srv.Config.Handler = s.handler(zh)
	if o.TLS != nil {
		srv.TLS = &tls.Config{Certificates: []tls.Certificate{*o.TLS}}
		if o.ClientCAs != nil {
			srv.TLS.ClientAuth = tls.VerifyClientCertIfGiven
			srv.TLS.ClientCAs = o.ClientCAs
		}
		srv.StartTLS()
		s.CAPool = x509.NewCertPool()
		s.CAPool.AddCert(o.TLS.Leaf)
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	return s
}

// handler serves zitadel's endpoints with the additions of the package.
func (s *Server) handler(zh http.Handler) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if s.opts.RequirePAR {
			r = r.WithContext(context.WithValue(r.Context(), requirePARKey{}, true))
		}
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			s.discovery(w, r, zh)
		case "/par":
			s.par(w, r)
		case "/authorize":
			s.withIss(w, r, func(w http.ResponseWriter, r *http.Request) { s.authorize(w, r, zh) })
		case "/login":
			s.withIss(w, r, s.login)
		case "/authorize/callback":
			s.withIss(w, r, zh.ServeHTTP)
		case "/oauth/token":
			if err := r.ParseForm(); err != nil {
				http.Error(w, "bad form", http.StatusBadRequest)
				return
			}
			v, _ := s.requests.LoadOrStore(r.PostForm.Get("grant_type"), new(atomic.Int64))
			v.(*atomic.Int64).Add(1)
			if s.BeforeToken != nil {
				s.BeforeToken(r)
			}
			if st := s.TokenStatus.Load(); st != 0 {
				if ra := s.TokenRetryAfter.Load(); ra != 0 {
					w.Header().Set("Retry-After", strconv.Itoa(int(ra)))
				}
				writeError(w, int(st), "server_error", "the token endpoint is down")
				return
			}
			if !s.mtlsGate(w, r) {
				return
			}
			zh.ServeHTTP(w, r)
		default:
			zh.ServeHTTP(w, r)
		}
	})
}

// withIss serves r with h and, with Options.Iss, adds iss to a redirect
// to the client (RFC 9207 §2: success and error responses alike).
func (s *Server) withIss(w http.ResponseWriter, r *http.Request, h http.HandlerFunc) {
	if !s.opts.Iss {
		h(w, r)
		return
	}
	rec := httptest.NewRecorder()
	h(rec, r)
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	if loc := rec.Header().Get("Location"); loc != "" && !strings.HasPrefix(loc, "/") && !strings.HasPrefix(loc, s.URL+"/") {
		sep := "?"
		if strings.Contains(loc, "?") {
			sep = "&"
		}
		w.Header().Set("Location", loc+sep+"iss="+url.QueryEscape(s.URL))
	}
	w.WriteHeader(rec.Code)
	_, _ = w.Write(rec.Body.Bytes())
}

// discovery is zitadel's document with the PAR endpoint and the iss
// support added.
func (s *Server) discovery(w http.ResponseWriter, r *http.Request, zh http.Handler) {
	if st := s.DiscoveryStatus.Load(); st != 0 {
		http.Error(w, "discovery is down", int(st))
		return
	}
	rec := httptest.NewRecorder()
	zh.ServeHTTP(rec, r)
	var doc map[string]any
	if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
		http.Error(w, "bad discovery", http.StatusInternalServerError)
		return
	}
	doc["pushed_authorization_request_endpoint"] = s.URL + "/par"
	doc["require_pushed_authorization_requests"] = s.opts.RequirePAR
	doc["authorization_response_iss_parameter_supported"] = s.opts.Iss
	doc["code_challenge_methods_supported"] = []string{"S256"}
	if s.EditDiscovery != nil {
		s.EditDiscovery(doc)
	}
	w.Header().Set("Content-Type", "application/json")
	_ = json.NewEncoder(w).Encode(doc)
}

// authorize resolves a request_uri of a pushed request (single use, for
// the client that pushed it) and hands the request to zitadel, marked as
// pushed or not.
func (s *Server) authorize(w http.ResponseWriter, r *http.Request, zh http.Handler) {
	q := r.URL.Query()
	if uri := q.Get("request_uri"); uri != "" {
		s.mu.Lock()
		pq, ok := s.pushedReqs[uri]
		delete(s.pushedReqs, uri)
		s.mu.Unlock()
		if !ok || pq.Get("client_id") != q.Get("client_id") {
			writeError(w, http.StatusBadRequest, "invalid_request_uri", "the request_uri is unknown, used, or another client's")
			return
		}
		q = pq
		r.URL.RawQuery = q.Encode()
		r = r.WithContext(context.WithValue(r.Context(), pushedKey{}, true))
	}
	s.mu.Lock()
	s.authorized = append(s.authorized, cloneValues(q))
	s.mu.Unlock()
	zh.ServeHTTP(w, r)
}

// par is an RFC 9126 endpoint with zitadel's client authentication.
func (s *Server) par(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		writeError(w, http.StatusBadRequest, "invalid_request", "malformed form")
		return
	}
	f := r.PostForm
	id := f.Get("client_id")
	switch {
	case f.Get("client_assertion_type") == oidc.ClientAssertionTypeJWTAssertion:
		c, err := op.AuthorizePrivateJWTKey(op.ContextWithIssuer(r.Context(), s.URL), f.Get("client_assertion"), s.provider)
		if err != nil || c.GetID() != id {
			writeError(w, http.StatusUnauthorized, "invalid_client", "client authentication failed")
			return
		}
	default:
		user, pass, ok := r.BasicAuth()
		if ok {
			user, _ = url.QueryUnescape(user)
			pass, _ = url.QueryUnescape(pass)
		} else {
			user, pass = id, f.Get("client_secret")
		}
		if user != id || s.Storage.AuthorizeClientIDSecret(r.Context(), id, pass) != nil {
			writeError(w, http.StatusUnauthorized, "invalid_client", "client authentication failed")
			return
		}
	}
	if f.Get("request_uri") != "" {
		writeError(w, http.StatusBadRequest, "invalid_request", "request_uri is not allowed in a pushed request")
		return
	}
	q := url.Values{}
	for k, v := range f {
		switch k {
		case "client_secret", "client_assertion", "client_assertion_type":
		default:
			q[k] = v
		}
	}
	uri := "urn:ietf:params:oauth:request_uri:" + rand.Text()
	s.mu.Lock()
	s.pushedReqs[uri] = q
	s.mu.Unlock()
	s.Pushed.Add(1)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(map[string]any{"request_uri": uri, "expires_in": 60})
}

// login is the merchant's login page: POST id, username, password and
// decision (approve, or deny for access_denied).
func (s *Server) login(w http.ResponseWriter, r *http.Request) {
	if r.Method != http.MethodPost {
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		fmt.Fprint(w, `<!doctype html><form method=post><input name=username><input name=password type=password>`+
			`<button name=decision value=approve>Approve</button><button name=decision value=deny>Deny</button></form>`)
		return
	}
	id := r.FormValue("id")
	if r.FormValue("decision") == "deny" {
		authReq, err := s.Storage.AuthRequestByID(r.Context(), id)
		if err != nil {
			http.Error(w, "unknown authorization request", http.StatusBadRequest)
			return
		}
		op.AuthRequestError(w, r, authReq, oidc.ErrAccessDenied().WithDescription("the user denied the request"), s.provider)
		return
	}
	if err := s.Storage.CheckUsernamePassword(r.FormValue("username"), r.FormValue("password"), id); err != nil {
		http.Error(w, "login failed", http.StatusForbidden)
		return
	}
	http.Redirect(w, r, "/authorize/callback?id="+url.QueryEscape(id), http.StatusFound)
}

// mtlsGate is the RFC 8705 §2.1 check zitadel lacks: a tls_client_auth
// client must present a verified certificate whose subject CN is its
// client_id. It answers invalid_client otherwise.
func (s *Server) mtlsGate(w http.ResponseWriter, r *http.Request) bool {
	c, err := s.Storage.client(r.PostForm.Get("client_id"))
	if err != nil || !c.TLS {
		return true
	}
	if r.TLS != nil && len(r.TLS.VerifiedChains) > 0 && r.TLS.PeerCertificates[0].Subject.CommonName == c.ID {
		return true
	}
	writeError(w, http.StatusUnauthorized, "invalid_client", "a client certificate for this client is required")
	return false
}

func writeError(w http.ResponseWriter, status int, code, desc string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	_ = json.NewEncoder(w).Encode(map[string]string{"error": code, "error_description": desc})
}

// browser does not follow redirects.
var browser = &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// Authorize plays the merchant's browser from an authorization URL of this
// server: it logs in and approves (or denies), and returns where the
// server sends the browser back, the client's redirect URI with a code or
// an error. A refusal the server shows itself (no redirect) is an error.
func (s *Server) Authorize(authURL string, approve bool) (*url.URL, error) {
	resp, err := browser.Get(authURL)
	if err != nil {
		return nil, err
	}
	loc, err := redirect(resp)
	if err != nil {
		return nil, fmt.Errorf("authorize: %w", err)
	}
	if loc.Path != "/login" || !strings.HasPrefix(loc.String(), s.URL) {
		return loc, nil // refused: back to the client
	}
	decision := "approve"
	if !approve {
		decision = "deny"
	}
	resp, err = browser.PostForm(s.URL+"/login", url.Values{"id": {loc.Query().Get("id")}, "username": {Username},
		"password": {Password}, "decision": {decision}})
	if err != nil {
		return nil, err
	}
	if loc, err = redirect(resp); err != nil {
		return nil, fmt.Errorf("login: %w", err)
	}
	if !approve {
		return loc, nil
	}
	resp, err = browser.Get(loc.String())
	if err != nil {
		return nil, err
	}
	if loc, err = redirect(resp); err != nil {
		return nil, fmt.Errorf("authorize callback: %w", err)
	}
	return loc, nil
}

// redirect returns the absolute Location of a redirect answer.
func redirect(resp *http.Response) (*url.URL, error) {
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	if resp.StatusCode != http.StatusFound && resp.StatusCode != http.StatusSeeOther {
		return nil, fmt.Errorf("status %d, want a redirect: %s", resp.StatusCode, strings.TrimSpace(string(body)))
	}
	return resp.Request.URL.Parse(resp.Header.Get("Location"))
}

// ResourceServer starts an API that checks each request's bearer token by
// introspection at this server (RFC 7662, as the resource server
// ResourceClientID): an inactive token is answered 401 with
// `WWW-Authenticate: Bearer error="invalid_token"` (RFC 6750 §3.1), an
// active one 200 with {"active", "sub", "client_id", "scope", "path"}.
func (s *Server) ResourceServer(t testing.TB) *httptest.Server {
	t.Helper()
	rs := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		tok, ok := strings.CutPrefix(r.Header.Get("Authorization"), "Bearer ")
		active := false
		var out map[string]any
		if ok && tok != "" {
			form := url.Values{"token": {tok}}
			req, _ := http.NewRequestWithContext(r.Context(), http.MethodPost, s.URL+"/oauth/introspect", strings.NewReader(form.Encode()))
			req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
			req.SetBasicAuth(ResourceClientID, ResourceClientSecret)
			resp, err := s.Server.Client().Do(req)
			if err != nil {
				writeError(w, http.StatusBadGateway, "introspection_failed", err.Error())
				return
			}
			_ = json.NewDecoder(resp.Body).Decode(&out)
			resp.Body.Close()
			active, _ = out["active"].(bool)
		}
		if !active {
			w.Header().Set("WWW-Authenticate", `Bearer error="invalid_token", error_description="the access token is not active"`)
			writeError(w, http.StatusUnauthorized, "invalid_token", "the access token is not active")
			return
		}
		out["path"] = r.URL.Path
		w.Header().Set("Content-Type", "application/json")
		_ = json.NewEncoder(w).Encode(out)
	}))
	t.Cleanup(rs.Close)
	return rs
}

// Revoke revokes token at the server's RFC 7009 endpoint as client id
// with secret (client_secret_basic), as the client itself would.
func (s *Server) Revoke(id, secret, token string) error {
	req, _ := http.NewRequest(http.MethodPost, s.URL+"/revoke", strings.NewReader(url.Values{"token": {token}}.Encode()))
	req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
	req.SetBasicAuth(url.QueryEscape(id), url.QueryEscape(secret))
	resp, err := s.Server.Client().Do(req)
	if err != nil {
		return err
	}
	body, _ := io.ReadAll(io.LimitReader(resp.Body, 4<<10))
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		return fmt.Errorf("revocation: %d %s", resp.StatusCode, body)
	}
	return nil
}
