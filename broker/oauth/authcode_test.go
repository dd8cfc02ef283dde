package oauth

// The authorization-code flow against zitadel's OP (op_test.go). zitadel
// has no pushed authorization requests, no RFC 9207 iss in its
// authorization responses and no login page; consentShim adds these around
// it, and only these: the authorization request, its validation (client,
// redirect URI, PKCE challenge), the login state, the code, the code
// exchange with its client authentication and PKCE check, the ID token and
// the refresh tokens are zitadel's.

import (
	"context"
	"crypto"
	"encoding/base64"
	"encoding/json"
	"errors"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/zitadel/oidc/v3/pkg/oidc"
	"github.com/zitadel/oidc/v3/pkg/op"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// callbackURL is the registered redirect URI of the consent tests.
const callbackURL = "https://cb.partner.example/consent/callback"

// consentShim adds PAR, iss and a login page to zitadel's OP.
type consentShim struct {
	requirePAR bool // the discovery document sets require_pushed_authorization_requests
	iss        bool // authorization responses carry iss (RFC 9207)

	pushed atomic.Int64
	mu     sync.Mutex
	reqs   map[string]url.Values // by request_uri
}

func (sh *consentShim) wrap(p *op.Provider, st *testStorage, h http.Handler) http.Handler {
	sh.reqs = map[string]url.Values{}
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch r.URL.Path {
		case "/.well-known/openid-configuration":
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			var doc map[string]any
			if err := json.Unmarshal(rec.Body.Bytes(), &doc); err != nil {
				http.Error(w, "bad discovery", 500)
				return
			}
			doc["pushed_authorization_request_endpoint"] = doc["issuer"].(string) + "/par"
			doc["require_pushed_authorization_requests"] = sh.requirePAR
			doc["authorization_response_iss_parameter_supported"] = sh.iss
			w.Header().Set("Content-Type", "application/json")
			_ = json.NewEncoder(w).Encode(doc)
		case "/par":
			sh.par(w, r, p, st)
		case "/authorize":
			if uri := r.URL.Query().Get("request_uri"); uri != "" {
				sh.mu.Lock()
				q, ok := sh.reqs[uri]
				delete(sh.reqs, uri)
				sh.mu.Unlock()
				if !ok || q.Get("client_id") != r.URL.Query().Get("client_id") {
					http.Error(w, "invalid_request_uri", http.StatusBadRequest)
					return
				}
				r.URL.RawQuery = q.Encode()
			} else if sh.requirePAR {
				http.Error(w, "PAR required", http.StatusBadRequest)
				return
			}
			h.ServeHTTP(w, r)
		case "/login":
			// The merchant logs in and approves.
			if err := st.CheckUsernamePassword(r.FormValue("username"), r.FormValue("password"), r.FormValue("id")); err != nil {
				http.Error(w, "login failed", http.StatusForbidden)
				return
			}
			http.Redirect(w, r, "/authorize/callback?id="+url.QueryEscape(r.FormValue("id")), http.StatusFound)
		case "/authorize/callback":
			rec := httptest.NewRecorder()
			h.ServeHTTP(rec, r)
			loc := rec.Header().Get("Location")
			if sh.iss && loc != "" {
				loc += "&iss=" + url.QueryEscape("http://"+r.Host)
			}
			if loc != "" {
				w.Header().Set("Location", loc)
			}
			w.WriteHeader(rec.Code)
			_, _ = w.Write(rec.Body.Bytes())
		default:
			h.ServeHTTP(w, r)
		}
	})
}

