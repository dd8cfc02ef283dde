package config

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
)

func TestProviderRateLimit(t *testing.T) {
	good := string(readGood(t))
	for _, tc := range []struct {
		name, keys string
		want       budget.Limit
	}{
		{"none", "", budget.Limit{}},
		{"per second", `rate_limit = "20/s"`, budget.Limit{Rate: 20, Period: time.Second, Burst: 20}},
		{"per minute with burst", "rate_limit = \"1200/m\"\nrate_burst = 5", budget.Limit{Rate: 1200, Period: time.Minute, Burst: 5}},
		{"per hour", `rate_limit = "7200/h"`, budget.Limit{Rate: 7200, Period: time.Hour, Burst: 2}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			data := strings.Replace(good, `timeout = "10s"`, "timeout = \"10s\"\n"+tc.keys, 1)
			reg := mustParse(t, "testdata/good.toml", []byte(data), testEnv())
			if got := reg.Providers["nuapay-sandbox"].RateLimit; got != tc.want {
				t.Errorf("RateLimit %+v, want %+v", got, tc.want)
			}
			if got := reg.Providers["nuapay-live"].RateLimit; got != (budget.Limit{}) {
				t.Errorf("the other provider's RateLimit %+v, want none", got)
			}
		})
	}
}

// TestProviderBudget: the profiles of a provider share its budget, made
// by Options.Budgets once per provider with a rate_limit.
func TestProviderBudget(t *testing.T) {
	good := strings.Replace(string(readGood(t)), `timeout = "10s"`, "timeout = \"10s\"\nrate_limit = \"20/s\"", 1)
	dir := t.TempDir()
	path := filepath.Join(dir, "merchants.toml")
	if err := os.WriteFile(path, []byte(good), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "nuapay-live.key"), []byte("k\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	var asked []string
	made := budget.New("nuapay-sandbox", budget.Limit{Rate: 20, Period: time.Second, Burst: 20}, budget.NewLocal(nil), nil)
	reg, err := LoadWith(path, Options{LookupEnv: testEnv(), Budgets: func(p *Provider) (*budget.Budget, error) {
		asked = append(asked, p.Name+" "+p.Endpoint)
		return made, nil
	}})
	if err != nil {
		t.Fatal(err)
	}
	if want := "nuapay-sandbox " + reg.Providers["nuapay-sandbox"].Endpoint; len(asked) != 1 || asked[0] != want {
		t.Errorf("Budgets asked for %q, want [%q]", asked, want)
	}
	if reg.Providers["nuapay-sandbox"].Budget != made || reg.Providers["nuapay-live"].Budget != nil {
		t.Error("Provider.Budget: want the made budget for nuapay-sandbox, none for nuapay-live")
	}
	seen := 0
	for id, m := range reg.Merchants {
		for _, scopes := range [][]string{nil, {"other_scope"}} {
			b, err := reg.Binding(id, scopes)
			if err != nil {
				t.Fatal(err)
			}
			want := reg.Providers[m.Provider].Budget
			if b.Budget != want {
				t.Errorf("merchant %s scopes %v: budget %p, want %p", id, scopes, b.Budget, want)
			}
			if want != nil {
				seen++
			}
		}
	}
	if seen == 0 {
		t.Fatal("no merchant of the budgeted provider")
	}

	// A budget the app cannot make fails the load, where the provider is
	// defined.
	_, err = LoadWith(path, Options{LookupEnv: testEnv(), Budgets: func(p *Provider) (*budget.Budget, error) {
		return nil, errors.New("set fleet_size")
	}})
	if want := `merchants.toml:`; err == nil || !strings.Contains(err.Error(), want) ||
		!strings.Contains(err.Error(), `provider "nuapay-sandbox": field rate_limit: set fleet_size`) {
		t.Errorf("Budgets failing: error %v, want the provider's file, line, name, rate_limit and the reason", err)
	}

	// Without Options.Budgets the registry makes its own.
	reg, err = LoadWith(path, Options{LookupEnv: testEnv()})
	if err != nil {
		t.Fatal(err)
	}
	if b := reg.Providers["nuapay-sandbox"].Budget; b == nil || b.State().Rate != 20 {
		t.Errorf("default budget %v", b)
	}
}

// budgetRegistry is a registry of one nuapay provider at baseURL (API key
// "k", rate_limit 5/s) and its merchant acme (organisation org-acme).
func budgetRegistry(t *testing.T, baseURL string) *Registry {
	t.Helper()
	reg, err := parse(filepath.Join(t.TempDir(), "m.toml"), []byte(fmt.Sprintf(`[providers.p]
type = "nuapay"
base_url = %q
api_key = "{env.K}"
rate_limit = "5/s"

[merchants.acme]
provider = "p"
organisation = "org-acme"
scopes = ["s"]
`, baseURL)), func(string) (string, bool) { return "k", true })
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// TestProviderBudgetObservesAnswers: the rate-limit headers of the
// provider's token answers lower its budget (the sandbox's limit says
// nothing is left after its burst).
func TestProviderBudgetObservesAnswers(t *testing.T) {
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"k"}, Organisations: []sandbox.Organisation{{ID: "org-acme"}},
		TokenRateLimit: sandbox.RateLimit{Rate: 0.1, Burst: 1, Headers: true}})
	srv := httptest.NewServer(sb)
	t.Cleanup(srv.Close)
	reg := budgetRegistry(t, srv.URL)
	b, err := reg.Binding("acme", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Source.Token(context.Background(), b.Request()); err != nil {
		t.Fatal(err)
	}
	// RateLimit "token";r=0;t=10: none left for 10 s.
	if st := reg.Providers["p"].Budget.State(); st.Effective != 0 || st.LoweredUntil.IsZero() {
		t.Errorf("after an answer with none left: effective %g, lowered until %v; want 0 and a time", st.Effective, st.LoweredUntil)
	}
}

