package sandbox

import (
	"crypto/rand"
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"fmt"
	"html/template"
	"net/http"
	"net/url"
	"slices"
	"strings"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"
)

// The bank's authorization endpoint: the merchant's consent. GET shows a
// simple approve page for a valid authorization request (response_type
// code, a registered client and its exact redirect_uri, PKCE S256, a
// state); POST with decision=approve redirects to the redirect_uri with a
// code, the state and iss (RFC 9207), decision=deny with
// error=access_denied. The code is single-use, valid one minute, and the
// token endpoint redeems it only with the PKCE verifier and the same
// redirect_uri; it gives an access token, a refresh token when
// offline_access was granted and, when openid was asked, an ID token
// signed with the bank's key. As OpenID Connect Core §11 asks, the bank
// grants offline_access only to a request whose prompt holds consent: a
// request without it gets no refresh token.

const (
	bankAuthorizePath = "/oauth2/authorize"
	codeLifetime      = time.Minute
)

// authCode is an issued, unused authorization code.
type authCode struct {
	client, redirect, challenge, nonce string
	jkt                                string // dpop_jkt of the request: the code is redeemed only with a proof of that key
	scopes                             []string
	expiry                             time.Time
}

// consentDiscovery adds the authorization-code metadata to the bank's
// discovery document.
func consentDiscovery(doc map[string]any, iss string) {
	doc["authorization_endpoint"] = iss + bankAuthorizePath
	doc["grant_types_supported"] = []string{"client_credentials", "refresh_token", "authorization_code"}
	doc["response_types_supported"] = []string{"code"}
	doc["code_challenge_methods_supported"] = []string{"S256"}
	doc["authorization_response_iss_parameter_supported"] = true
}

var approvePage = template.Must(template.New("approve").Parse(`<!doctype html>
<meta charset=utf-8><title>Sandbox bank: consent</title>
<h1>Sandbox bank</h1>
<p>{{.Client}} asks for access to your accounts ({{.Scope}}).</p>
<form method=post action="{{.Action}}">
{{range $k, $v := .Params}}<input type=hidden name="{{$k}}" value="{{index $v 0}}">
{{end}}<button name=decision value=approve>Approve</button>
<button name=decision value=deny>Deny</button>
</form>
`))

// bankAuthorize serves the authorization endpoint.
func (s *Server) bankAuthorize(w http.ResponseWriter, r *http.Request) {
	w.Header().Set("Cache-Control", "no-store")
	if r.Method != http.MethodGet && r.Method != http.MethodPost {
		w.Header().Set("Allow", "GET, POST")
		http.Error(w, "use GET or POST", http.StatusMethodNotAllowed)
		return
	}
	if err := r.ParseForm(); err != nil {
		http.Error(w, "malformed request", http.StatusBadRequest)
		return
	}
	q := r.Form
	c := s.bankClients[q.Get("client_id")]
	redirect := q.Get("redirect_uri")
	// Without a known client and its registered redirect_uri, the error
	// is shown here, never sent to an unchecked URL.
	if c == nil || !slices.Contains(c.RedirectURIs, redirect) {
		http.Error(w, "unknown client_id or redirect_uri not registered for it", http.StatusBadRequest)
		return
	}
	back := func(v url.Values) {
		v.Set("iss", s.bankIssuer(r))
		if st := q.Get("state"); st != "" {
			v.Set("state", st)
		}
		sep := "?"
		if strings.Contains(redirect, "?") {
			sep = "&"
		}
		http.Redirect(w, r, redirect+sep+v.Encode(), http.StatusSeeOther)
	}
	fail := func(code, desc string) { back(url.Values{"error": {code}, "error_description": {desc}}) }
	scopes := strings.Fields(q.Get("scope"))
	switch {
	case q.Get("response_type") != "code":
		fail("unsupported_response_type", "only response_type=code is supported")
		return
	case q.Get("code_challenge") == "" || q.Get("code_challenge_method") != "S256":
		fail("invalid_request", "PKCE with code_challenge_method=S256 is required")
		return
	case q.Get("state") == "":
		fail("invalid_request", "state is required")
		return
	}
	if bad := c.disallowed(slices.DeleteFunc(slices.Clone(scopes), func(s string) bool { return s == "openid" || s == "offline_access" })); bad != "" {
		fail("invalid_scope", fmt.Sprintf("scope %q is not allowed for this client", bad))
		return
	}
	if r.Method == http.MethodGet {
		params := url.Values{}
		for _, k := range []string{"response_type", "client_id", "redirect_uri", "scope", "state", "nonce", "code_challenge", "code_challenge_method", "prompt", "dpop_jkt"} {
			if v := q.Get(k); v != "" {
				params.Set(k, v)
			}
		}
		w.Header().Set("Content-Type", "text/html; charset=utf-8")
		_ = approvePage.Execute(w, map[string]any{"Client": c.ID, "Scope": strings.Join(scopes, " "), "Action": bankAuthorizePath, "Params": params})
		return
	}
	if q.Get("decision") != "approve" {
		fail("access_denied", "the merchant denied the request")
		return
	}
	if !slices.Contains(strings.Fields(q.Get("prompt")), "consent") { // OpenID Connect Core §11
		scopes = slices.DeleteFunc(scopes, func(s string) bool { return s == "offline_access" })
	}
	code := strings.ToLower(rand.Text())
	s.mu.Lock()
	s.codes[code] = &authCode{client: c.ID, redirect: redirect, challenge: q.Get("code_challenge"), nonce: q.Get("nonce"),
		jkt: q.Get("dpop_jkt"), scopes: scopes, expiry: s.cfg.Now().Add(codeLifetime)}
	s.mu.Unlock()
	back(url.Values{"code": {code}})
}

