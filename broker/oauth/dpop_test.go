package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// dpopAS is a test authorization server whose token and PAR endpoints
// demand DPoP proofs with a nonce (dpoptest.Gate): it checks the client
// authentication of each method, binds codes and refresh tokens to the
// key's thumbprint (dpop_jkt, the proof's jkt), and answers token_type
// tokenType (DPoP unless set).
type dpopAS struct {
	t         *testing.T
	srv       *httptest.Server
	gate      *dpoptest.Gate
	tokenType string

	mu       sync.Mutex
	jkts     []string              // the proof jkt of each token request that passed
	pushed   map[string]url.Values // request_uri -> the pushed request
	codes    map[string]string     // code -> dpop_jkt of its authorization request
	refresh  map[string]string     // refresh token -> jkt it is bound to
	issued   int
	auth     string // the client authentication the token endpoint expects
	clientID string
}

func newDPoPAS(t *testing.T, auth string, pki *testPKI) *dpopAS {
	as := &dpopAS{t: t, auth: auth, clientID: "bank-client", tokenType: "DPoP",
		pushed: map[string]url.Values{}, codes: map[string]string{}, refresh: map[string]string{}}
	mux := http.NewServeMux()
	as.gate = &dpoptest.Gate{Nonce: "as-nonce-1", Next: mux}
	mux.HandleFunc("/token", as.token)
	mux.HandleFunc("/par", as.par)
	if pki != nil {
		as.srv = httptest.NewUnstartedServer(as.gate)
		as.srv.TLS = pki.serverConfig()
		as.srv.StartTLS()
	} else {
		as.srv = httptest.NewServer(as.gate)
	}
	t.Cleanup(as.srv.Close)
	return as
}

// fail answers an OAuth error.
func fail(w http.ResponseWriter, status int, code string) {
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(status)
	fmt.Fprintf(w, `{"error":%q}`, code)
}

// authenticated checks the client authentication of r.
func (as *dpopAS) authenticated(r *http.Request) bool {
	switch as.auth {
	case "basic":
		id, secret, ok := r.BasicAuth()
		return ok && id == as.clientID && secret == url.QueryEscape(secretValue)
	case "post":
		return r.PostForm.Get("client_id") == as.clientID && r.PostForm.Get("client_secret") == secretValue
	case "jwt":
		return r.PostForm.Get("client_assertion_type") == ClientAssertionType && strings.Count(r.PostForm.Get("client_assertion"), ".") == 2
	case "tls":
		return r.TLS != nil && len(r.TLS.PeerCertificates) > 0 && r.PostForm.Get("client_id") == as.clientID
	}
	return false
}

func (as *dpopAS) token(w http.ResponseWriter, r *http.Request) {
	p, _ := dpoptest.ProofFrom(r.Context())
	if err := r.ParseForm(); err != nil || !as.authenticated(r) {
		fail(w, http.StatusUnauthorized, "invalid_client")
		return
	}
	as.mu.Lock()
	defer as.mu.Unlock()
	as.jkts = append(as.jkts, p.JKT)
	switch r.PostForm.Get("grant_type") {
	case "client_credentials":
	case "authorization_code":
		jkt, ok := as.codes[r.PostForm.Get("code")]
		delete(as.codes, r.PostForm.Get("code"))
		if !ok || jkt != p.JKT {
			fail(w, http.StatusBadRequest, "invalid_grant")
			return
		}
	case "refresh_token":
		if jkt, ok := as.refresh[r.PostForm.Get("refresh_token")]; !ok || jkt != p.JKT {
			fail(w, http.StatusBadRequest, "invalid_grant")
			return
		}
	default:
		fail(w, http.StatusBadRequest, "unsupported_grant_type")
		return
	}
	as.issued++
	rt := fmt.Sprintf("rt-%d", as.issued)
	as.refresh[rt] = p.JKT
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(map[string]any{"access_token": fmt.Sprintf("at-%d", as.issued), "token_type": as.tokenType,
		"expires_in": 300, "refresh_token": rt})
}

