package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

// statusCaddyfile serves the broker for the apps and the consent pages of
// the bank's merchants.
const statusCaddyfile = `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	storage file_system {$STATUS_STORAGE}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
	}
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	handle /consent/links {
		token_broker_consent bank {
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
`

// statusRegistry: a merchant served well (acme), one whose organisation
// the provider does not know (ghost), one whose provider refuses its API
// key (badkey, and badkey2, never asked for: refused while the key is
// held), one
// whose provider is down (downco: nothing listens at its base URL), and
// one who must consent at the bank (consenting).
const statusRegistry = `[providers.nuapay]
type = "nuapay"
base_url = "{env.SANDBOX_URL}"
api_key = "{env.NUAPAY_API_KEY}"
timeout = "2s"

[providers.nuapay_badkey]
type = "nuapay"
base_url = "{env.SANDBOX_URL}"
api_key = "{env.STATUS_BAD_KEY}"
timeout = "2s"

[providers.nuapay_down]
type = "nuapay"
base_url = "{env.STATUS_DOWN_URL}"
api_key = "{env.NUAPAY_API_KEY}"
timeout = "2s"

[providers.bank]
type = "oauth2"
grant = "refresh_token"
issuer = "{env.SANDBOX_URL}"
client_id = "status-client"
client_secret = "{env.STATUS_BANK_SECRET}"
  [providers.bank.consent]
  redirect_uris = ["{env.CONSENT_SITE}/consent/callback"]
  scopes = ["openid", "offline_access", "accounts"]

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants.ghost]
provider = "nuapay"
organisation = "org-ghost"
scopes = ["openbanking_pisp"]

[merchants.badkey]
provider = "nuapay_badkey"
organisation = "org-globex"
scopes = ["openbanking_pisp"]

[merchants.downco]
provider = "nuapay_down"
organisation = "org-initech"
scopes = ["openbanking_pisp"]

[merchants.consenting]
provider = "bank"
scopes = ["accounts"]

[merchants.badkey2]
provider = "nuapay_badkey"
organisation = "org-umbrella"
scopes = ["openbanking_pisp"]
`

