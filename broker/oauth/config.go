package oauth

import (
	"errors"
	"fmt"
	"net/http"
	"slices"
	"strings"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// AuthMethod is a client authentication method, named as in the OAuth
// registry (token_endpoint_auth_method).
type AuthMethod string

// Client authentication methods.
const (
	// ClientSecretBasic sends the client id and secret, each
	// form-url-encoded, as HTTP Basic credentials (RFC 6749 §2.3.1).
	ClientSecretBasic AuthMethod = "client_secret_basic"
	// ClientSecretPost sends client_id and client_secret in the form body.
	ClientSecretPost AuthMethod = "client_secret_post"
	// PrivateKeyJWT sends a signed client assertion (RFC 7523 §2.2).
	PrivateKeyJWT AuthMethod = "private_key_jwt"
	// TLSClientAuth authenticates with the TLS client certificate of the
	// HTTP client (RFC 8705 §2.1) and sends client_id in the body.
	TLSClientAuth AuthMethod = "tls_client_auth"
)

// AuthMethods are the supported client authentication methods.
var AuthMethods = []AuthMethod{ClientSecretBasic, ClientSecretPost, PrivateKeyJWT, TLSClientAuth}

// Defaults.
const (
	// DefaultLifetime is the lifetime given to a token whose response has
	// no expires_in and that is not a JWT with an exp claim.
	DefaultLifetime = 5 * time.Minute
	// AssertionLifetime is the validity of a private_key_jwt assertion.
	AssertionLifetime = 60 * time.Second
	// ProviderName is the Provider of the *broker.APIError values of this
	// package and the source type.
	ProviderName = "oauth2"
)

// reservedParams are the form parameters that the sources set themselves;
// Config.Params cannot override them.
var reservedParams = []string{
	"grant_type", "scope", "refresh_token", "audience", "resource",
	"client_id", "client_secret", "client_assertion", "client_assertion_type",
}

// ReservedParam reports whether name is a form parameter the sources set
// themselves and Config.Params may therefore not contain.
func ReservedParam(name string) bool { return slices.Contains(reservedParams, name) }

// Config configures an OAuth 2.0 token source.
type Config struct {
	// Name names the provider in errors and in refresh-token store keys
	// (see StoreKey). It should be stable across configuration changes.
	Name string
	// StoreNamespace names the owner of the refresh tokens in the Store
	// (the registry), so that two registries sharing one Store keep apart.
	// Optional.
	StoreNamespace string
	// TokenURL is the token endpoint. Exactly one of TokenURL and Issuer.
	TokenURL string
	// Issuer is the authorization server's issuer identifier: the
	// endpoints are read from {Issuer}/.well-known/openid-configuration,
	// or on 404 from its RFC 8414 metadata; either must name exactly this
	// issuer. With a TLS client certificate the mtls_endpoint_aliases are
	// used (RFC 8705 §5).
	Issuer string
	// RevocationURL is the RFC 7009 revocation endpoint. Optional; with
	// Issuer it defaults to the discovered revocation_endpoint.
	RevocationURL string
	// ClientID is the client identifier. Required.
	ClientID string
	// ClientSecret is the client secret, for ClientSecretBasic and
	// ClientSecretPost only.
	ClientSecret broker.Secret
	// AuthMethod is the client authentication method. Default
	// ClientSecretBasic.
	AuthMethod AuthMethod
	// Signer signs the private_key_jwt assertions. Required for
	// PrivateKeyJWT, not allowed otherwise. See NewSigner.
	Signer *Signer
	// AssertionAudience is the aud claim of the client assertions.
	// Default: the token endpoint's URL (RFC 7523 §3), also for a
	// revocation, and the PAR endpoint's for a pushed request. A server
	// that wants its issuer identifier (FAPI 2.0 Security Profile
	// §5.3.2.1, zitadel) needs it here.
	AssertionAudience string
	// Audience is sent as the audience parameter when the request names
	// none (broker.Request.Audience wins). Optional.
	Audience string
	// Resource is sent as the resource parameter (RFC 8707). Optional.
	Resource string
	// Params are extra form parameters of every token request. They cannot
	// replace a parameter the source sets itself (see ReservedParam).
	Params map[string]string
	// DefaultLifetime is the lifetime of a token without expires_in or a
	// JWT exp claim. Default DefaultLifetime.
	DefaultLifetime time.Duration
	// DPoP, when set, binds the tokens to this key (RFC 9449; see the
	// package doc). For a public client the server binds the refresh
	// token to it as well. Optional; nil means bearer tokens.
	DPoP *dpop.Key
	// OnDPoPNonce, when set, is called for each DPoP nonce challenge of
	// the token or PAR endpoint that brought a new nonce (for a metric).
	// It must be cheap and safe for concurrent use.
	OnDPoPNonce func()
	// Client makes the calls, with its timeout and, for TLSClientAuth,
	// its client certificate. Default: httpclient.New with a 10s timeout.
	Client *http.Client
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// Logger logs what a source does on its own (see SaveError), never a
	// token. Default: none.
	Logger *zap.Logger
}

// check validates the configuration and fills in the defaults.
func (c *Config) check() error {
	var errs []error
	switch {
	case (c.TokenURL == "") == (c.Issuer == ""):
		errs = append(errs, errors.New("set exactly one of token_url and issuer"))
	case c.TokenURL != "":
		if err := checkURL("token_url", c.TokenURL); err != nil {
			errs = append(errs, err)
		}
	default:
		if err := checkURL("issuer", c.Issuer); err != nil {
			errs = append(errs, err)
		}
	}
	if c.RevocationURL != "" {
		if err := checkURL("revocation_url", c.RevocationURL); err != nil {
			errs = append(errs, err)
		}
	}
	if c.ClientID == "" {
		errs = append(errs, errors.New("client_id is empty"))
	}
	if c.AuthMethod == "" {
		c.AuthMethod = ClientSecretBasic
	}
	switch c.AuthMethod {
	case ClientSecretBasic, ClientSecretPost:
		if c.ClientSecret == "" {
			errs = append(errs, fmt.Errorf("auth_method %s needs client_secret", c.AuthMethod))
		}
	case PrivateKeyJWT, TLSClientAuth:
		if c.ClientSecret != "" {
			errs = append(errs, fmt.Errorf("auth_method %s takes no client_secret", c.AuthMethod))
		}
	default:
		errs = append(errs, fmt.Errorf("unknown auth_method %q (known: %s)", c.AuthMethod, AuthMethodNames()))
	}
	if (c.AuthMethod == PrivateKeyJWT) != (c.Signer != nil) {
		errs = append(errs, errors.New("a private key is needed with auth_method private_key_jwt, and only with it"))
	}
	if has, known := httpclient.HasClientCert(c.Client); c.AuthMethod == TLSClientAuth && !has && known {
		errs = append(errs, errors.New("auth_method tls_client_auth needs an HTTP client with a client certificate"))
	}
	for k := range c.Params {
		if ReservedParam(k) {
			errs = append(errs, fmt.Errorf("parameter %q is set by the source and cannot be configured", k))
		}
	}
	if c.DefaultLifetime < 0 {
		errs = append(errs, errors.New("default lifetime is negative"))
	}
	if c.DefaultLifetime == 0 {
		c.DefaultLifetime = DefaultLifetime
	}
	if c.Client == nil {
		c.Client, _ = httpclient.New(10*time.Second, httpclient.TLSOptions{})
	}
	if c.Now == nil {
		c.Now = time.Now
	}
	if c.Logger == nil {
		c.Logger = zap.NewNop()
	}
	if c.Name == "" {
		c.Name = ProviderName
	}
	return errors.Join(errs...)
}

// AuthMethodNames lists the supported client authentication methods for
// messages: "client_secret_basic, client_secret_post, ...".
func AuthMethodNames() string {
	s := make([]string, len(AuthMethods))
	for i, m := range AuthMethods {
		s[i] = string(m)
	}
	return strings.Join(s, ", ")
}

// checkURL checks an endpoint URL; its error is an *endpointURLError.
func checkURL(field, s string) error {
	if err := httpclient.CheckURL(s, true); err != nil {
		return &endpointURLError{field: field, err: err}
	}
	return nil
}

// endpointURLError is an endpoint URL, configured or discovered, that
// checkURL refuses: trying again does not help.
type endpointURLError struct {
	field string // the endpoint's name, as in a discovery document
	err   error
}

// Error names the field and what is wrong with its URL.
func (e *endpointURLError) Error() string { return e.field + ": " + e.err.Error() }

// Unwrap returns what is wrong with the URL.
func (e *endpointURLError) Unwrap() error { return e.err }