func (as *dpopAS) par(w http.ResponseWriter, r *http.Request) {
	p, _ := dpoptest.ProofFrom(r.Context())
	if err := r.ParseForm(); err != nil || !as.authenticated(r) {
		fail(w, http.StatusUnauthorized, "invalid_client")
		return
	}
	if jkt := r.PostForm.Get("dpop_jkt"); jkt != p.JKT {
		fail(w, http.StatusBadRequest, "invalid_request")
		return
	}
	as.mu.Lock()
	defer as.mu.Unlock()
	as.issued++
	uri := fmt.Sprintf("urn:ietf:params:oauth:request_uri:%d", as.issued)
	as.pushed[uri] = r.PostForm
	w.Header().Set("Content-Type", "application/json")
	w.WriteHeader(http.StatusCreated)
	fmt.Fprintf(w, `{"request_uri":%q,"expires_in":60}`, uri)
}

// authorize plays the authorization endpoint for an authorization URL:
// it takes the dpop_jkt of the request (or of its pushed request) and
// returns the callback's query with a code bound to it.
func (as *dpopAS) authorize(t *testing.T, authURL string) (url.Values, string) {
	t.Helper()
	u, err := url.Parse(authURL)
	if err != nil {
		t.Fatal(err)
	}
	q := u.Query()
	as.mu.Lock()
	defer as.mu.Unlock()
	if uri := q.Get("request_uri"); uri != "" {
		if q.Has("dpop_jkt") || q.Has("state") {
			t.Error("a pushed authorization request repeats its parameters on the authorization URL")
		}
		q = as.pushed[uri]
	}
	jkt := q.Get("dpop_jkt")
	as.issued++
	code := fmt.Sprintf("code-%d", as.issued)
	as.codes[code] = jkt
	return url.Values{"code": {code}, "state": {q.Get("state")}}, jkt
}

// TestDPoPClientCredentials: with a DPoP key, the client credentials grant
// sends a proof with every client authentication method, the broker
// answers the server's nonce challenge once, and gets a DPoP token; later
// requests carry the remembered nonce at once.
func TestDPoPClientCredentials(t *testing.T) {
	pki := newPKI(t)
	for _, tc := range []struct {
		name string
		auth string
		cfg  Config
	}{
		{"client_secret_basic", "basic", Config{AuthMethod: ClientSecretBasic, ClientSecret: secretValue}},
		{"client_secret_post", "post", Config{AuthMethod: ClientSecretPost, ClientSecret: secretValue}},
		{"private_key_jwt", "jwt", Config{AuthMethod: PrivateKeyJWT, Signer: mustSigner(t, testECKey(t), "", "k1")}},
		{"tls_client_auth", "tls", Config{AuthMethod: TLSClientAuth, Client: pki.client(t, "bank-client")}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			as := newDPoPAS(t, tc.auth, pki)
			key := dpoptest.NewKey(t)
			cfg := tc.cfg
			cfg.Name, cfg.TokenURL, cfg.ClientID, cfg.DPoP = "bank", as.srv.URL+"/token", as.clientID, key
			var told atomic.Int64
			cfg.OnDPoPNonce = func() { told.Add(1) }
			if cfg.Client == nil {
				cfg.Client = pki.client(t, "")
			}
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			for i := range 2 {
				tok, err := brokerToken(t, src, broker.Request{Scopes: []string{"payments"}})
				if err != nil {
					t.Fatalf("token %d: %v", i, err)
				}
				if tok.Type != broker.DPoPType {
					t.Errorf("token type %q, want DPoP", tok.Type)
				}
			}
			if n := as.gate.Challenges.Load(); n != 1 || told.Load() != 1 {
				t.Errorf("%d nonce challenges, %d told to OnDPoPNonce; want 1 (the second request knows the nonce)", n, told.Load())
			}
			if as.gate.Refused.Load() != 0 || len(as.jkts) != 2 || as.jkts[0] != key.Thumbprint() || as.jkts[1] != key.Thumbprint() {
				t.Errorf("refused %d; proofs of keys %q, want two of %s", as.gate.Refused.Load(), as.jkts, key.Thumbprint())
			}
			if b := brokertest.NewBinding("bank#1", src, broker.Request{}); b.DPoP != key {
				t.Error("the source's profiles do not carry its DPoP key")
			}
		})
	}
}

