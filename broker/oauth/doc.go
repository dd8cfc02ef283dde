// Package oauth has the broker's standard OAuth 2.0 token sources, both
// broker.Sources: the client credentials grant (RFC 6749 §4.4), and the
// refresh token grant (RFC 6749 §6) for merchants who consented through
// the authorization code flow with PKCE S256 (AuthCode, optionally pushed
// with PAR, RFC 9126).
//
// The token, PAR and revocation requests are form POSTs with the
// configured client authentication, sent by one form sender. Their answers
// are read as RFC 6749 §5 allows them: JSON whatever the Content-Type, or
// form-encoded, with expires_in a number (with or without a fraction) or a
// string of one. golang.org/x/oauth2's own reader forces expires_in to an
// integer and reads JSON labelled text/plain as a form, so x/oauth2 gives
// only its Token type and PKCE.
//
// Client authentication (RFC 6749 §2.3, RFC 7523, RFC 8705):
//
//	client_secret_basic  id and secret form-url-encoded, then HTTP Basic
//	client_secret_post   client_id and client_secret in the form body
//	private_key_jwt      a fresh signed assertion (PS256, ES256 or RS256) per request
//	tls_client_auth      the TLS client certificate; client_id in the body
//
// The token endpoint is configured (TokenURL) or discovered from Issuer:
// its OpenID discovery document (github.com/coreos/go-oidc/v3), else its
// RFC 8414 metadata. Discovered endpoints are cached, a failed discovery is
// not, and a token request that fails in transport or with 404 makes the
// next call discover again.
//
// A token's lifetime is expires_in (a positive fraction under a second is
// one second; at most ten years); else the exp claim of an access token
// that is a JWT (read, not verified), when at most ten years ahead; else
// Config.DefaultLifetime. Nothing here shortens it: the broker's
// refresh-ahead decides when to fetch the next token.
//
// With a DPoP key (Config.DPoP, RFC 9449) the token and PAR requests carry
// a proof, the answer must be token_type DPoP, and the authorization
// request carries dpop_jkt. A use_dpop_nonce answer that brought a new
// nonce is sent again: for Token by the broker's attempts (Classify,
// within the provider's budget), for the consent's PAR request and code
// exchange by the source itself.
//
// No error from this package contains a client secret, an assertion, a
// refresh token or an access token.
package oauth
