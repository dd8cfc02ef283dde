package integration

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"maps"
	"net/http"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/integration/eventlog"
)

// eventsRegistry is the registry of TestEvents: acme and initech at the
// sandbox's Nuapay, ghost with an organisation the sandbox does not know,
// stale with a partner API key the sandbox does not accept, and hooli,
// umbrella, wayne and stark at the sandbox bank (hooli consents there,
// the others get refresh tokens through the admin API).
const eventsRegistry = `[providers.np]
type = "nuapay"
base_url = "{env.SANDBOX_URL}"
api_key = "{env.NUAPAY_API_KEY}"
timeout = "5s"

[providers.np-stale]
type = "nuapay"
base_url = "{env.SANDBOX_URL}"
api_key = "{env.STALE_API_KEY}"
timeout = "5s"

[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = "{env.SANDBOX_URL}"
client_id = "events-bank-client"
client_secret = "{env.BANK_SECRET}"
  [providers.bank.consent]
  redirect_uris = ["{env.CONSENT_SITE}/consent/callback"]
  scopes = ["openid", "offline_access", "accounts"]

[merchants.acme]
provider = "np"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants.initech]
provider = "np"
organisation = "org-initech"
scopes = ["openbanking_pisp"]

[merchants.ghost]
provider = "np"
organisation = "org-ghost"
scopes = ["openbanking_pisp"]

[merchants.stale]
provider = "np-stale"
organisation = "org-globex"
scopes = ["openbanking_pisp"]

[merchants.hooli]
provider = "bank"
scopes = ["accounts"]

[merchants.umbrella]
provider = "bank"
scopes = ["accounts"]

[merchants.wayne]
provider = "bank"
scopes = ["accounts"]

[merchants.stark]
provider = "bank"
scopes = ["accounts"]
`

// eventsCaddyfile subscribes the tests' events handler to every event of
// the token broker, with the Caddyfile's events global option; tokenBroker
// adds lines to the token_broker global option.
func eventsCaddyfile(logFile, storage, registry, tokenBroker string) string {
	var on strings.Builder
	for _, e := range []string{opstate.EventConsentNeeded, opstate.EventConsentGranted, opstate.EventTokenRefused,
		opstate.EventProviderFailing, opstate.EventProviderRecovered, opstate.EventFleetDown, opstate.EventFleetRecovered} {
		fmt.Fprintf(&on, "\t\ton %s token_broker_test_log %s\n", e, logFile)
	}
	return fmt.Sprintf(`{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	storage file_system %s
	persist_config off
	events {
%s	}
	token_broker {
		config %s
%s	}
}

http://127.0.0.1:{$TOKEN_BROKER_PORT} {
	handle /consent/links {
		token_broker_consent {
			links
		}
	}
	handle {
		token_broker
		reverse_proxy {$SANDBOX_URL}
	}
}

{$CONSENT_SITE} {
	bind 127.0.0.1
	token_broker_consent bank
}
`, storage, on.String(), registry, tokenBroker)
}

// readEvents reads the lines of the events handler's file (none while it
// does not exist).
func readEvents(t *testing.T, path string) []eventlog.Line {
	t.Helper()
	b, err := os.ReadFile(path)
	if os.IsNotExist(err) {
		return nil
	}
	if err != nil {
		t.Fatal(err)
	}
	var out []eventlog.Line
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		var l eventlog.Line
		if err := json.Unmarshal(sc.Bytes(), &l); err != nil {
			t.Fatalf("%s: line %q: %v", path, sc.Text(), err)
		}
		out = append(out, l)
	}
	return out
}

// hasEvent reports whether lines hold an event named name with exactly
// data.
func hasEvent(lines []eventlog.Line, name string, data map[string]any) bool {
	for _, l := range lines {
		if l.Name == name && maps.Equal(l.Data, data) {
			return true
		}
	}
	return false
}