// TestDPoPTokenTypeChecked: a DPoP request answered with a bearer token,
// and a bearer request answered with a DPoP token, fail with an error that
// names the provider and what to check.
func TestDPoPTokenTypeChecked(t *testing.T) {
	for _, tc := range []struct {
		name    string
		key     bool
		answer  string
		wantErr []string
	}{
		{"DPoP asked, Bearer answered", true, "Bearer", []string{`provider bank answered token_type "Bearer" to a request with a DPoP proof`, "dpop_signing_alg_values_supported lists EdDSA", "[providers.bank.dpop]"}},
		{"DPoP asked, dpop answered", true, "dpop", nil},
		{"bearer asked, DPoP answered", false, "DPoP", []string{`provider bank answered token_type "DPoP" to a request without a DPoP proof`, "[providers.bank.dpop] key"}},
		{"MAC answered", false, "mac", []string{`token_type "mac"`, "Bearer and DPoP tokens only"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			as := newDPoPAS(t, "basic", nil)
			as.tokenType = tc.answer
			cfg := Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID, ClientSecret: secretValue}
			if tc.key {
				cfg.DPoP = dpoptest.NewKey(t)
			} else {
				// A bearer client sends no proof: past the gate.
				bare := httptest.NewServer(http.HandlerFunc(as.token))
				t.Cleanup(bare.Close)
				cfg.TokenURL = bare.URL + "/token"
			}
			src, err := NewClientCredentials(cfg)
			if err != nil {
				t.Fatal(err)
			}
			tok, err := brokerToken(t, src, broker.Request{})
			if tc.wantErr == nil {
				if err != nil || tok.Type != broker.DPoPType {
					t.Fatalf("token type %q, err %v; want DPoP", tok.Type, err)
				}
				return
			}
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.Code != "unsupported_token_type" || src.Classify(err) != broker.ClassPermanent {
				t.Fatalf("err = %v, want a permanent unsupported_token_type APIError", err)
			}
			for _, want := range tc.wantErr {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("err = %v\nwant it to say %q", err, want)
				}
			}
			checkNoSecrets(t, err, "at-1", "rt-1", secretValue)
		})
	}
}

// TestDPoPRefreshAndConsent: the consent flow (with and without PAR) sends
// dpop_jkt, the code exchange and the refreshes send proofs of the key
// the code and the refresh token are bound to, and every token is DPoP.
func TestDPoPRefreshAndConsent(t *testing.T) {
	for _, par := range []bool{false, true} {
		t.Run(fmt.Sprintf("par=%t", par), func(t *testing.T) {
			as := newDPoPAS(t, "post", nil)
			key := dpoptest.NewKey(t)
			cfg := Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID, ClientSecret: secretValue,
				AuthMethod: ClientSecretPost, DPoP: key}
			store := &savingStore{}
			src, flow := newFlow(t, cfg, store, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"offline_access"},
				AuthorizationURL: as.srv.URL + "/authorize", PARURL: as.srv.URL + "/par", PAR: par}, &Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
			ctx := context.Background()
			authURL, host, err := startLink(t, flow, "m1")
			if err != nil {
				t.Fatalf("Start: %v", err)
			}
			q, jkt := as.authorize(t, authURL)
			if jkt != key.Thumbprint() {
				t.Fatalf("the authorization request's dpop_jkt is %q, want %s", jkt, key.Thumbprint())
			}
			if _, err := flow.Callback(ctx, host, q); err != nil {
				t.Fatalf("Callback: %v", err)
			}
			for i := range 2 {
				tok, err := brokerToken(t, src, broker.Request{Merchant: "m1"})
				if err != nil || tok.Type != broker.DPoPType {
					t.Fatalf("refresh %d: type %q, err %v", i, tok.Type, err)
				}
			}
			if as.gate.Challenges.Load() != 1 || as.gate.Refused.Load() != 0 {
				t.Errorf("%d nonce challenges (want 1), %d refusals", as.gate.Challenges.Load(), as.gate.Refused.Load())
			}
			if len(as.jkts) != 3 {
				t.Errorf("%d token requests passed, want 3 (exchange, two refreshes)", len(as.jkts))
			}
		})
	}
}