// par is an RFC 9126 endpoint with zitadel's client authentication.
func (sh *consentShim) par(w http.ResponseWriter, r *http.Request, p *op.Provider, st *testStorage) {
	fail := func(code string) {
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusUnauthorized)
		_ = json.NewEncoder(w).Encode(map[string]string{"error": code})
	}
	if err := r.ParseForm(); err != nil {
		fail("invalid_request")
		return
	}
	f := r.PostForm
	id := f.Get("client_id")
	switch {
	case f.Get("client_assertion_type") == oidc.ClientAssertionTypeJWTAssertion:
		c, err := op.AuthorizePrivateJWTKey(op.ContextWithIssuer(r.Context(), "http://"+r.Host), f.Get("client_assertion"), p)
		if err != nil || c.GetID() != id {
			fail("invalid_client")
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
		if user != id || st.AuthorizeClientIDSecret(r.Context(), id, pass) != nil {
			fail("invalid_client")
			return
		}
	}
	q := url.Values{}
	for k, v := range f {
		switch k {
		case "client_secret", "client_assertion", "client_assertion_type":
		default:
			q[k] = v
		}
	}
	uri := "urn:ietf:params:oauth:request_uri:" + randomString(16)
	sh.mu.Lock()
	sh.reqs[uri] = q
	sh.mu.Unlock()
	sh.pushed.Add(1)
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	_ = json.NewEncoder(w).Encode(map[string]any{"request_uri": uri, "expires_in": 60})
}

// noRedirect is a browser that does not follow redirects.
var noRedirect = &http.Client{Timeout: 30 * time.Second, CheckRedirect: func(*http.Request, []*http.Request) error { return http.ErrUseLastResponse }}

// approve plays the merchant's browser: it opens authURL, logs in and
// approves at the server, and returns the query the server sends to the
// callback URL.
func approve(t *testing.T, issuer, authURL string) url.Values {
	t.Helper()
	next := func(resp *http.Response, err error) string {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusFound && resp.StatusCode != http.StatusSeeOther {
			t.Fatalf("%s %s: status %d, want a redirect", resp.Request.Method, resp.Request.URL.Path, resp.StatusCode)
		}
		loc, err := resp.Request.URL.Parse(resp.Header.Get("Location"))
		if err != nil {
			t.Fatal(err)
		}
		return loc.String()
	}
	login, err := url.Parse(next(noRedirect.Get(authURL)))
	if err != nil || login.Path != "/login" {
		t.Fatalf("authorize redirected to %v, want the login page", login)
	}
	cb := next(noRedirect.PostForm(issuer+"/login", url.Values{"id": {login.Query().Get("id")}, "username": {"test-user2"}, "password": {"verysecure"}}))
	back := next(noRedirect.Get(cb))
	if !strings.HasPrefix(back, callbackURL+"?") {
		t.Fatalf("the server redirected to %s, want the callback", back)
	}
	u, _ := url.Parse(back)
	return u.Query()
}

// consentFixture is a provider with the consent flow against zitadel.
type consentFixture struct {
	op    *testOP
	shim  *consentShim
	store *MemoryStore
	src   *RefreshToken
	flow  *AuthCode
	pend  *Pendings
	clock *fixedClock
}

func newConsentFixture(t *testing.T, shim *consentShim, method AuthMethod, par bool) *consentFixture {
	t.Helper()
	key := testRSAKey(t)
	client := &testClient{id: "bank-client", secret: secretValue, method: oidc.AuthMethodBasic, redirects: []string{callbackURL}}
	switch method {
	case ClientSecretPost:
		client.method = oidc.AuthMethodPost
	case PrivateKeyJWT:
		client.secret, client.method = "", oidc.AuthMethodPrivateKeyJWT
		client.keys = map[string]crypto.PublicKey{"k1": key.Public()}
	}
	srv := startOP(t, opOptions{wrap: shim.wrap}, client)
	cfg := Config{Name: "bank", Issuer: srv.URL, ClientID: client.id, AuthMethod: method}
	if method == PrivateKeyJWT {
		cfg.Signer, cfg.AssertionAudience = mustSigner(t, key, PS256, "k1"), srv.URL
	} else {
		cfg.ClientSecret = secretValue
	}
	store := NewMemoryStore()
	src, err := NewRefreshToken(cfg, store)
	if err != nil {
		t.Fatal(err)
	}
	clock := newClock()
	pend := &Pendings{Store: &MemoryPendingStore{}, Now: clock.Now}
	flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, ReturnURLs: []string{"https://app.partner.example/consent/"}, PAR: par}, pend)
	if err != nil {
		t.Fatal(err)
	}
	return &consentFixture{op: srv, shim: shim, store: store, src: src, flow: flow, pend: pend, clock: clock}
}