// waitEvents waits until the file holds every wanted event after its
// first from lines: they reach it from the broker's delivering goroutine,
// a moment after the request that caused them. poke, if not nil, runs
// before each look (requests that go on until the change shows).
func waitEvents(t *testing.T, path string, from int, want []eventlog.Line, poke func()) []eventlog.Line {
	t.Helper()
	deadline := time.Now().Add(20 * time.Second)
	for {
		if poke != nil {
			poke()
		}
		lines := readEvents(t, path)[from:]
		missing := 0
		for _, w := range want {
			if !hasEvent(lines, w.Name, w.Data) {
				missing++
			}
		}
		if missing == 0 {
			return lines
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of the events %v are not in the events handler's file, which holds %v", missing, want, lines)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// eventsEnv is a Caddy built with the tests' events handler
// (integration/eventcaddy) in front of the sandbox, with eventsRegistry.
type eventsEnv struct {
	sb          *sandbox.Server
	base, admin string // the sidecar's and the admin endpoint's URLs
	log         string // the events handler's file
	caddyfile   string // the config's path
}

// Secrets of eventsEnv, which no event may hold.
const eventsBankSecret, eventsStaleKey = "events-bank-secret-5d1e", "events-stale-key-0b7a"

// startEventsCaddy builds integration/eventcaddy and runs it with
// eventsCaddyfile (tokenBroker added to the token_broker global option)
// until the test ends.
func startEventsCaddy(t *testing.T, tokenBroker string) *eventsEnv {
	t.Helper()
	dir := t.TempDir()
	bin := builtOnce(t, "./integration/eventcaddy")
	consentPort := freePort(t)
	consentSite := "http://127.0.0.1:" + strconv.Itoa(consentPort)
	sb, sbURL := serveSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: "events-bank-client", Secret: eventsBankSecret,
			Scopes: []string{"accounts"}, RedirectURIs: []string{consentSite + "/consent/callback"}})
	})
	registry := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(registry, []byte(eventsRegistry), 0o600); err != nil {
		t.Fatal(err)
	}
	cf := filepath.Join(dir, "Caddyfile")
	e := &eventsEnv{sb: sb, log: filepath.Join(dir, "events.jsonl"), caddyfile: cf}
	if err := os.WriteFile(cf, []byte(eventsCaddyfile(e.log, filepath.Join(dir, "storage"), registry, tokenBroker)), 0o600); err != nil {
		t.Fatal(err)
	}
	port, adminPort := freePort(t), freePort(t)
	env := []string{"SANDBOX_URL=" + sbURL, "NUAPAY_API_KEY=" + apiKey,
		"BANK_SECRET=" + eventsBankSecret, "STALE_API_KEY=" + eventsStaleKey, "CONSENT_SITE=" + consentSite,
		fmt.Sprintf("TOKEN_BROKER_PORT=%d", port), fmt.Sprintf("TOKEN_BROKER_ADMIN_PORT=%d", adminPort),
		"HOME=" + dir, "XDG_DATA_HOME=" + filepath.Join(dir, "data"), "XDG_CONFIG_HOME=" + filepath.Join(dir, "config")}
	startProcess(t, dir, env, bin, "run", "--config", cf, "--adapter", "caddyfile")
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", port))
	waitListening(t, fmt.Sprintf("127.0.0.1:%d", consentPort))
	e.base = fmt.Sprintf("http://127.0.0.1:%d", port)
	e.admin = fmt.Sprintf("http://127.0.0.1:%d", adminPort)
	return e
}

// checkEventLines fails unless every event in the handler's file comes
// from the token_broker app with the contract's data keys only, and none
// holds one of secrets or a token the sandbox issued.
func (e *eventsEnv) checkEventLines(t *testing.T, secrets ...string) {
	t.Helper()
	raw := readFile(t, e.log)
	for _, l := range readEvents(t, e.log) {
		if l.Origin != "token_broker" {
			t.Errorf("event %s from origin %q, want token_broker", l.Name, l.Origin)
		}
		for k := range l.Data {
			if k != "merchant" && k != "provider" && k != "error" && k != "state" {
				t.Errorf("event %s: data key %q, want merchant, provider, error and state only", l.Name, k)
			}
		}
	}
	for _, secret := range append([]string{apiKey, eventsStaleKey, eventsBankSecret}, secrets...) {
		if strings.Contains(raw, secret) {
			t.Errorf("the events hold a key, secret or refresh token: %s", raw)
		}
	}
	assertNoSandboxToken(t, e.sb, raw)
}