// TestDPoPProofRefused: a refused proof's error says which algorithm and
// key signed it and what to check.
func TestDPoPProofRefused(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fail(w, http.StatusBadRequest, "invalid_dpop_proof")
	}))
	defer srv.Close()
	key := dpoptest.NewKey(t)
	src, err := NewClientCredentials(Config{Name: "bank", TokenURL: srv.URL, ClientID: "c", ClientSecret: secretValue, DPoP: key})
	if err != nil {
		t.Fatal(err)
	}
	_, err = src.Token(context.Background(), broker.Request{})
	if err == nil || !strings.Contains(err.Error(), "signed with EdDSA by the key "+key.Thumbprint()) || !strings.Contains(err.Error(), "dpop_signing_alg_values_supported") {
		t.Errorf("err = %v, want it to name the algorithm, the key and what to check", err)
	}
}

// TestDPoPNonceChallengeClassified: a token request's use_dpop_nonce that
// brought a new nonce is sent again at once (broker.ClassRetryNow) and
// told to OnDPoPNonce; one without a new nonce (none, or the one the
// request carried) is a temporary failure, not told.
func TestDPoPNonceChallengeClassified(t *testing.T) {
	for _, tc := range []struct {
		name  string
		nonce string // the DPoP-Nonce of each answer, "" for none
		want  [2]broker.Class
		told  int64
	}{
		{"no nonce", "", [2]broker.Class{broker.ClassTemporary, broker.ClassTemporary}, 0},
		{"a new nonce, then the same", "n-1", [2]broker.Class{broker.ClassRetryNow, broker.ClassTemporary}, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if tc.nonce != "" {
					w.Header().Set("DPoP-Nonce", tc.nonce)
				}
				fail(w, http.StatusBadRequest, "use_dpop_nonce")
			}))
			defer srv.Close()
			var told atomic.Int64
			src, err := NewClientCredentials(Config{Name: "bank", TokenURL: srv.URL, ClientID: "c", ClientSecret: secretValue, DPoP: dpoptest.NewKey(t),
				OnDPoPNonce: func() { told.Add(1) }})
			if err != nil {
				t.Fatal(err)
			}
			for i, want := range tc.want {
				_, err = src.Token(context.Background(), broker.Request{})
				var ae *broker.APIError
				if !errors.As(err, &ae) || ae.Code != "use_dpop_nonce" || src.Classify(err) != want {
					t.Errorf("request %d: %v, class %v; want use_dpop_nonce, class %v", i+1, err, src.Classify(err), want)
				}
			}
			if n := told.Load(); n != tc.told {
				t.Errorf("OnDPoPNonce told %d times, want %d", n, tc.told)
			}
		})
	}
}

// TestDPoPNonceRaceIsTemporary: a use_dpop_nonce answered to the request
// the broker sent again with the new nonce (the server changed it
// meanwhile) ends the attempt as a temporary failure, which the failure
// memory and the breaker count: two requests, not more.
func TestDPoPNonceRaceIsTemporary(t *testing.T) {
	var requests atomic.Int64
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("DPoP-Nonce", fmt.Sprintf("n-%d", requests.Add(1)))
		fail(w, http.StatusBadRequest, "use_dpop_nonce")
	}))
	defer srv.Close()
	src, err := NewClientCredentials(Config{Name: "bank", TokenURL: srv.URL, ClientID: "c", ClientSecret: secretValue, DPoP: dpoptest.NewKey(t)})
	if err != nil {
		t.Fatal(err)
	}
	br := broker.New(broker.Options{MaxAttempts: 1, BreakerThreshold: 1})
	defer br.Close()
	_, _, err = br.Get(context.Background(), brokertest.NewBinding("bank#1", src, broker.Request{}))
	var ae *broker.APIError
	if !errors.As(err, &ae) || ae.Code != "use_dpop_nonce" {
		t.Fatalf("err = %v, want use_dpop_nonce", err)
	}
	if n := requests.Load(); n != 2 {
		t.Errorf("%d requests, want 2 (the nonce challenge sent again once)", n)
	}
	if h := br.SourcesHealth("bank#1")["bank#1"]; h.Breaker != broker.BreakerOpen || h.FailingKeys != 1 {
		t.Errorf("breaker %v, %d failing keys; want the temporary failure counted: open (threshold 1), 1", h.Breaker, h.FailingKeys)
	}
}

