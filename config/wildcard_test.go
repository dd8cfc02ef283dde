package config

import (
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

const wildcardFile = `
[providers.nuapay]
type = "nuapay"
base_url = "{env.NUAPAY_BASE_URL}"
api_key = "{env.NUAPAY_API_KEY}"

[providers.oneid]
type = "oauth2"
token_url = "https://oneid.example/token"
client_id = "c"
client_secret = "{env.NUAPAY_API_KEY}"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme-explicit"
scopes = ["openbanking_pisp"]

[merchants."*"]
provider = "nuapay"
organisation = "{merchant}"
scopes = ["openbanking_pisp", "tenant:{merchant}"]
max_active = 3
idle_timeout = "5m"
only_listed_organisations = true
organisations_refresh = "1m"
`

// TestWildcardEntry: the wildcard serves any valid id with {merchant}
// substituted, explicit entries win, and its own keys are read.
func TestWildcardEntry(t *testing.T) {
	reg, err := parse("w.toml", []byte(wildcardFile), testEnv())
	if err != nil {
		t.Fatal(err)
	}
	w := reg.Wildcard
	if w == nil || w.MaxActive != 3 || w.IdleTimeout != 5*time.Minute || !w.OnlyListed || w.OrganisationsRefresh != time.Minute {
		t.Fatalf("wildcard = %+v", w)
	}
	if _, ok := reg.Merchants[WildcardID]; ok {
		t.Fatal("the wildcard must not be an explicit merchant")
	}
	for _, tt := range []struct {
		id, org  string
		scopes   []string
		wildcard bool
		ok       bool
	}{
		{"acme", "org-acme-explicit", []string{"openbanking_pisp"}, false, true},
		{"ORG-123_x", "ORG-123_x", []string{"openbanking_pisp", "tenant:ORG-123_x"}, true, true},
		{"..", "", nil, false, false},
		{"a/b", "", nil, false, false},
		{"", "", nil, false, false},
	} {
		b, err := reg.Binding(tt.id, nil)
		if !tt.ok {
			if err == nil {
				t.Errorf("%q: want an error", tt.id)
			}
			continue
		}
		if err != nil {
			t.Fatalf("%q: %v", tt.id, err)
		}
		if b.Merchant != tt.id || b.Organisation != tt.org || !slices.Equal(b.Scopes, tt.scopes) {
			t.Errorf("%q: request %+v, want org %q scopes %v", tt.id, b.Request(), tt.org, tt.scopes)
		}
		if _, wild, _ := reg.Merchant(tt.id); wild != tt.wildcard {
			t.Errorf("%q: wildcard = %v", tt.id, wild)
		}
	}
	// The template is not modified by a substitution.
	if !slices.Contains(w.Scopes, "tenant:{merchant}") || w.Organisation != "{merchant}" {
		t.Fatalf("template changed: %+v", w.Merchant)
	}
}

func TestWildcardErrors(t *testing.T) {
	base := strings.Split(wildcardFile, `[merchants."*"]`)[0]
	for _, tt := range []struct{ name, entry, want string }{
		{"unknown key", "provider = \"nuapay\"\norganisation = \"{merchant}\"\nscopes = [\"a\"]\nmax_activ = 3", `w.toml:22: merchant "*": field max_activ: unknown key`},
		{"bad max", "provider = \"nuapay\"\norganisation = \"{merchant}\"\nscopes = [\"a\"]\nmax_active = 0", `merchant "*": field max_active: 0: must be at least 1`},
		{"listing needs nuapay", "provider = \"oneid\"\nscopes = [\"a\"]\nonly_listed_organisations = true", `field only_listed_organisations: provider "oneid" is of type oauth2`},
		{"refresh without listing", "provider = \"nuapay\"\norganisation = \"{merchant}\"\nscopes = [\"a\"]\norganisations_refresh = \"1m\"", `field organisations_refresh: set only with only_listed_organisations`},
		{"max organisations without listing", "provider = \"nuapay\"\norganisation = \"{merchant}\"\nscopes = [\"a\"]\nmax_organisations = 10", `field max_organisations: set only with only_listed_organisations`},
		{"bad max organisations", "provider = \"nuapay\"\norganisation = \"{merchant}\"\nscopes = [\"a\"]\nonly_listed_organisations = true\nmax_organisations = 0", `field max_organisations: 0: must be between 1 and 10000000`},
		{"other placeholder", "provider = \"nuapay\"\norganisation = \"{id}\"\nscopes = [\"a\"]", `field organisation: "{id}": the only placeholder allowed here is {merchant}`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			_, err := parse("w.toml", []byte(base+"[merchants.\"*\"]\n"+tt.entry+"\n"), testEnv())
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("error %v, want %q", err, tt.want)
			}
		})
	}
}

