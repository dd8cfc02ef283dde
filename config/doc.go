// Package config reads the token broker's merchant registry: a TOML file
// that defines the providers (token APIs and their credentials) and the
// merchants (which provider, organisation, scopes and lifetime each one
// uses). It does not import Caddy.
//
// An example, with every key:
//
//	[providers.nuapay-sandbox]
//	type = "nuapay"                         # the token API; "nuapay" for now
//	base_url = "{env.NUAPAY_BASE_URL}"      # http(s) URL without query, fragment or credentials
//	api_key = "{env.NUAPAY_API_KEY}"        # secret: a reference, never the value itself
//	timeout = "10s"                         # per token-API call; default 10s, at most 5m
//	token_lifetime = "1h"                   # expiresIn asked for; default 1h, Nuapay range 10s..31556926s
//	organisations_path = "/organisations"   # optional, "/cust/organisations" on newer APIs
//
//	  [providers.nuapay-sandbox.tls]        # optional: mutual TLS (eIDAS QWAC) and trusted CAs
//	  client_cert = "qwac.pem"              # relative paths are relative to this file's folder
//	  client_key = "qwac.key"
//	  ca_file = "ca.pem"
//	  server_name = "api.partnerdomain.com"
//
//	[merchants.acme]
//	provider = "nuapay-sandbox"
//	organisation = "org-acme"               # Nuapay's encodedOrganisationId
//	scopes = ["openbanking_pisp", "openbanking_aisp"]
//	token_lifetime = "15m"                  # optional, overrides the provider's
//	audience = ""                           # optional
//
// Secrets (api_key) must be exactly one reference: {env.NAME} reads an
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
