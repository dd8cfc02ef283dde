// Package dpoprs is a resource server for tests that accepts DPoP-bound
// access tokens (RFC 9449) only after checking everything a strict resource
// server checks, with go-jose and independently of the broker's own DPoP
// code (the proof by dpoptest.Checker, the one proof check of the tests
// and the sandbox): the Authorization scheme DPoP, exactly one DPoP proof, its type
// dpop+jwt, its signature by the public key it embeds (jwk), its htm and
// htu against the method and URL the server received, its ath against the
// token, its iat within a window, its jti never seen before, optionally a
// nonce the server handed out, and the access token itself: a JWT signed
// by a key of the authorization server's JWKS, unexpired, whose cnf.jkt is
// the thumbprint of the proof's key.
//
// Every request is recorded: accepted ones (Accepted) and refused ones with
// the reason (Refusals), so that a test can say why a request failed.
package dpoprs

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"
	"github.com/go-jose/go-jose/v4/jwt"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
)

// Refusal reasons, as recorded in Refusal.Reason.
const (
	ReasonScheme       = "authorization scheme is not DPoP"
	ReasonNoProof      = "no DPoP proof"
	ReasonManyProofs   = "more than one DPoP header"
	ReasonProof        = dpoptest.ReasonProof
	ReasonType         = dpoptest.ReasonType
	ReasonHTM          = dpoptest.ReasonHTM
	ReasonHTU          = dpoptest.ReasonHTU
	ReasonATH          = dpoptest.ReasonATH
	ReasonIAT          = dpoptest.ReasonIAT
	ReasonReplay       = dpoptest.ReasonReplay
	ReasonNonce        = dpoptest.ReasonNonce
	ReasonToken        = "access token invalid"
	ReasonBinding      = "token cnf.jkt is not the proof key's thumbprint"
	ReasonUnknownKeyID = "access token signed by a key not in the JWKS"
)

// algs are the token algorithms accepted.
var algs = []jose.SignatureAlgorithm{jose.ES256, jose.ES384, jose.PS256, jose.RS256, jose.EdDSA}

// KeySource returns the authorization server's public keys, to verify
// access tokens with. It is called for each request: cache inside.
type KeySource func(ctx context.Context) (*jose.JSONWebKeySet, error)

// JWKSURL returns a KeySource that fetches the key set at u (an
// authorization server's jwks_uri) on first use and again when a token
// names a key id it does not hold.
func JWKSURL(u string) KeySource {
	var (
		mu  sync.Mutex
		set *jose.JSONWebKeySet
	)
	return func(ctx context.Context) (*jose.JSONWebKeySet, error) {
		mu.Lock()
		defer mu.Unlock()
		if set != nil && !refetch(ctx) {
			return set, nil
		}
		req, err := http.NewRequestWithContext(ctx, http.MethodGet, u, nil)
		if err != nil {
			return nil, err
		}
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			return nil, fmt.Errorf("fetching the JWKS at %s: %w", u, err)
		}
		defer resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			return nil, fmt.Errorf("fetching the JWKS at %s: status %d", u, resp.StatusCode)
		}
		var s jose.JSONWebKeySet
		if err := json.NewDecoder(io.LimitReader(resp.Body, 1<<20)).Decode(&s); err != nil {
			return nil, fmt.Errorf("decoding the JWKS at %s: %w", u, err)
		}
		set = &s
		return set, nil
	}
}

// refetchKey marks a context whose key lookup must bypass the cache.
type refetchKey struct{}

func refetch(ctx context.Context) bool { v, _ := ctx.Value(refetchKey{}).(bool); return v }

// Options configure a Server.
type Options struct {
	// Keys verify the access tokens. Required.
	Keys KeySource
	// Issuer, when set, must be the tokens' iss.
	Issuer string
	// Nonce turns on nonce challenges: a proof without the server's
	// current nonce is answered 401 `WWW-Authenticate: DPoP
	// error="use_dpop_nonce"` with the nonce in DPoP-Nonce. Every answer
	// carries the current nonce.
	Nonce bool
	// Window is how far a proof's iat may be from now, either way.
	// Default 60s.
	Window time.Duration
	// Now is the server's clock. Default time.Now.
	Now func() time.Time
	// TLS makes Start serve HTTPS (a self-signed certificate for
	// 127.0.0.1): the proofs' htu then start with https.
	TLS bool
	// TrustForwarded makes the server rebuild the URL it received from the
	// scheme and host a gateway it trusts names (RFC 9110 §7.1):
	// X-Forwarded-Proto and X-Forwarded-Host when present, as uvicorn
	// (--proxy-headers, loopback trusted by default) and Express (trust
	// proxy) do.
	TrustForwarded bool
}