// redeemCode checks an authorization_code grant of client c, whose DPoP
// proof has the key thumbprint jkt ("" without one); it returns the code's
// scopes and nonce, or writes the error and returns false.
func (s *Server) redeemCode(w http.ResponseWriter, f url.Values, c *bankClient, jkt string) (*authCode, bool) {
	code := f.Get("code")
	s.mu.Lock()
	g := s.codes[code]
	delete(s.codes, code) // single use, whatever happens next
	s.mu.Unlock()
	sum := sha256.Sum256([]byte(f.Get("code_verifier")))
	switch {
	case g == nil || g.client != c.ID || !s.cfg.Now().Before(g.expiry):
		oauthError(w, http.StatusBadRequest, "invalid_grant", "the code is unknown, already used, expired, or issued to another client")
	case f.Get("redirect_uri") != g.redirect:
		oauthError(w, http.StatusBadRequest, "invalid_grant", "redirect_uri is not the one of the authorization request")
	case f.Get("code_verifier") == "":
		oauthError(w, http.StatusBadRequest, "invalid_request", "code_verifier is required (PKCE)")
	case subtle.ConstantTimeCompare([]byte(base64.RawURLEncoding.EncodeToString(sum[:])), []byte(g.challenge)) != 1:
		oauthError(w, http.StatusBadRequest, "invalid_grant", "code_verifier does not match the code_challenge")
	case g.jkt != "" && g.jkt != jkt:
		oauthError(w, http.StatusBadRequest, "invalid_grant", "the code is bound to dpop_jkt: redeem it with a DPoP proof of that key")
	default:
		return g, true
	}
	return nil, false
}

// idToken signs the ID token of a code grant.
func (s *Server) idToken(iss, client, nonce string, now time.Time) (string, error) {
	sig, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: s.bankKey},
		(&jose.SignerOptions{}).WithType("JWT").WithHeader("kid", bankKeyID))
	if err != nil {
		return "", err
	}
	claims := map[string]any{"iss": iss, "sub": "merchant-user", "aud": client, "iat": now.Unix(),
		"exp": now.Add(10 * time.Minute).Unix(), "auth_time": now.Unix()}
	if nonce != "" {
		claims["nonce"] = nonce
	}
	return jwt.Signed(sig).Claims(claims).Serialize()
}

// RevokeRefreshTokens revokes every refresh token of the bank's client
// clientID, as a bank does when a merchant withdraws its consent; the next
// refresh is invalid_grant. It returns how many were revoked.
func (s *Server) RevokeRefreshTokens(clientID string) int {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := 0
	for k, g := range s.refresh {
		if g.client == clientID {
			delete(s.refresh, k)
			n++
		}
	}
	return n
}