// TestWildcardOnRefreshTokenProvider: the wildcard entry cannot name a
// provider with grant refresh_token: its merchants each need a refresh
// token of their own, which only merchants with their own table can be
// given (consent links, the admin API, the consent states), so a
// wildcard merchant could never be served a token.
func TestWildcardOnRefreshTokenProvider(t *testing.T) {
	base := strings.Split(wildcardFile, `[merchants."*"]`)[0]
	file := base + `[providers.consented]
type = "oauth2"
grant = "refresh_token"
token_url = "https://bank.example/token"
client_id = "rt-client"
client_secret = "{env.NUAPAY_API_KEY}"

[merchants."*"]
provider = "consented"
`
	_, err := parseWith("w.toml", []byte(file), Options{LookupEnv: testEnv(), RefreshStore: &oauth.MemoryStore{}})
	line := strings.Count(file[:strings.Index(file, `provider = "consented"`)], "\n") + 1
	want := fmt.Sprintf(`w.toml:%d: merchant "*": field provider: provider "consented" uses grant refresh_token`, line)
	if err == nil || !strings.Contains(err.Error(), want) || !strings.Contains(err.Error(), "[merchants.ID]") {
		t.Fatalf("error %v, want %q and what to do", err, want)
	}
}

// TestBindingProfiles: the bindings of merchants with the same provider,
// scopes, audience and lifetime share one broker.Profile, explicit or
// through the wildcard entry; a wildcard merchant whose scopes or
// audience hold its own id gets a profile of its own, which the registry
// does not keep (no growth per merchant id seen); the cache keys are
// those of a binding made alone (NewBinding); every profile spends the
// provider's budget.
func TestBindingProfiles(t *testing.T) {
	const file = `
[providers.nuapay]
type = "nuapay"
base_url = "{env.NUAPAY_BASE_URL}"
api_key = "{env.NUAPAY_API_KEY}"
rate_limit = "5/s"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]

[merchants.shop]
provider = "nuapay"
organisation = "org-shop"
scopes = ["openbanking_pisp"]

[merchants.other]
provider = "nuapay"
organisation = "org-other"
scopes = ["openbanking_pisp"]
token_lifetime = "10m"
`
	for _, tt := range []struct {
		name, wildcard string
		shared         bool // wildcard merchants share a profile
	}{
		{"org placeholder", "organisation = \"{merchant}\"\nscopes = [\"openbanking_pisp\"]", true},
		{"scope placeholder", "organisation = \"{merchant}\"\nscopes = [\"tenant:{merchant}\"]", false},
		{"audience placeholder", "organisation = \"{merchant}\"\nscopes = [\"openbanking_pisp\"]\naudience = \"https://{merchant}.example\"", false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			reg, err := parse("p.toml", []byte(file+"\n[merchants.\"*\"]\nprovider = \"nuapay\"\n"+tt.wildcard+"\n"), testEnv())
			if err != nil {
				t.Fatal(err)
			}
			bind := func(id string, scopes []string) *broker.Binding {
				t.Helper()
				b, err := reg.Binding(id, scopes)
				if err != nil {
					t.Fatal(err)
				}
				alone := brokertest.NewBinding(b.SourceID, b.Source, b.Request())
				if b.Key() != alone.Key() {
					t.Errorf("%s: key %q, want %q", id, b.Key(), alone.Key())
				}
				if want := reg.Providers["nuapay"].Budget; want == nil || b.Budget != want {
					t.Errorf("%s scopes %v: budget %p, want the provider's %p", id, scopes, b.Budget, want)
				}
				return b
			}
			acme, shop, other := bind("acme", nil), bind("shop", nil), bind("other", nil)
			if acme.Profile != shop.Profile || acme.Profile == other.Profile {
				t.Errorf("explicit merchants: acme and shop must share a profile, other (another lifetime) not")
			}
			if r1, r2 := bind("acme", []string{"accounts"}), bind("shop", []string{"accounts"}); r1.Profile != r2.Profile || r1.Profile == acme.Profile {
				t.Errorf("route scopes: one profile of their own for both merchants")
			}
			n := len(reg.profiles.m)
			w1, w2 := bind("w1", nil), bind("w2", nil)
			if got := w1.Profile == w2.Profile; got != tt.shared {
				t.Errorf("wildcard merchants share a profile: %v, want %v", got, tt.shared)
			}
			for i := range 10 {
				bind(fmt.Sprintf("w-%d", i), nil)
			}
			if grown := len(reg.profiles.m) - n; grown > 1 {
				t.Errorf("the registry kept %d profiles for 12 wildcard merchants, want at most 1", grown)
			}
		})
	}
}