// TestOperatorStatus: through a real Caddy against the sandbox, a merchant
// with a wrong organisation, one whose provider is down, one needing
// consent and one whose API key is refused each show in GET
// /token_broker/state and in the built binary's `caddy token-broker
// status`; `caddy token-broker check` of the merchant with the wrong API
// key says in words that the credential was refused, and a second check
// that the provider is not called until its backoff ends;
// `consent-link` prints a link for the bank's merchant and refuses a
// Nuapay one. Nothing printed holds a token or a key.
func TestOperatorStatus(t *testing.T) {
	caddyBin, _ := buildBinaries(t)
	consentPort := freePort(t)
	site := "http://127.0.0.1:" + strconv.Itoa(consentPort)
	const bankSecret = "status-bank-secret-5e1"
	const badKey = "it-wrong-key-status"
	startSandbox(t, func(c *sandbox.Config) {
		c.BankClients = append(c.BankClients, sandbox.BankClient{ID: "status-client", Secret: bankSecret,
			Scopes: []string{"accounts"}, RedirectURIs: []string{site + "/consent/callback"}})
	})
	t.Setenv("CONSENT_SITE", site)
	t.Setenv("STATUS_BANK_SECRET", bankSecret)
	t.Setenv("STATUS_BAD_KEY", badKey)
	t.Setenv("STATUS_DOWN_URL", fmt.Sprintf("http://127.0.0.1:%d", freePort(t)))
	t.Setenv("STATUS_STORAGE", t.TempDir())
	dir := t.TempDir()
	regPath := filepath.Join(dir, "merchants.toml")
	caddyfile := filepath.Join(dir, "Caddyfile")
	for path, text := range map[string]string{regPath: statusRegistry, caddyfile: statusCaddyfile} {
		if err := os.WriteFile(path, []byte(text), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("TOKEN_BROKER_CONFIG", regPath)
	base := startCaddy(t, statusCaddyfile)
	waitListening(t, "127.0.0.1:"+strconv.Itoa(consentPort))
	admin := "127.0.0.1:" + os.Getenv("TOKEN_BROKER_ADMIN_PORT")
	secrets := []string{apiKey, badKey, bankSecret}
	noSecret := func(what, out string) {
		t.Helper()
		for _, s := range secrets {
			if strings.Contains(out, s) {
				t.Errorf("%s shows a secret: %s", what, out)
			}
		}
		if regexp.MustCompile(`eyJ[A-Za-z0-9_-]{10,}`).MatchString(out) {
			t.Errorf("%s shows a token: %s", what, out)
		}
	}

	// The operator checks the merchant with the wrong API key before any
	// request: one token request, refused, said in words.
	out, code := runCommand(t, caddyBin, "token-broker", "check", "badkey", "--config", caddyfile, "--address", admin)
	t.Logf("$ caddy token-broker check badkey --config Caddyfile --address %s (exit %d)\n%s", admin, code, out)
	noSecret("check", out)
	wantCheck := fmt.Sprintf("badkey: REFUSED by nuapay_badkey (HTTP 401 40100): the provider refused the credentials; check api_key of [providers.nuapay_badkey] in %s:7", regPath)
	if code != 1 || !strings.Contains(out, regPath+": valid (6 merchants, 4 providers)") || !strings.Contains(out, wantCheck) {
		t.Errorf("check badkey: exit %d\n%s\nwant exit 1, the registry valid, and %q", code, out, wantCheck)
	}
	// Checked again: the provider's credential is in backoff (2s after a
	// first refusal), not called; on a machine so slow that the backoff
	// ended first, it is refused again.
	out, code = runCommand(t, caddyBin, "token-broker", "check", "badkey", "--config", caddyfile, "--address", admin)
	t.Logf("$ caddy token-broker check badkey (again, exit %d)\n%s", code, out)
	switch {
	case code == 1 && strings.Contains(out, "badkey: NOT CALLED (nuapay_badkey): the broker does not call nuapay_badkey for this merchant before ") &&
		strings.Contains(out, "it is not called for any merchant (its credentials were refused, or it asked to slow down); its last answer (HTTP 401 40100): the provider refused the credentials"):
	case code == 1 && strings.Contains(out, wantCheck):
		t.Log("the provider's backoff ended before the second check: it was called again")
	default:
		t.Errorf("check badkey again: exit %d\n%s\nwant exit 1, not called, and why", code, out)
	}
	// A merchant served well: OK, and its token is the one served next.
	out, code = runCommand(t, caddyBin, "token-broker", "check", "acme", "--address", admin)
	t.Logf("$ caddy token-broker check acme --address %s (exit %d)\n%s", admin, code, out)
	noSecret("check", out)
	fp := regexp.MustCompile(`fingerprint ([0-9a-f]{8})`).FindStringSubmatch(out)
	if code != 0 || !strings.HasPrefix(out, "acme: OK: nuapay issued a token (fingerprint ") || fp == nil {
		t.Fatalf("check acme: exit %d\n%s", code, out)
	}
	if e := getEcho(t, base+"/pay", "X-Merchant-Id", "acme"); e.Authorization.Fingerprint != fp[1] {
		t.Errorf("the request after the check got token %s, want the checked one %s", e.Authorization.Fingerprint, fp[1])
	}

	// The apps' requests for the others fail, each for its reason.
	for merchant, wantStatus := range map[string]int{"ghost": http.StatusBadGateway, "downco": http.StatusBadGateway,
		"consenting": http.StatusBadGateway} {
		if status, body := get(t, base+"/pay", "X-Merchant-Id", merchant); status != wantStatus {
			t.Errorf("request for %s: %d %s, want %d", merchant, status, body, wantStatus)
		}
	}

	// A check of a merchant the apps' requests were served for uses their
	// binding: refused again, or not called while its key is in backoff.
	out, code = runCommand(t, caddyBin, "token-broker", "check", "ghost", "--address", admin)
	t.Logf("$ caddy token-broker check ghost --address %s (exit %d)\n%s", admin, code, out)
	wantGhost := fmt.Sprintf(`the provider does not know organisation "org-ghost"; check organisation of [merchants.ghost] in %s:34`, regPath)
	if code != 1 || !strings.Contains(out, wantGhost) ||
		!strings.HasPrefix(out, "ghost: REFUSED by nuapay (HTTP 404 40400): ") && !strings.HasPrefix(out, "ghost: NOT CALLED (nuapay): ") {
		t.Errorf("check ghost: exit %d\n%s\nwant exit 1 and %q", code, out, wantGhost)
	}

	// The admin state.
	status, body := get(t, "http://"+admin+"/token_broker/state")
	noSecret("GET /token_broker/state", string(body))
	var rep opstate.Report
	if err := json.Unmarshal(body, &rep); status != http.StatusOK || err != nil {
		t.Fatalf("GET /token_broker/state: %d %s %v", status, body, err)
	}
	wantStates := map[string]string{"acme": opstate.StateFresh, "ghost": opstate.StateUnknownOrganisation,
		"badkey": opstate.StateRefused, "badkey2": opstate.StateRefused, "downco": opstate.StateBackingOff, "consenting": opstate.StateNeedsConsent}
	if i := slices.IndexFunc(rep.Providers, func(p opstate.Provider) bool { return p.Name == "nuapay_badkey" }); i < 0 || rep.Providers[i].BackoffUntil == nil {
		// The refused key's backoff (2 s at first) ended before the
		// report: nothing is known to be wrong for badkey2 until its next
		// request calls the provider.
		wantStates["badkey2"] = opstate.StateIdle
	}
	for _, m := range rep.Merchants {
		if want := wantStates[m.Merchant]; m.State != want {
			t.Errorf("state of %s: %s (last error %s), want %s", m.Merchant, m.State, m.LastError, want)
		}
		delete(wantStates, m.Merchant)
	}
	if len(wantStates) > 0 {
		t.Errorf("merchants missing from the state: %v", wantStates)
	}
	providers := map[string]opstate.Provider{}
	for _, p := range rep.Providers {
		providers[p.Name] = p
	}
	if p := providers["nuapay_down"]; p.Status == "ok" || p.LastError != "token_unavailable" {
		t.Errorf("provider nuapay_down: %+v, want failing with token_unavailable", p)
	}

	// The status command.
	out, code = runCommand(t, caddyBin, "token-broker", "status", "--address", admin)
	t.Logf("$ caddy token-broker status --address %s (exit %d)\n%s", admin, code, out)
	noSecret("status", out)
	if code != 0 {
		t.Fatalf("status: exit %d\n%s", code, out)
	}
	for _, want := range []*regexp.Regexp{
		regexp.MustCompile(`(?m)^nuapay_down +nuapay +(failing|backing_off|open) +`),
		regexp.MustCompile(`(?m)^badkey +nuapay_badkey +org-globex +refused +token_refused `),
		regexp.MustCompile(`(?m)^ghost +nuapay +org-ghost +unknown_organisation +token_refused `),
		regexp.MustCompile(`(?m)^consenting +bank +- +needs_consent +consent_required `),
		regexp.MustCompile(`(?m)^downco +nuapay_down +org-initech +backing_off +token_unavailable `),
		regexp.MustCompile(`(?m)^ +fresh +1$`),
		regexp.MustCompile(`(?m)^ +total +6$`),
	} {
		if !want.MatchString(out) {
			t.Errorf("status output does not match %s", want)
		}
	}
	if strings.Contains(out, "\nacme ") {
		t.Errorf("status lists acme among the merchants needing attention:\n%s", out)
	}
	out, code = runCommand(t, caddyBin, "token-broker", "status", "--address", admin, "--state", "fresh", "--provider", "nuapay")
	if code != 0 || !regexp.MustCompile(`(?m)^acme +nuapay +org-acme +fresh +- +- +in `).MatchString(out) {
		t.Errorf("status --state fresh --provider nuapay: exit %d\n%s", code, out)
	}
	out, code = runCommand(t, caddyBin, "token-broker", "status", "--address", admin, "--json", "--state", "needs_consent")
	var js opstate.Report
	if err := json.Unmarshal([]byte(out), &js); code != 0 || err != nil || js.Total != 1 || len(js.Merchants) != 1 || js.Merchants[0].Merchant != "consenting" {
		t.Errorf("status --json --state needs_consent: exit %d, %v\n%s", code, err, out)
	}
	unreachable := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	out, code = runCommand(t, caddyBin, "token-broker", "status", "--address", unreachable)
	if code != 1 || !strings.HasPrefix(out, "cannot reach the admin API at "+unreachable) {
		t.Errorf("status of nothing: exit %d\n%s", code, out)
	}

	// Consent links.
	out, code = runCommand(t, caddyBin, "token-broker", "consent-link", "consenting", "--address", admin)
	t.Logf("$ caddy token-broker consent-link consenting --address %s (exit %d)\n%s", admin, code, out)
	if code != 0 || !strings.HasPrefix(out, site+"/consent/start?link=") || !strings.Contains(out, "consent link for consenting at bank: one use, expires in ") {
		t.Errorf("consent-link consenting: exit %d\n%s", code, out)
	}
	out, code = runCommand(t, caddyBin, "token-broker", "consent-link", "acme", "--address", admin)
	t.Logf("$ caddy token-broker consent-link acme --address %s (exit %d)\n%s", admin, code, out)
	if code != 1 || !strings.Contains(out, `no consent link for acme: its provider does not use consent`) || !strings.Contains(out, `provider "nuapay" has no consent table`) {
		t.Errorf("consent-link acme: exit %d\n%s", code, out)
	}
}
