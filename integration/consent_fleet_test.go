package integration

import (
	"io"
	"net/http"
	"net/http/httptest"
	"net/http/httputil"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// roundRobin is a load balancer in front of a fleet's consent sites: each
// request goes to the next node, with its Host kept.
type roundRobin struct {
	mu    sync.Mutex
	nodes []*url.URL
	next  int
	sent  map[string]int // requests per node
}

func (lb *roundRobin) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	lb.mu.Lock()
	target := lb.nodes[lb.next%len(lb.nodes)]
	lb.next++
	lb.sent[target.Host]++
	lb.mu.Unlock()
	(&httputil.ReverseProxy{Rewrite: func(pr *httputil.ProxyRequest) {
		pr.SetURL(target)
		pr.Out.Host = pr.In.Host
	}}).ServeHTTP(w, r)
}

// TestFleetConsentLinkStartsBounded: two sidecars sharing a Redis (and
// Caddy's storage, where the consent links are) behind a load balancer
// that spreads the starts of a consent link over both take
// oauth.MaxStartsPerLink (10) starts of it in total; the 11th and 12th get
// the used page with too_many_starts, whichever sidecar they reach. The
// Redis calls get fleetEnv's generous timeout: a start whose count times
// out on a busy machine would be counted at its sidecar only.
func TestFleetConsentLinkStartsBounded(t *testing.T) {
	f := newFleetEnv(t, "1h")
	lb := &roundRobin{sent: map[string]int{}}
	front := httptest.NewServer(lb)
	t.Cleanup(front.Close)
	redirect := front.URL + "/consent/bank/callback"
	_, sbURL := serveSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: "bank-client", Secret: "consent-secret-1",
			Scopes: []string{"accounts"}, RedirectURIs: []string{redirect}})
	})
	dir := t.TempDir()
	f.registry = filepath.Join(dir, "merchants.toml")
	f.caddyfile = filepath.Join(dir, "Caddyfile")
	registry := `[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = "` + sbURL + `"
client_id = "bank-client"
client_secret = "{env.CONSENT_SECRET}"
  [providers.bank.consent]
  redirect_uris = ["` + redirect + `"]
  scopes = ["openid", "offline_access", "accounts"]

[merchants.acme]
provider = "bank"
scopes = ["accounts"]
`
	caddyfile := `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	storage file_system {$CONSENT_STORAGE}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
		redis {
			address {$REDIS_ADDR}
			encryption_key {env.TOKEN_CACHE_KEY}
			timeout {$REDIS_TIMEOUT}
		}
	}
	persist_config off
}
http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	handle /consent/links {
		token_broker_consent {
			links
		}
	}
	handle /consent/bank/* {
		token_broker_consent bank
	}
}
`
	for path, content := range map[string]string{f.registry: registry, f.caddyfile: caddyfile} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	f.env = []string{"CONSENT_SECRET=consent-secret-1", "CONSENT_STORAGE=" + filepath.Join(dir, "storage")}
	nodes := f.startFleet(2)
	lb.mu.Lock()
	for _, n := range nodes {
		u, _ := url.Parse(n.base)
		lb.nodes = append(lb.nodes, u)
	}
	lb.mu.Unlock()

	status, out := consentLink(t, nodes[0].base, "acme", "")
	link, err := url.Parse(out["url"])
	if status != http.StatusOK || err != nil || link.Host != strings.TrimPrefix(front.URL, "http://") {
		t.Fatalf("consent link: %d %v (%v), want one on the load balancer's host", status, out, err)
	}
	form := url.Values{"link": {link.Query().Get("link")}}
	link.RawQuery = ""
	var got strings.Builder
	for range 12 {
		req := mustReq(t, http.MethodPost, link.String(), strings.NewReader(form.Encode()))
		req.Header.Set("Content-Type", "application/x-www-form-urlencoded")
		resp, err := newBrowser().Do(req)
		if err != nil {
			t.Fatal(err)
		}
		page, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		switch {
		case resp.StatusCode == http.StatusSeeOther:
			got.WriteByte('+')
		case resp.StatusCode == http.StatusBadRequest && strings.Contains(string(page), "too_many_starts"):
			got.WriteByte('-')
		default:
			t.Fatalf("start: %d %.300s", resp.StatusCode, page)
		}
	}
	if want := strings.Repeat("+", 10) + "--"; got.String() != want {
		t.Errorf("starts through the load balancer: %s, want %s", got.String(), want)
	}
	lb.mu.Lock()
	defer lb.mu.Unlock()
	for _, n := range lb.nodes {
		if lb.sent[n.Host] != 6 {
			t.Errorf("node %s got %d starts, want 6", n.Host, lb.sent[n.Host])
		}
	}
}