// consent runs one whole consent for merchant and returns the callback's
// query (already used) and result.
func (f *consentFixture) consent(t *testing.T, merchant string) (url.Values, Result) {
	t.Helper()
	ctx := context.Background()
	link, err := f.flow.NewLink(ctx, merchant, "https://app.partner.example/consent/done", "")
	if err != nil {
		t.Fatal(err)
	}
	u, _ := url.Parse(link.URL)
	authURL, rec, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	if rec.Merchant != merchant {
		t.Fatalf("Start is for %q", rec.Merchant)
	}
	q := approve(t, f.op.URL, authURL)
	res, err := f.flow.Callback(ctx, u.Host, q)
	if err != nil {
		t.Fatalf("Callback: %v", err)
	}
	return q, res
}

// TestAuthCodeFlowAgainstZitadel: a consent link, the merchant's login and
// approval, the callback; then the merchant's tokens come from the refresh
// token the callback stored. With PAR off, on by configuration, and
// required by the server; with secrets and private_key_jwt.
func TestAuthCodeFlowAgainstZitadel(t *testing.T) {
	rows := []struct {
		name       string
		method     AuthMethod
		par        bool // configured
		requirePAR bool // advertised by the server
		iss        bool
	}{
		{"client_secret_basic, no PAR", ClientSecretBasic, false, false, false},
		{"client_secret_basic, PAR configured, iss", ClientSecretBasic, true, false, true},
		{"client_secret_post, PAR required by the server", ClientSecretPost, false, true, false},
		{"private_key_jwt, no PAR, iss", PrivateKeyJWT, false, false, true},
		{"private_key_jwt, PAR required by the server", PrivateKeyJWT, false, true, true},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, &consentShim{requirePAR: tc.requirePAR, iss: tc.iss}, tc.method, tc.par)
			q, res := f.consent(t, "acme")
			if res.Merchant != "acme" || res.ReturnURL != "https://app.partner.example/consent/done" || len(res.Fingerprint) != 8 {
				t.Errorf("result %+v", res)
			}
			if wantPAR := tc.par || tc.requirePAR; (f.shim.pushed.Load() == 1) != wantPAR {
				t.Errorf("pushed %d requests, PAR wanted: %v", f.shim.pushed.Load(), wantPAR)
			}
			rt, err := f.store.Load(context.Background(), f.src.StoreKey("acme"))
			if err != nil || !f.op.Storage.refreshTokenValid(rt.Reveal()) {
				t.Fatalf("stored refresh token: %v (valid at the server: false)", err)
			}
			tok, err := f.src.Token(context.Background(), broker.Request{Merchant: "acme"})
			if err != nil || tok.Value == "" {
				t.Fatalf("Token after consent: %v", err)
			}
			if n := f.op.count("refresh_token"); n != 1 {
				t.Errorf("%d refresh requests, want 1", n)
			}
			if n := f.op.count("authorization_code"); n != 1 {
				t.Errorf("%d code exchanges, want 1", n)
			}
			// Nothing the flow keeps is readable in its store.
			if n := f.pend.Store.(*MemoryPendingStore).Len(); n != 0 {
				t.Errorf("%d consents left pending", n)
			}
			_ = q
		})
	}
}

