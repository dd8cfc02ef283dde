package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/caddyserver/caddy/v2/caddyconfig"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/dpopas"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoprs"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// dpopAlgs are the proof algorithms, each a provider of the DPoP tests.
var dpopAlgs = []string{dpop.ES256, dpop.PS256, dpop.EdDSA}

// dpopKeyFile writes a new private key for alg (PKCS#8 PEM) into dir and
// returns its path and the key as the broker reads it.
func dpopKeyFile(t testing.TB, dir, alg string) (string, *dpop.Key) {
	t.Helper()
	pemBytes, err := dpoptest.KeyPEM(alg)
	if err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, strings.ToLower(alg)+".pem")
	if err := os.WriteFile(path, pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	k, err := dpop.ParseKey(pemBytes, "")
	if err != nil {
		t.Fatal(err)
	}
	return path, k
}

// dpopEnv is the broker in Caddy (in this process) in front of a real
// DPoP resource server (dpoprs), with tokens from a real DPoP
// authorization server (dpopas, node oidc-provider) that demands nonces,
// as does the resource server. Each of dpopAlgs is a provider
// ("bank-es256", ...) with a key of its own and one merchant ("m-es256",
// ...).
type dpopEnv struct {
	as    *dpopas.Server
	rs    *dpoprs.Server
	rsTLS *dpoprs.Server // the same over HTTPS
	// rsFwd is an HTTPS resource server, without nonces, that trusts the
	// forwarding headers (dpoprs.Options.TrustForwarded).
	rsFwd   *dpoprs.Server
	base    string
	keys    map[string]*dpop.Key // by merchant
	logFile string
}

// dpopCaddyfile serves three routes to the resource server: /api/* with
// the DPoP transport, /short/* with its prefix stripped and a /v2 prefix
// added before the DPoP transport, /bare/* without the transport, and
// /tls/* with the DPoP transport to the HTTPS resource server, and /fwd/*
// likewise to the HTTPS one that trusts the forwarding headers, as do
// /fwdhost/* with an X-Forwarded-Host of the operator's and /fwduni/*
// with a Host of non-ASCII letters. Every log goes to DPOP_LOG at debug
// level, reverse_proxy's included.
const dpopCaddyfile = `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	log {
		output file {$DPOP_LOG}
		level DEBUG
	}
	token_broker {
		config {$DPOP_REGISTRY}
	}
	persist_config off
}

http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	log {
		output file {$DPOP_LOG}
	}
	handle /api/* {
		token_broker
		reverse_proxy {$DPOP_RS} {
			transport token_broker_dpop
		}
	}
	handle_path /short/* {
		token_broker
		rewrite * /v2{uri}
		reverse_proxy {$DPOP_RS} {
			transport token_broker_dpop {
				dial_timeout 5s
			}
		}
	}
	handle /bare/* {
		token_broker
		reverse_proxy {$DPOP_RS}
	}
	handle /tls/* {
		token_broker
		reverse_proxy {$DPOP_RS_TLS} {
			transport token_broker_dpop {
				tls_insecure_skip_verify
			}
		}
	}
	handle /fwd/* {
		token_broker
		reverse_proxy {$DPOP_RS_FWD} {
			transport token_broker_dpop {
				tls_insecure_skip_verify
			}
		}
	}
	handle /fwdhost/* {
		token_broker
		reverse_proxy {$DPOP_RS_FWD} {
			header_up X-Forwarded-Host gw.partner.example
			transport token_broker_dpop {
				tls_insecure_skip_verify
			}
		}
	}
	handle /fwduni/* {
		token_broker
		reverse_proxy {$DPOP_RS_FWD} {
			header_up Host bänk.example
			transport token_broker_dpop {
				tls_insecure_skip_verify
			}
		}
	}
}
`