// Seen is a request the server accepted.
type Seen struct {
	// Method and URL are what the server received (URL as the proof's htu
	// must spell it).
	Method, URL string
	// JKT is the proof key's thumbprint.
	JKT string
	// Subject is the token's sub.
	Subject string
	// Body is the request body.
	Body string
}

// DetailNoAuthorization is the Refusal.Detail of a request without any
// Authorization header (Reason ReasonScheme).
const DetailNoAuthorization = "no Authorization header"

// Refusal is a request the server refused.
type Refusal struct {
	// Method and URL are what the server received.
	Method, URL string
	// Reason is one of the Reason constants.
	Reason string
	// Detail says more (never the token or the proof).
	Detail string
}

// Server is the resource server. It is an http.Handler; Start serves it on
// 127.0.0.1.
type Server struct {
	// URL is the base URL, set by Start.
	URL string

	opts Options

	// proofs checks the proofs: signature, claims, jti replay.
	proofs dpoptest.Checker

	mu       sync.Mutex
	nonce    string
	nonceN   int
	accepted []Seen
	refused  []Refusal
	// lastAuth and lastProof are the credentials of the last accepted
	// request (LastCredentials).
	lastAuth, lastProof string
}

// New returns a Server with opts.
func New(opts Options) *Server {
	if opts.Window == 0 {
		opts.Window = time.Minute
	}
	if opts.Now == nil {
		opts.Now = time.Now
	}
	s := &Server{opts: opts, proofs: dpoptest.Checker{Window: opts.Window, Now: opts.Now}}
	s.RotateNonce()
	return s
}

// Start serves a new Server on 127.0.0.1 (a port the kernel picks), over
// HTTPS with Options.TLS, until the test ends.
func Start(t testing.TB, opts Options) *Server {
	t.Helper()
	s := New(opts)
	srv := httptest.NewUnstartedServer(s)
	if opts.TLS {
		srv.StartTLS()
	} else {
		srv.Start()
	}
	t.Cleanup(srv.Close)
	s.URL = srv.URL
	return s
}

// RotateNonce makes a new current nonce: proofs carrying the old one are
// challenged again.
func (s *Server) RotateNonce() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nonceN++
	s.nonce = "rs-nonce-" + strconv.Itoa(s.nonceN) + "-" + strconv.FormatInt(s.opts.Now().UnixNano(), 36)
}

// Accepted returns the accepted requests so far.
func (s *Server) Accepted() []Seen {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Seen(nil), s.accepted...)
}

// Refusals returns the refused requests so far.
func (s *Server) Refusals() []Refusal {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]Refusal(nil), s.refused...)
}

// LastCredentials returns the Authorization and DPoP headers of the last
// accepted request, for a test to replay them as an attacker who read them
// would. Never log them.
func (s *Server) LastCredentials() (authorization, proof string) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.lastAuth, s.lastProof
}

// Challenges counts the refusals for a missing or stale nonce.
func (s *Server) Challenges() int {
	n := 0
	for _, r := range s.Refusals() {
		if r.Reason == ReasonNonce {
			n++
		}
	}
	return n
}

// requestURL is the URL as the server received it: scheme, Host header
// (or, trusting a gateway, the ones its forwarding headers name),
// path; no query or fragment (RFC 9449 §4.3).
func requestURL(r *http.Request, trustForwarded bool) string {
	scheme, host := "http", r.Host
	if r.TLS != nil {
		scheme = "https"
	}
	if trustForwarded {
		scheme = cmp.Or(r.Header.Get("X-Forwarded-Proto"), scheme)
		host = cmp.Or(r.Header.Get("X-Forwarded-Host"), host)
	}
	return scheme + "://" + host + r.URL.EscapedPath()
}

// refusal is a refused request: the reason, a detail and the error code
// of the WWW-Authenticate challenge.
type refusal struct {
	reason, detail, code string
}

// ServeHTTP answers a request the checks accept 200 with its Seen as JSON,
// and any other 401 with a `WWW-Authenticate: DPoP error=...` challenge
// (use_dpop_nonce, invalid_dpop_proof or invalid_token); in nonce mode
// every answer carries the current DPoP-Nonce. It records both.
func (s *Server) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	u := requestURL(r, s.opts.TrustForwarded)
	body, _ := io.ReadAll(io.LimitReader(r.Body, 1<<20))
	seen, rf := s.check(r, u)
	s.mu.Lock()
	nonce := s.nonce
	if rf != nil {
		s.refused = append(s.refused, Refusal{Method: r.Method, URL: u, Reason: rf.reason, Detail: rf.detail})
	} else {
		seen.Body = string(body)
		s.accepted = append(s.accepted, seen)
		s.lastAuth, s.lastProof = r.Header.Get("Authorization"), r.Header.Get("DPoP")
	}
	s.mu.Unlock()
	if s.opts.Nonce {
		w.Header().Set("DPoP-Nonce", nonce)
	}
	w.Header().Set("Content-Type", "application/json")
	if rf != nil {
		w.Header().Set("WWW-Authenticate", fmt.Sprintf(`DPoP error=%q, error_description=%q, algs="ES256 PS256 EdDSA"`, rf.code, rf.reason))
		w.WriteHeader(http.StatusUnauthorized)
		json.NewEncoder(w).Encode(map[string]string{"error": rf.code, "reason": rf.reason}) //nolint:errcheck // best effort
		return
	}
	json.NewEncoder(w).Encode(seen) //nolint:errcheck // best effort
}

