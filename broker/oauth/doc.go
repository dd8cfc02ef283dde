// Package oauth has the broker's standard OAuth 2.0 token sources: the
// client credentials grant (RFC 6749 §4.4) and the refresh token grant
// (RFC 6749 §6) for merchants who consented through the authorization code
// flow. Both implement broker.Source.
//
// The token, PAR and revocation requests are form POSTs with the
// configured client authentication, the request's context and the
// provider's own HTTP client, sent by one form sender. Their answers are
// read by one reader as RFC 6749 §5 allows them: JSON (whatever its
// Content-Type says) or form-encoded, and expires_in a number with or
// without a fraction, or a string of one. golang.org/x/oauth2 v0.37's own
// token reader forces expires_in to an integer and reads JSON labelled
// text/plain as a form, so it does not send the token request; x/oauth2
// is used for its Token type, PKCE and auth styles.
// Nothing here shortens a token's life: Expiry is the provider's, and the
// broker's refresh-ahead decides when to fetch the next one.
//
// Client authentication (RFC 6749 §2.3, RFC 7523, RFC 8705):
//
//	client_secret_basic  id and secret form-url-encoded, then HTTP Basic
//	client_secret_post   client_id and client_secret in the form body
//	private_key_jwt      a fresh signed assertion (PS256, ES256 or RS256) per request
//	tls_client_auth      the TLS client certificate; client_id in the body
//
// The token endpoint is configured (TokenURL) or discovered from the issuer
// with github.com/coreos/go-oidc/v3 (Issuer; an authorization server
// without OpenID discovery by its RFC 8414 metadata): the discovered endpoints are
// cached, a discovery failure is not (the next call tries again), and a
// token request that fails in transport or with 404 makes the next call
// discover again.
//
// A token's lifetime comes from expires_in (a positive fraction under a
// second is one second; at most ten years); without it, from the exp
// claim of an access token that is a JWT (read, not verified: the token
// is opaque to the broker) when it is at most ten years ahead; without
// either, from Config.DefaultLifetime.
//
// AuthCode runs the merchants' consent (the authorization code flow with
// PKCE S256, optionally pushed with PAR, RFC 9126). It sends prompt=consent
// whenever offline_access is asked for (OpenID Connect Core §11) and the
// configured prompt, acr_values, claims, authorization_details (RFC 9396)
// and resource (RFC 8707) parameters. A callback with access_denied is the
// merchant's denial (ReasonDenied); any other error of the provider is
// ReasonProviderError, with the provider's code and what the operator can
// change.
//
// With a DPoP key (Config.DPoP, RFC 9449) every token request and pushed
// authorization request carries a proof (dpop.Transport), the answer must
// be token_type DPoP, and the authorization request carries dpop_jkt, so
// that the code, the access tokens and a public client's refresh token are
// bound to the key. The server's use_dpop_nonce is answered with one new
// request when it gave a new nonce. For Token, the source returns it
// classified broker.ClassRetryNow and the broker's attempts send it,
// through the failure policy and the provider's budget like any call
// (a budget with no room for it leaves it unsent);
// the consent's PAR request and code exchange, which go through neither,
// are sent again by the source itself.
//
// No error from this package contains a client secret, an assertion, a refresh
// token or an access token.
package oauth
