package config

import (
	"fmt"
	"net/http"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/budget"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// Registry is a loaded, validated merchant registry (LoadWith, Merge). It
// is not modified after, but for its cache of binding profiles (under a
// lock), so it is safe for concurrent use.
type Registry struct {
	// Path is the file, directory or glob the registry was read from,
	// as given.
	Path string
	// Files are the files it was read from, in the order they were
	// merged.
	Files []string
	// Providers are the providers by name.
	Providers map[string]*Provider
	// Merchants are the merchants by merchant id.
	Merchants map[string]*Merchant
	// Wildcard is the [merchants."*"] entry serving every other merchant
	// id, nil when the file has none.
	Wildcard *Wildcard

	profiles profiles // shared by the bindings (Binding)
	inputs   inputs   // what its entries read (Inputs)
}

// Provider is a resolved [providers.NAME] table. It holds no secret in
// clear: the credentials live inside Source.
type Provider struct {
	// Name is the provider's name in the file.
	Name string
	// Type is the token API type ("nuapay", "oauth2").
	Type string
	// ID is Name + "#" + the first 12 hex characters of a SHA-256 over the
	// registry's Path and the non-secret part of the provider's resolved
	// configuration (fingerprint): it namespaces the token cache, shared
	// by the processes of a fleet that load the same configuration from
	// the same path. It changes with the provider's endpoint or identity,
	// not with a secret rotation; no secret goes into it, so it is no
	// oracle for one. Sidecars of different partners loading one path
	// have the same IDs: only their encryption keys keep their tokens
	// apart in a shared Redis.
	ID string
	// SecretVersion changes when a resolved secret value of the provider
	// (API key, client secret) does: an HMAC under a random key of this
	// process, never shown. Empty for a provider without such a secret.
	SecretVersion string
	// Source issues the provider's tokens: a *nuapay.Source, an
	// *oauth.ClientCredentials, or for grant refresh_token an
	// *oauth.RefreshToken whose store is Options.RefreshStore.
	Source broker.Source
	// Endpoint is the provider's token API as configured: an oauth2
	// provider's token_url or issuer, a nuapay provider's base_url.
	Endpoint string
	// Account is the fingerprint (budget.Account) of the credential the
	// provider counts token requests against: an oauth2 provider's
	// client_id, a nuapay provider's API key. With Endpoint it names the
	// provider's budget in a shared store.
	Account string
	// RateLimit is the provider's token-request budget (rate_limit and
	// rate_burst); the zero Limit means none.
	RateLimit budget.Limit
	// Budget spends RateLimit for every profile of the provider
	// (Options.Budgets makes it), and observes the rate-limit headers of
	// the provider's token answers. Nil without rate_limit.
	Budget *budget.Budget
	// DPoP is the key an oauth2 provider's tokens are bound to
	// ([providers.NAME.dpop]), nil for bearer tokens; never shown.
	DPoP *dpop.Key
	// Consent is the authorization-code flow of a refresh_token provider
	// with a consent table; nil otherwise.
	Consent *oauth.AuthCode
	// DisplayName is the consent table's display_name, shown on the
	// consent pages; empty when unset.
	DisplayName string
	// Line is the line of the provider's table, 0 if unknown.
	Line int

	client   *http.Client // the provider's HTTP client, whose answers Budget observes
	certFile string       // the resolved tls.client_cert, "" for none
}

// ProviderName returns the provider name part of a provider ID
// (Provider.ID).
func ProviderName(id string) string {
	name, _, _ := strings.Cut(id, "#")
	return name
}

// RefreshToken returns the provider's source when it keeps merchants'
// refresh tokens (grant refresh_token), and false for another grant or a
// nil p.
func (p *Provider) RefreshToken() (*oauth.RefreshToken, bool) {
	if p == nil {
		return nil, false
	}
	src, ok := p.Source.(*oauth.RefreshToken)
	return src, ok
}

// Merchant is a resolved [merchants.ID] table.
type Merchant struct {
	// ID is the merchant id, the name of its table.
	ID string
	// Organisation is the provider's id of the merchant's organisation.
	Organisation string
	// Terms are the merchant's provider, scopes, lifetime and audience
	// (m.Provider, m.Scopes, m.Lifetime, m.Audience), shared with the
	// other merchants of its file that have the same: never nil.
	*Terms
	// Line is the line of the merchant's table, 0 if unknown.
	Line int
}

// Terms are what a merchant asks its provider for besides its
// organisation. The merchants of a registry file that ask alike share one
// Terms. A Terms reachable from a Registry is shared: never assign to its
// fields, give the merchant a new one.
type Terms struct {
	// Provider is the name of the merchant's provider.
	Provider string
	// Scopes are the default scopes, normalised (sorted, de-duplicated).
	Scopes []string
	// Lifetime is the token lifetime to ask for (nuapay), or the longest
	// a token is kept (oauth2); 0 means the provider's.
	Lifetime time.Duration
	// Audience is the audience the token is for, if any.
	Audience string
	// DisplayName is the merchant's display_name, shown on the consent
	// pages; empty when it has none (the pages show its id). Merchants
	// with a display name have Terms of their own.
	DisplayName string
}

// HasConsent reports whether a provider of r has a consent flow
// ([providers.NAME.consent]).
func (r *Registry) HasConsent() bool {
	for _, p := range r.Providers {
		if p.Consent != nil {
			return true
		}
	}
	return false
}

// Budgets returns the budgets of r's providers that have one
// (Provider.Budget: those with a rate_limit).
func (r *Registry) Budgets() []*budget.Budget {
	if r == nil {
		return nil
	}
	var budgets []*budget.Budget
	for _, p := range r.Providers {
		if p.Budget != nil {
			budgets = append(budgets, p.Budget)
		}
	}
	return budgets
}

// Source returns the source of r's provider whose ID is id; nil when r
// (or a nil r) has none.
func (r *Registry) Source(id string) broker.Source {
	if r == nil {
		return nil
	}
	for _, p := range r.Providers {
		if p.ID == id {
			return p.Source
		}
	}
	return nil
}

// HasRefreshTokens reports whether a provider of r keeps merchants'
// refresh tokens (grant "refresh_token") in Options.RefreshStore.
func (r *Registry) HasRefreshTokens() bool {
	for _, p := range r.Providers {
		if _, ok := p.RefreshToken(); ok {
			return true
		}
	}
	return false
}

// CheckRouteScopes fails when a route's scopes, which replace the
// merchants' own, hold a malformed scope. The merchants' own scopes are
// checked when the registry is loaded.
func (r *Registry) CheckRouteScopes(scopes []string) error {
	if _, err := routeScopes(scopes); err != nil {
		return fmt.Errorf("token_broker: %s: route scopes: %w", r.Path, err)
	}
	return nil
}

// routeScopes returns a route's scopes normalised; it fails when one is
// malformed.
func routeScopes(scopes []string) ([]string, error) {
	s := broker.NormaliseScopes(scopes)
	for _, v := range s {
		if !validScope(v) {
			return nil, fmt.Errorf("scope %q is not a valid scope token", v)
		}
	}
	return s, nil
}

// Binding returns the broker binding for a merchant (Merchant, then
// MerchantBinding). It fails when the merchant is unknown, or as
// MerchantBinding does.
func (r *Registry) Binding(merchantID string, scopes []string) (*broker.Binding, error) {
	m, _, ok := r.Merchant(merchantID)
	if !ok {
		return nil, fmt.Errorf("unknown merchant %q", merchantID)
	}
	return r.MerchantBinding(m, scopes)
}

// MerchantBinding returns the broker binding for m, a merchant of r as
// Merchant returned it. Non-empty scopes replace the merchant's default
// scopes; it fails when one is malformed.
func (r *Registry) MerchantBinding(m *Merchant, scopes []string) (*broker.Binding, error) {
	wild := r.Wildcard != nil && r.Merchants[m.ID] != m
	p := r.Providers[m.Provider]
	sc, err := routeScopes(scopes)
	if err != nil {
		return nil, fmt.Errorf("merchant %q: %w", m.ID, err)
	}
	route := len(sc) > 0
	if !route {
		sc = m.Scopes
	}
	if wild && !r.Wildcard.sharesProfile(route) {
		// A wildcard merchant whose audience or scopes hold its own id:
		// a profile of its own, which goes when the merchant is evicted.
		return broker.NewBindingFor(p.newProfile(sc, m.Audience, m.Lifetime), m.ID, m.Organisation), nil
	}
	return broker.NewBindingFor(r.profile(p, sc, m.Audience, m.Lifetime), m.ID, m.Organisation), nil
}

// ValidMerchantID reports whether s can be a merchant id: 1 to 128 ASCII
// letters, digits and . _ - : @, starting with a letter or a digit. A comma
// is refused: an intermediary folds two header values into one with ", ",
// which must not make a valid id.
func ValidMerchantID(s string) bool {
	if s == "" || len(s) > 128 || !isAlnum(s[0]) {
		return false
	}
	for i := 0; i < len(s); i++ {
		if !isAlnum(s[i]) && strings.IndexByte("._-:@", s[i]) < 0 {
			return false
		}
	}
	return true
}

func isAlnum(c byte) bool {
	return 'a' <= c && c <= 'z' || 'A' <= c && c <= 'Z' || '0' <= c && c <= '9'
}

// validScope reports whether s is an RFC 6749 scope-token: printable ASCII
// without space, '"' or '\'. Scopes are joined with spaces in cache keys.
func validScope(s string) bool {
	for i := 0; i < len(s); i++ {
		if c := s[i]; c <= ' ' || c >= 0x7f || c == '"' || c == '\\' {
			return false
		}
	}
	return s != ""
}

// Duration is a time.Duration read from a TOML string in Go syntax ("90s",
// "10m", "1h30m").
type Duration time.Duration

// UnmarshalText implements encoding.TextUnmarshaler.
func (d *Duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return fmt.Errorf("invalid duration %q: use Go syntax such as \"90s\", \"10m\" or \"1h\"", b)
	}
	*d = Duration(v)
	return nil
}