// TestAuthCodeRefusals: each refused callback or start, with its reason;
// none stores a refresh token, and no error quotes a code, state or
// verifier.
func TestAuthCodeRefusals(t *testing.T) {
	ctx := context.Background()
	type setup struct {
		f    *consentFixture
		host string
	}
	// begin opens a consent link and approves at the server; it returns
	// the callback query, not yet used.
	begin := func(t *testing.T, f *consentFixture) url.Values {
		link, err := f.flow.NewLink(ctx, "acme", "", "")
		if err != nil {
			t.Fatal(err)
		}
		u, _ := url.Parse(link.URL)
		authURL, _, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host)
		if err != nil {
			t.Fatal(err)
		}
		return approve(t, f.op.URL, authURL)
	}
	const host = "cb.partner.example"
	rows := []struct {
		name   string
		iss    bool
		reason string
		run    func(t *testing.T, f *consentFixture) error
	}{
		{"replayed state", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			if _, err := f.flow.Callback(ctx, host, q); err != nil {
				t.Fatalf("first callback: %v", err)
			}
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"unknown state", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Set("state", randomString(32))
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"no state", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Del("state")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"expired link", false, ReasonExpired, func(t *testing.T, f *consentFixture) error {
			link, err := f.flow.NewLink(ctx, "acme", "", "")
			if err != nil {
				t.Fatal(err)
			}
			f.clock.Add(DefaultLinkTTL + time.Second)
			u, _ := url.Parse(link.URL)
			_, _, err = f.flow.Start(ctx, u.Query().Get("link"), u.Host)
			return err
		}},
		{"replayed link", false, ReasonUnknownState, func(t *testing.T, f *consentFixture) error {
			link, err := f.flow.NewLink(ctx, "acme", "", "")
			if err != nil {
				t.Fatal(err)
			}
			u, _ := url.Parse(link.URL)
			if _, _, err := f.flow.Start(ctx, u.Query().Get("link"), u.Host); err != nil {
				t.Fatal(err)
			}
			_, _, err = f.flow.Start(ctx, u.Query().Get("link"), u.Host)
			return err
		}},
		{"expired state", false, ReasonExpired, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			f.clock.Add(StateTTL + time.Second)
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"callback for another provider", false, ReasonWrongProvider, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			cfg := f.src.c.cfg
			cfg.Name = "other-bank"
			other, err := NewRefreshToken(cfg, f.store)
			if err != nil {
				t.Fatal(err)
			}
			flow, err := NewAuthCode(other, AuthCodeConfig{RedirectURIs: []string{callbackURL}}, f.pend)
			if err != nil {
				t.Fatal(err)
			}
			_, err = flow.Callback(ctx, host, q)
			return err
		}},
		{"callback on another host", false, ReasonWrongCallback, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.Callback(ctx, "evil.example", begin(t, f))
			return err
		}},
		{"wrong iss", true, ReasonWrongIssuer, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			if q.Get("iss") != f.op.URL {
				t.Fatalf("the server sent iss %q", q.Get("iss"))
			}
			q.Set("iss", "https://mix-up.example")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"iss missing though advertised", true, ReasonWrongIssuer, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Del("iss")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"iss sent by a server that does not advertise it, wrong", false, ReasonWrongIssuer, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q.Set("iss", "https://mix-up.example")
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"missing PKCE verifier at the server", false, ReasonExchangeFailed, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			f.flow.noVerifier = true
			_, err := f.flow.Callback(ctx, host, q)
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.StatusCode != http.StatusBadRequest {
				t.Errorf("want the server's refusal, got %v", err)
			}
			return err
		}},
		{"access denied", false, ReasonDenied, func(t *testing.T, f *consentFixture) error {
			q := begin(t, f)
			q = url.Values{"state": q["state"], "error": {"access_denied"}, "error_description": {"the user said no"}}
			_, err := f.flow.Callback(ctx, host, q)
			return err
		}},
		{"return URL not allow-listed", false, ReasonReturnURL, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.NewLink(ctx, "acme", "https://evil.example/consent/done", "")
			return err
		}},
		{"return URL outside the allowed path", false, ReasonReturnURL, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.NewLink(ctx, "acme", "https://app.partner.example/other", "")
			return err
		}},
		{"return URL escaping the allowed path", false, ReasonReturnURL, func(t *testing.T, f *consentFixture) error {
			_, err := f.flow.NewLink(ctx, "acme", "https://app.partner.example/consent/%2e%2e/admin", "")
			return err
		}},
	}
	for _, tc := range rows {
		t.Run(tc.name, func(t *testing.T) {
			f := newConsentFixture(t, &consentShim{iss: tc.iss}, ClientSecretBasic, false)
			saves := 0
			err := tc.run(t, f)
			var ce *ConsentError
			if !errors.As(err, &ce) || ce.Reason != tc.reason {
				t.Fatalf("err = %v, want a *ConsentError %s", err, tc.reason)
			}
			if tc.name == "replayed state" {
				saves = 1
			}
			if f.store.Saves() != saves {
				t.Errorf("%d refresh tokens saved, want %d", f.store.Saves(), saves)
			}
			checkNoSecrets(t, err)
			if strings.Contains(err.Error(), "code=") || strings.Contains(err.Error(), "state=") {
				t.Errorf("the error quotes a parameter: %v", err)
			}
		})
	}
}