// TestProviderBudgetObservesTokenAnswersOnly: the rate-limit headers on the
// answers of the provider's other calls (the organisations list, a
// revocation) leave the token budget as it is; those of a token answer
// lower it.
func TestProviderBudgetObservesTokenAnswersOnly(t *testing.T) {
	sb := sandbox.New(sandbox.Config{APIKeys: []string{"k"}, Organisations: []sandbox.Organisation{{ID: "org-acme"}}})
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		w.Header().Set("X-RateLimit-Remaining", "0")
		w.Header().Set("X-RateLimit-Reset", "10")
		sb.ServeHTTP(w, r)
	}))
	t.Cleanup(srv.Close)
	reg := budgetRegistry(t, srv.URL)
	pv := reg.Providers["p"]
	src := pv.Source.(*nuapay.Source)
	ctx := context.Background()
	if err := src.EachOrganisation(ctx, nuapay.ListLimits{}, func(nuapay.Organisation) {}); err != nil {
		t.Fatal(err)
	}
	// Its answer, whatever it is, carries the headers.
	_ = src.RevokeToken(ctx, broker.Request{Organisation: "org-acme"}, broker.Token{ID: "no-such-token"})
	if st := pv.Budget.State(); st.Effective != 5 || !st.LoweredUntil.IsZero() {
		t.Errorf("after the organisations list and a revocation: effective %g, lowered until %v; want 5 and never", st.Effective, st.LoweredUntil)
	}
	b, err := reg.Binding("acme", nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := b.Source.Token(ctx, b.Request()); err != nil {
		t.Fatal(err)
	}
	if st := pv.Budget.State(); st.Effective != 0 || st.LoweredUntil.IsZero() {
		t.Errorf("after a token answer with none left: effective %g, lowered until %v; want 0 and a time", st.Effective, st.LoweredUntil)
	}
}

// TestProviderAccount: a provider's Account fingerprints the credential
// its token API counts requests against (a nuapay API key, an oauth2
// client_id): configurations of one endpoint with different credentials
// get different accounts (and so separate budgets), the same credential
// the same account whatever else differs (a rotated client secret), and
// the account is budget.Account of the credential.
func TestProviderAccount(t *testing.T) {
	const keyA, keyB = "api-key-of-partner-a-0123456789", "api-key-of-partner-b-9876543210"
	data := `
[providers.a]
type = "nuapay"
base_url = "https://api.nuapay.example"
api_key = "{env.KEY_A}"

[providers.b]
type = "nuapay"
base_url = "https://api.nuapay.example"
api_key = "{env.KEY_B}"

[providers.a-again]
type = "nuapay"
base_url = "https://api.nuapay.example"
api_key = "{env.KEY_A}"
token_lifetime = "30m"

[providers.client-1]
type = "oauth2"
token_url = "https://bank.example/token"
client_id = "partner-client-1"
client_secret = "{env.KEY_A}"

[providers.client-2]
type = "oauth2"
token_url = "https://bank.example/token"
client_id = "partner-client-2"
client_secret = "{env.KEY_A}"

[providers.client-1-rotated]
type = "oauth2"
token_url = "https://bank.example/token"
client_id = "partner-client-1"
client_secret = "{env.KEY_B}"

[merchants.acme]
provider = "a"
organisation = "org-acme"
scopes = ["openbanking_aisp"]
`
	reg := mustParse(t, "accounts.toml", []byte(data), testEnv("KEY_A", keyA, "KEY_B", keyB))
	// The accounts are budget.Account of each credential, computed once
	// and written here: a change of the fingerprint, or of which
	// credential a provider's account is made from, fails.
	const (
		accountKeyA    = "6f229e7c5ccec80d" // budget.Account(keyA)
		accountKeyB    = "3c135b7d2f05ad2a" // budget.Account(keyB)
		accountClient1 = "9a30399ef155d6af" // budget.Account("partner-client-1")
		accountClient2 = "a82ccff98f68a5c1" // budget.Account("partner-client-2")
	)
	for _, tc := range []struct{ provider, want string }{
		{"a", accountKeyA},
		{"b", accountKeyB},
		{"a-again", accountKeyA}, // the same API key, another token lifetime
		{"client-1", accountClient1},
		{"client-2", accountClient2},         // the same secret, another client id
		{"client-1-rotated", accountClient1}, // the same client id, another secret
	} {
		if got := reg.Providers[tc.provider].Account; got != tc.want {
			t.Errorf("provider %s: account %q, want %q", tc.provider, got, tc.want)
		}
	}
}