// Error is one problem in a registry file.
type Error struct {
	// File is the path of the file.
	File string
	// Line is the line of the problem, 0 if unknown.
	Line int
	// Entry is the entry at fault, `merchant "acme"` or
	// `provider "nuapay-sandbox"`, or "" for the file as a whole.
	Entry string
	// Field is the key at fault within the entry ("provider",
	// "tls.client_cert"), or "" for the entry as a whole.
	Field string
	// Msg says what is wrong. It never holds a secret.
	Msg string
}

// Error formats the problem as
// `merchants.toml:12: merchant "acme": field provider: unknown provider "nuapy" (defined: nuapay-sandbox)`.
func (e *Error) Error() string {
	where := e.File
	if e.Line > 0 {
		where += fmt.Sprintf(":%d", e.Line)
	}
	parts := make([]string, 0, 4)
	for _, s := range []string{where, e.Entry, "field " + e.Field, e.Msg} {
		if s != "" && s != "field " {
			parts = append(parts, s)
		}
	}
	return strings.Join(parts, ": ")
}

// ErrorLines returns the problems of a LoadWith error one per line, each
// starting with its file:line (for a JSON log, where the joined error
// would print on one line).
func ErrorLines(err error) []string {
	if err == nil {
		return nil
	}
	return strings.Split(err.Error(), "\n")
}