// TestDPoPTokenAnswersObserved: the token requests of a DPoP source go
// through its client's transport as it is when they are sent, so the
// answers reach an observer set on the client after the source was
// built, as the registry sets a provider's rate budget.
func TestDPoPTokenAnswersObserved(t *testing.T) {
	as := newDPoPAS(t, "basic", nil)
	client, err := httpclient.New(0, httpclient.TLSOptions{})
	if err != nil {
		t.Fatal(err)
	}
	src, err := NewClientCredentials(Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID,
		ClientSecret: secretValue, DPoP: dpoptest.NewKey(t), Client: client})
	if err != nil {
		t.Fatal(err)
	}
	var seen atomic.Int64
	httpclient.ObserveTokenAnswers(client, func(rt http.RoundTripper) http.RoundTripper {
		return roundTripFunc(func(r *http.Request) (*http.Response, error) {
			seen.Add(1)
			return rt.RoundTrip(r)
		})
	})
	if _, err := brokerToken(t, src, broker.Request{}); err != nil {
		t.Fatal(err)
	}
	if n := seen.Load(); n != 2 {
		t.Errorf("the observer saw %d token answers, want 2 (the nonce challenge and the token)", n)
	}
}

// TestDPoPNonceRetryNeedsNewNonce: a use_dpop_nonce answer of the token
// endpoint (to the broker's fetch) or of the PAR endpoint is answered with
// a second request only when the key has learnt a nonce other than the one
// the refused request carried: without a DPoP-Nonce header, or with the
// nonce the request already carried, each attempt sends one request.
func TestDPoPNonceRetryNeedsNewNonce(t *testing.T) {
	for _, tc := range []struct {
		name  string
		nonce func(n int64) string // the DPoP-Nonce of the nth answer, "" for none
		want  [2]int64             // the requests of the first and of the second attempt
	}{
		{"no nonce", func(int64) string { return "" }, [2]int64{1, 1}},
		{"one nonce", func(int64) string { return "n-1" }, [2]int64{2, 1}},
		{"new nonce each answer", func(n int64) string { return fmt.Sprintf("n-%d", n) }, [2]int64{2, 2}},
	} {
		for _, endpoint := range []string{"token", "par"} {
			t.Run(tc.name+"/"+endpoint, func(t *testing.T) {
				var requests atomic.Int64
				srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
					if n := tc.nonce(requests.Add(1)); n != "" {
						w.Header().Set("DPoP-Nonce", n)
					}
					fail(w, http.StatusBadRequest, "use_dpop_nonce")
				}))
				defer srv.Close()
				cfg := Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, DPoP: dpoptest.NewKey(t)}
				cc, err := NewClientCredentials(cfg)
				if err != nil {
					t.Fatal(err)
				}
				src, err := NewRefreshToken(cfg, &savingStore{})
				if err != nil {
					t.Fatal(err)
				}
				flow, err := NewAuthCode(src, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"offline_access"}, AuthorizationURL: srv.URL + "/authorize",
					PARURL: srv.URL + "/par", PAR: true}, &Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
				if err != nil {
					t.Fatal(err)
				}
				for i, want := range tc.want {
					before := requests.Load()
					if endpoint == "token" {
						_, err = brokerToken(t, cc, broker.Request{})
					} else {
						_, err = flow.push(context.Background(), srv.URL+"/par", cfg.DPoP, url.Values{"state": {"s"}})
					}
					var ae *broker.APIError
					if !errors.As(err, &ae) || ae.Code != "use_dpop_nonce" {
						t.Fatalf("attempt %d: %v, want use_dpop_nonce", i+1, err)
					}
					if n := requests.Load() - before; n != want {
						t.Errorf("attempt %d sent %d requests, want %d", i+1, n, want)
					}
				}
			})
		}
	}
}