// TestEvents: a real Caddy built with the tests' events handler
// (integration/eventcaddy) subscribes it to the token broker's events
// with the Caddyfile's `events` global option, against the sandbox: a
// merchant that needs consent and then consents at the bank, a refresh
// token loaded through the admin API, a token refused for a partner API
// key the provider does not accept and for an organisation it does not
// know, a provider failing and recovered, then a refresh token loaded
// after a config reload (the new app delivers). Each shows in the
// handler's file with its merchant, provider and error code, from origin
// token_broker, and no line holds a key, a secret or a token.
func TestEvents(t *testing.T) {
	t.Parallel()
	env := startEventsCaddy(t, "")
	sb, base, admin := env.sb, env.base, env.admin
	var loadedRT []string
	for range 4 {
		loadedRT = append(loadedRT, sb.IssueRefreshToken("events-bank-client", []string{"accounts"}))
	}
	loadRT := func(t *testing.T, merchant, rt string) {
		t.Helper()
		req := mustReq(t, http.MethodPut, admin+"/token_broker/merchants/"+merchant+"/refresh_token",
			strings.NewReader(`{"refresh_token":"`+rt+`"}`))
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Fatalf("PUT %s's refresh_token: %d", merchant, resp.StatusCode)
		}
	}

	call := func(merchant, path string, wantStatus int, wantError string) func(t *testing.T) {
		return func(t *testing.T) {
			status, body := get(t, base+path, "X-Merchant-Id", merchant)
			if status != wantStatus || (wantError != "" && !strings.Contains(string(body), `"`+wantError+`"`)) {
				t.Fatalf("%s: %d %s, want %d %s", merchant, status, body, wantStatus, wantError)
			}
		}
	}
	for _, step := range []struct {
		name string
		do   func(t *testing.T)
		want []eventlog.Line
	}{
		{"consent needed", call("hooli", "/accounts", http.StatusBadGateway, "consent_required"),
			[]eventlog.Line{{Name: opstate.EventConsentNeeded, Data: map[string]any{"merchant": "hooli", "provider": "bank", "error": "consent_required", "state": opstate.StateNeedsConsent}}}},
		{"consent granted at the bank", func(t *testing.T) {
			status, link := consentLink(t, base, "hooli", "")
			if status != http.StatusOK {
				t.Fatalf("consent link: %d %v", status, link)
			}
			consentThrough(t, newBrowser(), link["url"])
			call("hooli", "/accounts", http.StatusOK, "")(t)
		}, []eventlog.Line{{Name: opstate.EventConsentGranted, Data: map[string]any{"merchant": "hooli", "provider": "bank"}}}},
		{"refresh token loaded by an operator", func(t *testing.T) { loadRT(t, "umbrella", loadedRT[0]) },
			[]eventlog.Line{{Name: opstate.EventConsentGranted, Data: map[string]any{"merchant": "umbrella", "provider": "bank"}}}},
		{"a refresh token rotated: no event (the next merchant's event comes after where it would be)", func(t *testing.T) {
			from := len(readEvents(t, env.log))
			loadRT(t, "umbrella", loadedRT[1])
			loadRT(t, "wayne", loadedRT[2])
			lines := waitEvents(t, env.log, from, []eventlog.Line{{Name: opstate.EventConsentGranted, Data: map[string]any{"merchant": "wayne", "provider": "bank"}}}, nil)
			if hasEvent(lines, opstate.EventConsentGranted, map[string]any{"merchant": "umbrella", "provider": "bank"}) {
				t.Errorf("a routine rotation of umbrella's refresh token emitted %s: %v", opstate.EventConsentGranted, lines)
			}
		}, nil},
		{"token refused: partner API key", call("stale", "/tpp/payments", http.StatusBadGateway, "token_refused"),
			// The refused credential also holds the provider's configuration.
			[]eventlog.Line{{Name: opstate.EventTokenRefused, Data: map[string]any{"merchant": "stale", "provider": "np-stale", "error": "token_refused", "state": opstate.StateRefused}},
				{Name: opstate.EventProviderFailing, Data: map[string]any{"provider": "np-stale", "error": "token_refused"}}}},
		{"token refused: unknown organisation", call("ghost", "/tpp/payments", http.StatusBadGateway, "token_refused"),
			[]eventlog.Line{{Name: opstate.EventTokenRefused, Data: map[string]any{"merchant": "ghost", "provider": "np", "error": "token_refused", "state": opstate.StateUnknownOrganisation}}}},
		{"provider failing", func(t *testing.T) {
			// Every attempt of the fetch is throttled: the provider is held
			// for its Retry-After.
			sb.Fail(http.StatusTooManyRequests, "1", 3)
			call("initech", "/tpp/payments", http.StatusServiceUnavailable, "token_rate_limited")(t)
		}, []eventlog.Line{{Name: opstate.EventProviderFailing, Data: map[string]any{"provider": "np", "error": "token_rate_limited"}}}},
		{"provider recovered", func(t *testing.T) {
			// The provider's Retry-After (1 s) ends, then acme gets a token.
			deadline := time.Now().Add(15 * time.Second)
			for {
				status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
				if status == http.StatusOK {
					return
				}
				if time.Now().After(deadline) {
					t.Fatalf("acme after the failure: %d %s, want 200 once the provider's Retry-After has passed", status, body)
				}
				time.Sleep(100 * time.Millisecond)
			}
		}, []eventlog.Line{{Name: opstate.EventProviderRecovered, Data: map[string]any{"provider": "np"}}}},
		{"after a config reload", func(t *testing.T) {
			// The same config, loaded again: a new token_broker app and
			// events app; the new app delivers once Caddy has started them.
			req := mustReq(t, http.MethodPost, admin+"/load", strings.NewReader(readFile(t, env.caddyfile)))
			req.Header.Set("Content-Type", "text/caddyfile")
			req.Header.Set("Cache-Control", "must-revalidate")
			resp, err := http.DefaultClient.Do(req)
			if err != nil {
				t.Fatal(err)
			}
			resp.Body.Close()
			http.DefaultClient.CloseIdleConnections()
			if resp.StatusCode != http.StatusOK {
				t.Fatalf("POST /load: %d", resp.StatusCode)
			}
			loadRT(t, "stark", loadedRT[3])
		}, []eventlog.Line{{Name: opstate.EventConsentGranted, Data: map[string]any{"merchant": "stark", "provider": "bank"}}}},
	} {
		if !t.Run(step.name, func(t *testing.T) {
			from := len(readEvents(t, env.log))
			step.do(t)
			waitEvents(t, env.log, from, step.want, nil)
		}) {
			break // the later steps build on this one
		}
	}

	env.checkEventLines(t, loadedRT...)
}

