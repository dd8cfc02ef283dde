// Package config reads the token broker's merchant registry: a TOML file
// that defines the providers (token APIs and their credentials) and the
// merchants (which provider, organisation, scopes and lifetime each one
// uses). It does not import Caddy.
//
// An example, with every key:
//
//	[providers.nuapay-sandbox]
//	type = "nuapay"                         # the token API: "nuapay" or "oauth2"
//	base_url = "{env.NUAPAY_BASE_URL}"      # http(s) URL without query, fragment or credentials
//	api_key = "{env.NUAPAY_API_KEY}"        # secret: a reference, never the value itself
//	timeout = "10s"                         # per token-API call; default 10s, at most 5m
//	rate_limit = "20/s"                     # optional token-request budget: "N/s", "N/m" or "N/h"
//	rate_burst = 5                          # optional, with rate_limit: requests at once after a quiet spell, 1 to one second's worth
//	token_lifetime = "1h"                   # expiresIn asked for; default 1h, Nuapay range 10s..31556926s
//	organisations_path = "/organisations"   # optional, "/cust/organisations" on newer APIs
//
//	  [providers.nuapay-sandbox.tls]        # optional: mutual TLS (eIDAS QWAC) and trusted CAs
//	  client_cert = "qwac.pem"              # relative paths are relative to this file's folder
//	  client_key = "qwac.key"
//	  ca_file = "ca.pem"
//	  server_name = "api.partnerdomain.com"
//
//	[providers.oneid]                       # OAuth 2.0 client credentials (RFC 6749 §4.4)
//	type = "oauth2"
//	token_url = "https://api.oneid.uk/v1/token"   # or issuer = "https://..." (OIDC discovery), not both
//	client_id = "{env.ONEID_CLIENT_ID}"
//	client_secret = "{env.ONEID_CLIENT_SECRET}"  # secret reference; client_secret_* methods only
//	auth_method = "client_secret_post"      # default client_secret_basic with a secret,
//	                                        # private_key_jwt with private_key, tls_client_auth with tls.client_cert
//	default_lifetime = "5m"                 # when the response has no expires_in and the token no JWT exp
//
//	[providers.bank]                        # FAPI-style: private_key_jwt, endpoints discovered
//	type = "oauth2"
//	grant = "client_credentials"            # or "refresh_token" (needs the refresh store the Caddy module provides)
//	issuer = "https://auth.bank.example"
//	revocation_url = ""                     # optional; default the discovered revocation_endpoint
//	client_id = "broker-client"
//	private_key = "bank-signing.key"        # PEM (PKCS#1, PKCS#8, SEC1), a path like tls.client_key
//	key_id = "sig-2026"                     # kid; default the key's RFC 7638 thumbprint
//	signing_alg = "PS256"                   # PS256 | ES256 | RS256; default PS256 (RSA) or ES256 (EC)
//	assertion_audience = ""                 # aud of the assertion; default the token endpoint URL
//	audience = ""                           # audience parameter when the merchant sets none
//	resource = "https://api.bank.example"   # RFC 8707 resource parameter
//	  [providers.bank.params]               # extra token-request parameters
//	  acr_values = "urn:bank:acr"
//	  [providers.bank.dpop]                 # optional: DPoP-bound tokens (RFC 9449), oauth2 only
//	  key = "{file.dpop.pem}"               # PEM private key: {file.PATH}, {env.NAME} (the PEM) or a path
//	  alg = "EdDSA"                         # ES256 | PS256 | EdDSA | Ed25519; default from the key (EC P-256, RSA, Ed25519: EdDSA)
//
//	[merchants.acme]
//	provider = "nuapay-sandbox"
//	organisation = "org-acme"               # Nuapay's encodedOrganisationId
//	scopes = ["openbanking_pisp", "openbanking_aisp"]
//	token_lifetime = "15m"                  # optional: nuapay, overrides the provider's; oauth2, caps the token's lifetime
//	audience = ""                           # optional
//
// Keys other than type, timeout, tls, rate_limit and rate_burst belong to
// one provider type: a key of another type is an error. For oauth2 merchants, organisation and
// scopes are optional. Refresh tokens (grant "refresh_token") never live in
// this file: they are kept in the refresh store under
// "<provider name>/<endpoint id>/<merchant id>" (oauth.StoreKey), where the
// endpoint id hashes the registry's path, the issuer (or token_url) and the
// client_id: a refresh token is never sent to another endpoint or client,
// and is kept across other changes (a secret rotation among them).
//
// Secrets (api_key, client_secret) must be exactly one reference: {env.NAME} reads an
// environment variable, {file.PATH} the content of a file with its trailing
// newline trimmed. In the other string values (base_url, organisations_path,
// the tls keys, organisation, scopes, audience) every {env.NAME} is replaced
// by the variable's value; an unset variable is an error.
//
// Durations are strings in Go syntax ("90s", "10m", "1h30m").
//
// Validation reports every problem it finds, each as an *Error naming the
// file, line, entry and field, joined with errors.Join. No error ever holds
// a secret's value.
package config