// TestConsentAgainAfterInvalidGrant: once the server refuses the refresh
// token the merchant needs consent; a new consent restores the service
// with the same source, without a restart.
func TestConsentAgainAfterInvalidGrant(t *testing.T) {
	f := newConsentFixture(t, &consentShim{}, ClientSecretBasic, false)
	ctx := context.Background()
	f.consent(t, "acme")
	rt, _ := f.store.Load(ctx, f.src.StoreKey("acme"))
	f.op.Storage.mu.Lock()
	delete(f.op.Storage.refresh, rt.Reveal()) // revoked at the bank
	f.op.Storage.mu.Unlock()

	_, err := f.src.Token(ctx, broker.Request{Merchant: "acme"})
	var cr *ConsentRequiredError
	if !errors.As(err, &cr) || cr.Merchant != "acme" {
		t.Fatalf("Token with a revoked refresh token = %v, want *ConsentRequiredError", err)
	}
	if st := f.src.ConsentStatus("acme"); st.ConsentRequiredSince.IsZero() {
		t.Errorf("status after invalid_grant = %+v, want consent required", st)
	}
	f.consent(t, "acme")
	if st := f.src.ConsentStatus("acme"); !st.ConsentRequiredSince.IsZero() {
		t.Errorf("status after the new consent = %+v", st)
	}
	if tok, err := f.src.Token(ctx, broker.Request{Merchant: "acme"}); err != nil || tok.Value == "" {
		t.Fatalf("Token after the new consent = %v", err)
	}
}

// TestPendingsSealed: the store holds neither the link id, the state nor
// the verifier, and a record does not open under another secret.
func TestPendingsSealed(t *testing.T) {
	ms := &MemoryPendingStore{}
	p := &Pendings{Store: ms, Now: newClock().Now}
	ctx := context.Background()
	secret := randomString(32)
	rec := Pending{Provider: "bank", Merchant: "acme", Verifier: "verifier-" + secret, Expires: p.now().Add(time.Minute)}
	if err := p.put(ctx, kindState, secret, rec); err != nil {
		t.Fatal(err)
	}
	for k, v := range ms.m {
		for _, s := range []string{secret, rec.Verifier, "acme", base64.RawURLEncoding.EncodeToString([]byte(secret))} {
			if strings.Contains(k, s) || strings.Contains(string(v.val), s) {
				t.Errorf("the store shows %q", s)
			}
		}
	}
	if _, err := p.take(ctx, kindLink, secret); !errors.Is(err, ErrUnknownPending) {
		t.Errorf("taken as another kind: %v", err)
	}
	got, err := p.take(ctx, kindState, secret)
	if err != nil || got.Verifier != rec.Verifier {
		t.Fatalf("take = %+v, %v", got, err)
	}
	if _, err := p.take(ctx, kindState, secret); !errors.Is(err, ErrUnknownPending) {
		t.Errorf("second take: %v", err)
	}
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