// TestEventsFleetTier: with a Redis tier, killing redis-server gives
// fleet_tier_down (with the failure, no key in it) once the tier's breaker
// opens, and restarting it fleet_tier_recovered once a lookup gets through
// again; requests are served meanwhile (the broker mints alone).
func TestEventsFleetTier(t *testing.T) {
	t.Parallel()
	r := startRedisServer(t)
	cacheKey := newCacheKey()
	env := startEventsCaddy(t, fmt.Sprintf("\t\tredis {\n\t\t\taddress %s\n\t\t\tencryption_key %s\n\t\t\ttimeout 1s\n\t\t}\n", r.Addr(), cacheKey))
	// A lookup that misses the local cache asks Redis: acme's tokens are
	// purged before each request.
	lookup := func() {
		req := mustReq(t, http.MethodPost, env.admin+"/token_broker/merchants/acme/purge", nil)
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if status, body := get(t, env.base+"/tpp/payments", "X-Merchant-Id", "acme"); status != http.StatusOK {
			t.Fatalf("acme: %d %s, want 200 (with or without Redis)", status, body)
		}
	}
	lookup()

	r.Kill()
	var down []eventlog.Line
	deadline := time.Now().Add(20 * time.Second)
	for down == nil {
		lookup()
		for _, l := range readEvents(t, env.log) {
			if l.Name == opstate.EventFleetDown {
				down = append(down, l)
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s within 20 s of killing redis-server: %v", opstate.EventFleetDown, readEvents(t, env.log))
		}
		time.Sleep(100 * time.Millisecond)
	}
	if len(down) != 1 || len(down[0].Data) != 1 || !slices.Contains([]any{"refused", "timeout", "error"}, down[0].Data["error"]) {
		t.Errorf("%v, want one %s with the kind of error alone", down, opstate.EventFleetDown)
	}

	from := len(readEvents(t, env.log))
	r.Restart()
	// The tier's breaker lets a lookup through after its cooldown (5 s).
	waitEvents(t, env.log, from, []eventlog.Line{{Name: opstate.EventFleetRecovered, Data: map[string]any{}}}, func() {
		lookup()
		time.Sleep(200 * time.Millisecond)
	})
	env.checkEventLines(t, cacheKey)
}