// Options are what the program gives the registry besides the file.
type Options struct {
	// RefreshStore keeps the refresh tokens of oauth2 providers with
	// grant "refresh_token" (kvstore.Refresh on Caddy's storage, or the
	// shared tier's). Without it, such a provider is a configuration error.
	RefreshStore oauth.Store
	// ConsentStore keeps the consents in progress of providers with a
	// consent table (kvstore.Pending on Caddy's storage).
	// Default: in memory.
	ConsentStore oauth.PendingStore
	// LookupEnv resolves {env.NAME} references. Default os.LookupEnv.
	LookupEnv func(string) (string, bool)
	// OnDPoPNonce, when set, is called with the provider's name for each
	// new DPoP nonce of a token or PAR endpoint (oauth.Config.OnDPoPNonce),
	// for as long as the registry is in use. It must be cheap and safe for
	// concurrent use.
	OnDPoPNonce func(provider string)
	// Budgets returns the budget of a provider with a rate_limit
	// (Provider.Budget), once per such provider of a registry resolved
	// without problems; its error is the registry's, at the provider.
	// Default: a budget of the registry's own, in this process, with the
	// whole limit.
	Budgets func(p *Provider) (*budget.Budget, error)
	// Logger receives what the providers' sources log outside a request
	// (oauth.Config.Logger). The sources keep it across reloads when the
	// registry is kept (regcache): give one that outlives a config.
	// Default: none.
	Logger *zap.Logger
}

// LoadWith reads and validates the registry at path, resolving secret
// references from the environment (opts.LookupEnv) and the file system.
// path is a file, a directory (every *.toml file in it) or a glob (see
// Files).
func LoadWith(path string, opts Options) (*Registry, error) {
	srcs, err := ReadSources(path)
	if err != nil {
		return nil, err
	}
	files := make([]*File, len(srcs))
	for i, src := range srcs {
		files[i] = ParseFile(src, opts.LookupEnv)
	}
	return Merge(path, srcs, files, opts)
}