// TestDPoPNonceRetryTakesBudget: the request the broker sends again after
// a token endpoint's nonce challenge takes the provider's budget like any
// other. With room for it, a token fetched after a challenge spends two
// requests. Without, the fetch ends with the budget's refusal, which
// neither the breaker nor the key's failure memory counts; the key keeps
// the new nonce, so the next fetch, once the budget has room, carries it
// and is not challenged.
func TestDPoPNonceRetryTakesBudget(t *testing.T) {
	for _, tc := range []struct {
		name    string
		limit   budget.Limit
		refused bool
	}{
		{"room for both requests", budget.Limit{Rate: 60, Burst: 10, Period: time.Minute}, false},
		{"room for one request", budget.Limit{Rate: 1, Burst: 1, Period: time.Minute}, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			as := newDPoPAS(t, "basic", nil)
			clock := clocktest.New(time.Now())
			src, err := NewClientCredentials(Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID,
				ClientSecret: secretValue, DPoP: dpoptest.NewKey(t), Now: clock.Now})
			if err != nil {
				t.Fatal(err)
			}
			bud := budget.New("bank", tc.limit, budget.NewLocal(clock.Now), clock.Now)
			never := func(context.Context, time.Duration) error { t.Error("a fetch waited"); return nil }
			br := broker.New(broker.Options{Now: clock.Now, Sleep: never, MaxAttempts: 1, BreakerThreshold: 1, FetchTimeout: 30 * time.Second})
			defer br.Close()
			p := broker.NewProfile("bank#1", src, nil, "", 0)
			p.Budget = bud
			b := broker.NewBindingFor(p, "m1", "")
			passed := func() int {
				as.mu.Lock()
				defer as.mu.Unlock()
				return len(as.jkts)
			}

			_, _, err = br.Get(context.Background(), b)
			st := bud.State()
			if !tc.refused {
				if err != nil || st.Used != 2 || st.Exhausted != 0 || as.gate.Challenges.Load() != 1 || passed() != 1 {
					t.Fatalf("err %v; budget used %d, exhausted %d; %d challenges, %d tokens; want a token, 2 used, 1 challenge, 1 token",
						err, st.Used, st.Exhausted, as.gate.Challenges.Load(), passed())
				}
				return
			}
			if bo, ok := broker.BackoffOf(err); !errors.Is(err, budget.ErrExhausted) || !ok || !bo.Budget() {
				t.Fatalf("err = %v, want the budget's refusal", err)
			}
			if st.Used != 1 || st.Exhausted != 1 || as.gate.Challenges.Load() != 1 || passed() != 0 {
				t.Errorf("budget used %d, exhausted %d; %d challenges, %d tokens; want 1 used, 1 exhausted (the second request), 1 challenge, no token",
					st.Used, st.Exhausted, as.gate.Challenges.Load(), passed())
			}
			if h := br.SourcesHealth("bank#1")["bank#1"]; h.Failing() {
				t.Errorf("health %+v: the budget's refusal is counted as the provider's failure", h)
			}

			clock.Add(time.Minute)
			if _, _, err := br.Get(context.Background(), b); err != nil {
				t.Fatalf("once the budget has room: %v", err)
			}
			if st := bud.State(); st.Used != 2 || as.gate.Challenges.Load() != 1 || passed() != 1 {
				t.Errorf("budget used %d, %d challenges, %d tokens; want 2, 1 (the key kept the new nonce), 1", st.Used, as.gate.Challenges.Load(), passed())
			}
		})
	}
}