func startDPoPEnv(t *testing.T) *dpopEnv {
	t.Helper()
	const clientID, secret = "broker-client", "broker-secret-dpop"
	as := dpopas.Start(t, dpopas.Options{Clients: []dpopas.Client{{ID: clientID, Secret: secret}}, RequireNonce: true})
	rs := dpoprs.Start(t, dpoprs.Options{Keys: dpoprs.JWKSURL(as.JWKSURL), Issuer: as.Issuer, Nonce: true})
	dir := t.TempDir()
	rsTLS := dpoprs.Start(t, dpoprs.Options{Keys: dpoprs.JWKSURL(as.JWKSURL), Issuer: as.Issuer, Nonce: true, TLS: true})
	rsFwd := dpoprs.Start(t, dpoprs.Options{Keys: dpoprs.JWKSURL(as.JWKSURL), Issuer: as.Issuer, TLS: true, TrustForwarded: true})
	env := &dpopEnv{as: as, rs: rs, rsTLS: rsTLS, rsFwd: rsFwd, keys: map[string]*dpop.Key{}, logFile: filepath.Join(dir, "caddy.log")}
	var reg strings.Builder
	for _, alg := range dpopAlgs {
		name := strings.ToLower(alg)
		path, k := dpopKeyFile(t, dir, alg)
		env.keys["m-"+name] = k
		fmt.Fprintf(&reg, `[providers.bank-%[1]s]
type = "oauth2"
token_url = %[2]q
client_id = %[3]q
client_secret = "{env.DPOP_CLIENT_SECRET}"
auth_method = "client_secret_basic"

[providers.bank-%[1]s.dpop]
key = %[4]q

[merchants.m-%[1]s]
provider = "bank-%[1]s"
scopes = ["accounts"]

`, name, as.TokenURL, clientID, path)
	}
	regFile := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(regFile, []byte(reg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DPOP_CLIENT_SECRET", secret)
	t.Setenv("DPOP_REGISTRY", regFile)
	t.Setenv("DPOP_RS", rs.URL)
	t.Setenv("DPOP_RS_TLS", rsTLS.URL)
	t.Setenv("DPOP_RS_FWD", rsFwd.URL)
	t.Setenv("DPOP_LOG", env.logFile)
	env.base = startCaddy(t, dpopCaddyfile)
	return env
}

// do sends a request through the broker for merchant, with the caller's
// own credentials and DPoP header (which must not reach the upstream),
// and returns the status and body.
func (e *dpopEnv) do(t *testing.T, method, path, merchant, body string) (int, string) {
	t.Helper()
	req, err := http.NewRequest(method, e.base+path, strings.NewReader(body))
	if err != nil {
		t.Fatal(err)
	}
	req.Header.Set("X-Merchant-Id", merchant)
	req.Header.Set("Authorization", "Bearer caller-credential")
	req.Header.Set("DPoP", "caller.forged.proof")
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, string(b)
}

// direct sends a request straight to the resource server with the given
// Authorization and DPoP headers ("" none), as an attacker holding them
// would, with the Host header the broker sends (reverse_proxy passes the
// caller's on), and returns the status.
func (e *dpopEnv) direct(t *testing.T, method, path, authorization, proof string) int {
	t.Helper()
	req, err := http.NewRequest(method, e.rs.URL+path, nil)
	if err != nil {
		t.Fatal(err)
	}
	req.Host = strings.TrimPrefix(e.base, "http://")
	if authorization != "" {
		req.Header.Set("Authorization", authorization)
	}
	if proof != "" {
		req.Header.Set("DPoP", proof)
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	resp.Body.Close()
	return resp.StatusCode
}

// lastAccepted returns the resource server's last accepted request.
func (e *dpopEnv) lastAccepted(t *testing.T) dpoprs.Seen {
	t.Helper()
	a := e.rs.Accepted()
	if len(a) == 0 {
		t.Fatalf("the resource server accepted nothing; refusals %+v", e.rs.Refusals())
	}
	return a[len(a)-1]
}

// lastRefusal returns the resource server's last refusal.
func (e *dpopEnv) lastRefusal(t *testing.T) dpoprs.Refusal {
	t.Helper()
	r := e.rs.Refusals()
	if len(r) == 0 {
		t.Fatal("the resource server refused nothing")
	}
	return r[len(r)-1]
}

// TestDPoPThroughCaddy: the broker gets DPoP-bound tokens from a real
// authorization server (client credentials, a nonce challenge at the token
// endpoint) and sends each proxied request with "Authorization: DPoP" and
// a fresh proof a strict resource server accepts, for each algorithm: the
// resource server's nonce challenge is answered with one retry (the body
// replayed), the proof names the URL the resource server receives after a
// path rewrite and to an HTTPS upstream, and so do the forwarding headers
// an upstream may trust (a Host of non-ASCII letters in Punycode), unless
// the operator set them, the caller's DPoP header never
// reaches it, a replayed
// proof and a token without its proof are refused there, a route without
// the DPoP transport answers 502 and stops forwarding, the metrics count
// the challenges, the admin state shows the keys, and no log holds a
// proof or a token.
func TestDPoPThroughCaddy(t *testing.T) {
	e := startDPoPEnv(t)
	before := scrape(t, adminURL()+"/metrics")

	for _, alg := range dpopAlgs {
		merchant := "m-" + strings.ToLower(alg)
		t.Run("client credentials/"+alg, func(t *testing.T) {
			challenges := e.rs.Challenges()
			if status, body := e.do(t, "GET", "/api/accounts/1", merchant, ""); status != http.StatusOK {
				t.Fatalf("GET: %d %s; refusals %+v", status, body, e.rs.Refusals())
			}
			got := e.lastAccepted(t)
			// reverse_proxy passes the caller's Host on: the URL received.
			if got.JKT != e.keys[merchant].Thumbprint() || got.URL != e.base+"/api/accounts/1" || got.Subject == "" {
				t.Errorf("accepted %+v, want the key %s at %s/api/accounts/1", got, e.keys[merchant].Thumbprint(), e.base)
			}
			if n := e.rs.Challenges() - challenges; n != 1 {
				t.Errorf("%d nonce challenges at the resource server for the key's first request, want 1", n)
			}
			// The nonce is remembered: no challenge the second time.
			if status, body := e.do(t, "GET", "/api/accounts/2", merchant, ""); status != http.StatusOK {
				t.Fatalf("second GET: %d %s", status, body)
			}
			if n := e.rs.Challenges() - challenges; n != 1 {
				t.Errorf("%d nonce challenges after the second request, want still 1", n)
			}
		})
	}

	merchant := "m-eddsa"
	t.Run("new nonce: POST retried with its body", func(t *testing.T) {
		e.rs.RotateNonce()
		challenges := e.rs.Challenges()
		const payment = `{"amount":"10.00","currency":"EUR"}`
		if status, body := e.do(t, "POST", "/api/payments", merchant, payment); status != http.StatusOK {
			t.Fatalf("POST: %d %s; refusals %+v", status, body, e.rs.Refusals())
		}
		if got := e.lastAccepted(t); got.Method != "POST" || got.Body != payment {
			t.Errorf("accepted %+v, want the POST with its body", got)
		}
		if n := e.rs.Challenges() - challenges; n != 1 {
			t.Errorf("%d challenges, want 1", n)
		}
	})

	t.Run("path rewrite: htu is the URL received", func(t *testing.T) {
		if status, body := e.do(t, "GET", "/short/accounts/7", merchant, ""); status != http.StatusOK {
			t.Fatalf("GET: %d %s; refusals %+v", status, body, e.rs.Refusals())
		}
		if got := e.lastAccepted(t); got.URL != e.base+"/v2/accounts/7" {
			t.Errorf("accepted %+v, want %s/v2/accounts/7", got, e.base)
		}
	})

	t.Run("https upstream: htu names the upstream", func(t *testing.T) {
		if status, body := e.do(t, "GET", "/tls/accounts", merchant, ""); status != http.StatusOK {
			t.Fatalf("GET: %d %s; refusals %+v", status, body, e.rsTLS.Refusals())
		}
		// reverse_proxy sends an HTTPS upstream its own host as Host.
		if a := e.rsTLS.Accepted(); len(a) != 1 || a[0].URL != e.rsTLS.URL+"/tls/accounts" || a[0].JKT != e.keys[merchant].Thumbprint() {
			t.Errorf("accepted %+v, want one request to %s/tls/accounts", a, e.rsTLS.URL)
		}
		if n := e.rsTLS.Challenges(); n != 1 {
			t.Errorf("%d nonce challenges at the HTTPS server, want 1: its origin's nonce is its own", n)
		}
	})

	t.Run("upstream trusting the forwarding headers: they name the URL signed", func(t *testing.T) {
		// reverse_proxy's X-Forwarded-Proto and X-Forwarded-Host name the
		// caller's request to the sidecar (http, its address) unless the
		// transport makes them name the request it signs.
		if status, body := e.do(t, "GET", "/fwd/accounts", merchant, ""); status != http.StatusOK {
			t.Fatalf("GET: %d %s; refusals %+v", status, body, e.rsFwd.Refusals())
		}
		if a := e.rsFwd.Accepted(); len(a) != 1 || a[0].URL != e.rsFwd.URL+"/fwd/accounts" {
			t.Errorf("accepted %+v, want one request to %s/fwd/accounts", a, e.rsFwd.URL)
		}
	})

	t.Run("upstream trusting the forwarding headers: a Host of non-ASCII letters in Punycode", func(t *testing.T) {
		// header_up Host bänk.example: Go sends the Host header, and the
		// proof's htu names the host, in Punycode; X-Forwarded-Host too.
		if status, body := e.do(t, "GET", "/fwduni/accounts", merchant, ""); status != http.StatusOK {
			t.Fatalf("GET: %d %s; refusals %+v", status, body, e.rsFwd.Refusals())
		}
		if a := e.rsFwd.Accepted(); len(a) == 0 || a[len(a)-1].URL != "https://xn--bnk-qla.example/fwduni/accounts" {
			t.Errorf("accepted %+v, want a request to https://xn--bnk-qla.example/fwduni/accounts", a)
		}
	})

	t.Run("upstream trusting the forwarding headers: the operator's X-Forwarded-Host is sent as it is", func(t *testing.T) {
		// header_up X-Forwarded-Host gw.partner.example: the upstream
		// rebuilds its URL from the operator's value, which is not the
		// one the proof was made for.
		refused := len(e.rsFwd.Refusals())
		e.do(t, "GET", "/fwdhost/accounts", merchant, "")
		got := e.rsFwd.Refusals()[refused:]
		if len(got) == 0 || got[0].URL != "https://gw.partner.example/fwdhost/accounts" || got[0].Reason != dpoprs.ReasonHTU {
			t.Errorf("refusals %+v, want the request to https://gw.partner.example/fwdhost/accounts refused for its htu", got)
		}
	})

	t.Run("replayed proof refused", func(t *testing.T) {
		if status, body := e.do(t, "GET", "/api/balances", merchant, ""); status != http.StatusOK {
			t.Fatalf("GET: %d %s", status, body)
		}
		auth, proof := e.rs.LastCredentials()
		if status := e.direct(t, "GET", "/api/balances", auth, proof); status != http.StatusUnauthorized {
			t.Fatalf("replay: status %d, want 401", status)
		}
		if r := e.lastRefusal(t); r.Reason != dpoprs.ReasonReplay {
			t.Errorf("replay refused for %q, want %q", r.Reason, dpoprs.ReasonReplay)
		}
	})

	t.Run("token without its proof refused", func(t *testing.T) {
		auth, _ := e.rs.LastCredentials()
		token := strings.TrimPrefix(auth, "DPoP ")
		for _, tc := range []struct{ auth, reason string }{
			{auth, dpoprs.ReasonNoProof},
			{"Bearer " + token, dpoprs.ReasonScheme},
		} {
			if status := e.direct(t, "GET", "/api/balances", tc.auth, ""); status != http.StatusUnauthorized {
				t.Fatalf("status %d, want 401", status)
			}
			if r := e.lastRefusal(t); r.Reason != tc.reason {
				t.Errorf("refused for %q, want %q", r.Reason, tc.reason)
			}
		}
	})

	t.Run("route without the DPoP transport", func(t *testing.T) {
		refusals := len(e.rs.Refusals())
		for i := range 2 {
			status, body := e.do(t, "GET", "/bare/accounts", merchant, "")
			if status != http.StatusBadGateway || !strings.Contains(body, "dpop_transport_missing") || !strings.Contains(body, "token_broker_dpop") {
				t.Fatalf("request %d: %d %s, want 502 dpop_transport_missing naming the transport", i, status, body)
			}
		}
		// Both requests reached the resource server without any
		// credential: the token never leaves without its proof, and a
		// route found without the transport is judged per request.
		got := e.rs.Refusals()[refusals:]
		if len(got) != 2 {
			t.Fatalf("refusals %+v, want two", got)
		}
		for _, rf := range got {
			if rf.Reason != dpoprs.ReasonScheme || rf.Detail != dpoprs.DetailNoAuthorization {
				t.Errorf("refusal %+v, want %q: no Authorization header at all", rf, dpoprs.DetailNoAuthorization)
			}
		}
	})

	t.Run("metrics", func(t *testing.T) {
		after := scrape(t, adminURL()+"/metrics")
		want := map[string]float64{}
		for _, alg := range dpopAlgs {
			n := 1.0
			if alg == dpop.EdDSA {
				n = 3 // and the rotated nonce, and the HTTPS server's first (a nonce per origin)
			}
			want[fmt.Sprintf(`caddy_token_broker_dpop_nonce_challenges_total{provider="bank-%s",server="resource"}`, strings.ToLower(alg))] = n
		}
		checkDelta(t, "after the requests", before, after, want)
		// The authorization server demands a nonce: each key's first token
		// request was challenged (it may rotate its nonce meanwhile). The
		// challenged request is counted as retry_now, no failure: none as
		// token_refused.
		for _, alg := range dpopAlgs {
			series := fmt.Sprintf(`caddy_token_broker_dpop_nonce_challenges_total{provider="bank-%s",server="token"}`, strings.ToLower(alg))
			if after[series]-before[series] < 1 {
				t.Errorf("%s went up by %v, want at least 1", series, after[series]-before[series])
			}
			requests := `caddy_token_broker_token_requests_total{outcome="%s",provider="bank-` + strings.ToLower(alg) + `"}`
			retried, refused := fmt.Sprintf(requests, "retry_now"), fmt.Sprintf(requests, "token_refused")
			if after[retried]-before[retried] < 1 || after[refused] != before[refused] {
				t.Errorf("%s went up by %v, %s by %v; want at least 1, 0", retried, after[retried]-before[retried], refused, after[refused]-before[refused])
			}
		}
	})

	t.Run("admin state", func(t *testing.T) {
		status, body := adminCall(t, "GET", "/token_broker/state")
		if status != http.StatusOK {
			t.Fatalf("state: %d %s", status, body)
		}
		var rep struct {
			Providers []struct {
				Name string `json:"name"`
				DPoP *struct {
					Alg string `json:"alg"`
					JKT string `json:"jkt"`
				} `json:"dpop"`
			} `json:"providers"`
		}
		if err := json.Unmarshal([]byte(body), &rep); err != nil {
			t.Fatal(err)
		}
		seen := 0
		for _, p := range rep.Providers {
			k := e.keys["m-"+strings.TrimPrefix(p.Name, "bank-")]
			if k == nil {
				continue
			}
			seen++
			if p.DPoP == nil || p.DPoP.Alg != k.Alg() || p.DPoP.JKT != k.Thumbprint() {
				t.Errorf("provider %s: dpop %+v, want %s %s", p.Name, p.DPoP, k.Alg(), k.Thumbprint())
			}
		}
		if seen != len(dpopAlgs) {
			t.Errorf("state shows %d of the %d DPoP providers: %s", seen, len(dpopAlgs), body)
		}
	})

	t.Run("no proof or token in the logs", func(t *testing.T) {
		auth, proof := e.rs.LastCredentials()
		logs := readFile(t, e.logFile)
		if !strings.Contains(logs, "upstream roundtrip") {
			t.Fatal("reverse_proxy's debug log is not in the log file: the check would prove nothing")
		}
		token := strings.TrimPrefix(auth, "DPoP ")
		jws := strings.Split(proof, ".")
		for what, secret := range map[string]string{"a proof's signature": jws[len(jws)-1], "the token": token} {
			if strings.Contains(logs, secret) {
				t.Errorf("the log holds %s", what)
			}
		}
		if strings.Contains(logs, `"Dpop":["ey`) {
			t.Error("the log holds a DPoP proof header")
		}
	})
}

// dpopConsentCaddyfile is the sidecar (consent links, /api/* to the
// resource server with the DPoP transport) and its consent site.
const dpopConsentCaddyfile = `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	storage file_system {$DPOP_STORAGE}
	token_broker {
		config {$DPOP_REGISTRY}
	}
	persist_config off
}

http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	handle /consent/links {
		token_broker_consent bank {
			links
		}
	}
	handle /api/* {
		token_broker
		reverse_proxy {$DPOP_RS} {
			transport token_broker_dpop
		}
	}
}

{$CONSENT_SITE} {
	token_broker_consent bank
}
`

// TestDPoPConsentThroughCaddy: a merchant consents at the real
// authorization server (the authorization request names the key's
// thumbprint, dpop_jkt); the broker then gets DPoP-bound tokens by refresh
// (proofs and nonces at the token endpoint) and the resource server
// accepts the proxied calls; after a purge the next call refreshes again
// and the new token is bound to the same key.
func TestDPoPConsentThroughCaddy(t *testing.T) {
	cbPort := freePort(t)
	site := fmt.Sprintf("http://127.0.0.1:%d", cbPort)
	const clientID, secret = "consent-client", "consent-secret-dpop"
	as := dpopas.Start(t, dpopas.Options{RequireNonce: true, Clients: []dpopas.Client{{ID: clientID, Secret: secret,
		RedirectURIs: []string{site + "/consent/callback"}}}})
	rs := dpoprs.Start(t, dpoprs.Options{Keys: dpoprs.JWKSURL(as.JWKSURL), Issuer: as.Issuer, Nonce: true})
	dir := t.TempDir()
	keyPath, key := dpopKeyFile(t, dir, dpop.EdDSA)
	reg := fmt.Sprintf(`[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = %q
client_id = %q
client_secret = "{env.DPOP_CLIENT_SECRET}"
  [providers.bank.consent]
  redirect_uris = [%q]
  scopes = ["openid", "offline_access", "accounts"]
  [providers.bank.dpop]
  key = %q

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`, as.Issuer, clientID, site+"/consent/callback", keyPath)
	regFile := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(regFile, []byte(reg), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("DPOP_CLIENT_SECRET", secret)
	t.Setenv("DPOP_REGISTRY", regFile)
	t.Setenv("DPOP_RS", rs.URL)
	t.Setenv("DPOP_STORAGE", filepath.Join(dir, "storage"))
	t.Setenv("CONSENT_SITE", site)
	base := startCaddy(t, dpopConsentCaddyfile)
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", cbPort))

	status, link := consentLink(t, base, "acme", "")
	if status != http.StatusOK {
		t.Fatalf("consent link: %d %v", status, link)
	}
	browser := newBrowser()
	resp := startConsent(t, browser, link["url"])
	authURL := resp.Header.Get("Location")
	if resp.StatusCode != http.StatusSeeOther || !strings.HasPrefix(authURL, as.Issuer) {
		t.Fatalf("consent start: %d to %q, want a redirect to the authorization server", resp.StatusCode, authURL)
	}
	code, state := as.Approve(t, nil, authURL)
	callback := site + "/consent/callback?" + url.Values{"code": {code}, "state": {state}, "iss": {as.Issuer}}.Encode()
	resp = hop(t, browser, mustReq(t, http.MethodGet, callback, nil), true)
	if resp.StatusCode != http.StatusSeeOther {
		t.Fatalf("callback: %d", resp.StatusCode)
	}

	call := func(path string) dpoprs.Seen {
		t.Helper()
		req := mustReq(t, http.MethodGet, base+path, nil)
		req.Header.Set("X-Merchant-Id", "acme")
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("GET %s: %d %s; refusals %+v", path, resp.StatusCode, body, rs.Refusals())
		}
		a := rs.Accepted()
		return a[len(a)-1]
	}
	if got := call("/api/accounts"); got.JKT != key.Thumbprint() || got.URL != base+"/api/accounts" {
		t.Fatalf("after consent: accepted %+v, want the key %s", got, key.Thumbprint())
	}
	first, _ := rs.LastCredentials()

	purge := mustReq(t, http.MethodPost, adminURL()+"/token_broker/merchants/acme/purge", nil)
	if resp, err := http.DefaultClient.Do(purge); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("purge: %v %v", resp, err)
	}
	if got := call("/api/accounts/2"); got.JKT != key.Thumbprint() {
		t.Fatalf("after the refresh: accepted %+v, want the key %s", got, key.Thumbprint())
	}
	if second, _ := rs.LastCredentials(); second == first {
		t.Error("the purged token was used again: no refresh")
	}
}

// TestDPoPREADMEConfig: the README's FAPI 2.0 configuration loads (its
// key files made here): the provider's tokens are bound to the Ed25519 key,
// and the Caddyfile adapts with the DPoP transport on the proxied route.
func TestDPoPREADMEConfig(t *testing.T) {
	readme := filepath.Join(repoRoot(t), "README.md")
	dir := t.TempDir()
	dpopPEM, err := dpoptest.KeyPEM(dpop.EdDSA)
	if err != nil {
		t.Fatal(err)
	}
	signingPEM, err := dpoptest.KeyPEM(dpop.ES256)
	if err != nil {
		t.Fatal(err)
	}
	for name, b := range map[string][]byte{"bank-dpop.pem": dpopPEM, "bank-signing.key": signingPEM} {
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	toml := strings.ReplaceAll(readmeBlock(t, readme, "fapi2-dpop-toml"), "/etc/token-broker/", dir+"/")
	regFile := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(regFile, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	reg, err := config.LoadWith(regFile, config.Options{RefreshStore: &oauth.MemoryStore{}})
	if err != nil {
		t.Fatalf("the README's merchants.toml: %v", err)
	}
	bound, ok := reg.Providers["bank"].Source.(broker.DPoPBound)
	if !ok || bound.DPoPKey() == nil || bound.DPoPKey().Alg() != dpop.EdDSA {
		t.Fatalf("the README's bank provider is not bound to an EdDSA DPoP key")
	}

	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(readmeBlock(t, readme, "fapi2-dpop-caddyfile")), map[string]any{"filename": "Caddyfile"})
	if err != nil {
		t.Fatalf("the README's Caddyfile: %v", err)
	}
	if !strings.Contains(string(cfg), `"protocol":"token_broker_dpop"`) || !strings.Contains(string(cfg), `"dial_timeout":5000000000`) {
		t.Errorf("the README's Caddyfile adapts without the DPoP transport and its options: %s", cfg)
	}
}

// TestExampleBankDPoP: examples/bank-dpop against the sandbox bank, which
// requires DPoP proofs of the client and nonces at its token endpoint and
// echo upstream: both merchants' calls reach the upstream with the one
// token bound to the example's key and a valid proof of that key for each
// call; the callers' own DPoP headers are gone.
func TestExampleBankDPoP(t *testing.T) {
	keys := t.TempDir()
	pemBytes, err := dpoptest.KeyPEM(dpop.EdDSA)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(keys, "bank-dpop.pem"), pemBytes, 0o600); err != nil {
		t.Fatal(err)
	}
	key, err := dpop.ParseKey(pemBytes, "")
	if err != nil {
		t.Fatal(err)
	}
	const clientID = "dpop-example-client"
	_, url := startSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: clientID, Secret: "dpop-example-secret", DPoP: true})
		c.DPoPNonce = true
	})
	t.Setenv("BANK_ISSUER", url)
	t.Setenv("BANK_API", url)
	t.Setenv("BANK_CLIENT_ID", clientID)
	t.Setenv("BANK_CLIENT_SECRET", "dpop-example-secret")
	t.Setenv("BANK_KEYS", keys)
	base := startCaddy(t, useExample(t, "bank-dpop"))

	fingerprints := map[string]bool{}
	for _, c := range []struct{ merchant, path string }{
		{"acme", "/open-banking/v3.1/aisp/accounts"},
		{"globex", "/open-banking/v3.1/aisp/accounts/a-1"},
		{"acme", "/open-banking/v3.1/aisp/accounts/a-1/balances"},
	} {
		// The echo answers 401 to a request it does not accept, as a
		// resource server does (use_dpop_nonce to the first).
		status, body := get(t, base+c.path, "X-Merchant-Id", c.merchant, "DPoP", "a-proof-of-the-caller", "X-Sandbox-Require-Token", "1")
		var e sandbox.Echo
		if err := json.Unmarshal(body, &e); err != nil || status != http.StatusOK {
			t.Fatalf("%s %s: %d %s", c.merchant, c.path, status, body)
		}
		a := e.Authorization
		if !a.Valid || !a.DPoP || a.Scheme != "DPoP" || a.JKT != key.Thumbprint() || a.Refused != "" || a.Organisation != clientID {
			t.Errorf("%s %s: the upstream saw %+v, want a token of %s bound to %s with its proof", c.merchant, c.path, a, clientID, key.Thumbprint())
		}
		if e.Path != c.path {
			t.Errorf("upstream path %q, want %q", e.Path, c.path)
		}
		fingerprints[a.Fingerprint] = true
	}
	if len(fingerprints) != 1 {
		t.Errorf("%d tokens for the calls, want one shared by the merchants of one client", len(fingerprints))
	}
}