// tokenClaims are the access token's claims this server reads.
type tokenClaims struct {
	jwt.Claims
	Cnf struct {
		JKT string `json:"jkt"`
	} `json:"cnf"`
}

// check verifies a request; a non-nil refusal refuses it.
func (s *Server) check(r *http.Request, u string) (Seen, *refusal) {
	if _, ok := r.Header["Authorization"]; !ok {
		return Seen{}, &refusal{ReasonScheme, DetailNoAuthorization, "invalid_token"}
	}
	scheme, token, _ := strings.Cut(r.Header.Get("Authorization"), " ")
	if !strings.EqualFold(scheme, "DPoP") || token == "" {
		return Seen{}, &refusal{ReasonScheme, "scheme " + strconv.Quote(scheme), "invalid_token"}
	}
	proofs := r.Header.Values("DPoP")
	switch {
	case len(proofs) == 0:
		return Seen{}, &refusal{ReasonNoProof, "", "invalid_dpop_proof"}
	case len(proofs) > 1:
		return Seen{}, &refusal{ReasonManyProofs, strconv.Itoa(len(proofs)) + " headers", "invalid_dpop_proof"}
	}
	want := dpoptest.Want{Method: r.Method, URL: u, AccessToken: token}
	if s.opts.Nonce {
		want.Nonce = s.currentNonce
	}
	p, err := s.proofs.Check(proofs[0], want)
	if ce := (*dpoptest.CheckError)(nil); errors.As(err, &ce) {
		code := "invalid_dpop_proof"
		if ce.Reason == ReasonNonce {
			code = "use_dpop_nonce"
		}
		return Seen{}, &refusal{ce.Reason, ce.Detail, code}
	} else if err != nil {
		return Seen{}, &refusal{ReasonProof, err.Error(), "invalid_dpop_proof"}
	}
	jkt, now := p.JKT, s.opts.Now()
	tc, rf := s.verifyToken(r.Context(), token, now)
	if rf != nil {
		return Seen{}, rf
	}
	if tc.Cnf.JKT != jkt {
		return Seen{}, &refusal{ReasonBinding, "cnf.jkt " + strconv.Quote(tc.Cnf.JKT) + ", proof key " + jkt, "invalid_token"}
	}
	return Seen{Method: r.Method, URL: u, JKT: jkt, Subject: tc.Subject}, nil
}

// currentNonce reports whether nonce is the server's current one.
func (s *Server) currentNonce(nonce string) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return nonce == s.nonce
}

// verifyToken checks the access token's signature with the key source,
// its expiry and (Options.Issuer) its issuer.
func (s *Server) verifyToken(ctx context.Context, token string, now time.Time) (tokenClaims, *refusal) {
	var tc tokenClaims
	tok, err := jwt.ParseSigned(token, algs)
	if err != nil || len(tok.Headers) != 1 {
		return tc, &refusal{ReasonToken, "not a JWT", "invalid_token"}
	}
	kid := tok.Headers[0].KeyID
	key, err := s.key(ctx, kid)
	if err != nil {
		return tc, &refusal{ReasonUnknownKeyID, err.Error(), "invalid_token"}
	}
	if err := tok.Claims(key, &tc); err != nil {
		return tc, &refusal{ReasonToken, "signature: " + err.Error(), "invalid_token"}
	}
	exp := jwt.Expected{Time: now}
	if s.opts.Issuer != "" {
		exp.Issuer = s.opts.Issuer
	}
	if err := tc.ValidateWithLeeway(exp, 5*time.Second); err != nil {
		return tc, &refusal{ReasonToken, err.Error(), "invalid_token"}
	}
	return tc, nil
}

// key returns the key with the id kid (the only key when kid is empty and
// the set has one), fetching the set again once when it does not hold it.
func (s *Server) key(ctx context.Context, kid string) (*jose.JSONWebKey, error) {
	for attempt := range 2 {
		if attempt == 1 {
			ctx = context.WithValue(ctx, refetchKey{}, true)
		}
		set, err := s.opts.Keys(ctx)
		if err != nil {
			return nil, err
		}
		if kid == "" && len(set.Keys) == 1 {
			return &set.Keys[0], nil
		}
		if ks := set.Key(kid); len(ks) > 0 {
			return &ks[0], nil
		}
	}
	return nil, errors.New("no key with kid " + strconv.Quote(kid))
}
