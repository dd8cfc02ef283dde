// Package dpoptest checks DPoP proofs (RFC 9449) for tests, independently
// of package dpop: with go-jose, as a server would. Gate is the DPoP check
// of a test token endpoint or resource server. NewKey and KeyPEM make DPoP
// keys for tests.
package dpoptest

import (
	"context"
	"crypto"
	"crypto/ed25519"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"strconv"
	"strings"
	"sync/atomic"

	jose "github.com/go-jose/go-jose/v4"
)

// Proof is a verified proof's header and claims.
type Proof struct {
	// Alg is the header's alg.
	Alg string
	// JKT is the RFC 7638 SHA-256 thumbprint of the header's jwk.
	JKT string
	// JTI, HTM and HTU are the claims of those names.
	JTI, HTM, HTU string
	// IAT is the iat claim, in Unix seconds.
	IAT int64
	// ATH and Nonce are the ath and nonce claims.
	ATH, Nonce string
}

// Algs are the proof signature algorithms a proof may use that go-jose
// verifies; Verify also takes Ed25519 (Ed25519Alg).
func Algs() []jose.SignatureAlgorithm {
	return []jose.SignatureAlgorithm{jose.ES256, jose.PS256, jose.RS256, jose.EdDSA}
}

// Ed25519Alg is the fully-specified name of EdDSA with Ed25519 (RFC 9864),
// which go-jose does not know: Verify checks such proofs itself.
const Ed25519Alg = "Ed25519"

// Verify parses a compact DPoP proof, checks its header (typ dpop+jwt, an
// asymmetric alg of Algs or Ed25519Alg, a public jwk) and its signature
// with that jwk, and returns its header and claims. It checks no claim. A
// proof it cannot read is a *CheckError (ReasonProof, or ReasonType).
func Verify(proof string) (Proof, error) {
	h, payload, err := verifySignature(proof)
	if err != nil {
		return Proof{}, err
	}
	tp, err := h.JSONWebKey.Thumbprint(crypto.SHA256)
	if err != nil {
		return Proof{}, &CheckError{ReasonProof, "thumbprint: " + err.Error()}
	}
	var c struct {
		JTI   string          `json:"jti"`
		HTM   string          `json:"htm"`
		HTU   string          `json:"htu"`
		IAT   json.RawMessage `json:"iat"`
		ATH   string          `json:"ath"`
		Nonce string          `json:"nonce"`
	}
	if err := json.Unmarshal(payload, &c); err != nil {
		return Proof{}, &CheckError{ReasonProof, "claims: " + err.Error()}
	}
	iat, err := strconv.ParseInt(string(c.IAT), 10, 64)
	if err != nil {
		return Proof{}, &CheckError{ReasonProof, "iat " + strconv.Quote(string(c.IAT)) + " is not an integer"}
	}
	return Proof{Alg: h.Algorithm, JKT: base64.RawURLEncoding.EncodeToString(tp),
		JTI: c.JTI, HTM: c.HTM, HTU: c.HTU, IAT: iat, ATH: c.ATH, Nonce: c.Nonce}, nil
}

// verifySignature checks the header of a compact proof (typ dpop+jwt, a
// public jwk) and its signature with that jwk: with go-jose for the
// algorithms of Algs, with crypto/ed25519 for Ed25519Alg and an OKP
// Ed25519 jwk. It returns the header and the payload.
func verifySignature(proof string) (jose.Header, []byte, error) {
	var h jose.Header
	var payload []byte
	if alg, err := headerAlg(proof); err == nil && alg == Ed25519Alg {
		parts := strings.Split(proof, ".")
		if len(parts) != 3 {
			return h, nil, &CheckError{ReasonProof, "not a compact JWS"}
		}
		raw, err1 := base64.RawURLEncoding.DecodeString(parts[0])
		p, err2 := base64.RawURLEncoding.DecodeString(parts[1])
		sig, err3 := base64.RawURLEncoding.DecodeString(parts[2])
		var head struct {
			Typ string           `json:"typ"`
			JWK *jose.JSONWebKey `json:"jwk"`
		}
		if err := errors.Join(err1, err2, err3, json.Unmarshal(raw, &head)); err != nil {
			return h, nil, &CheckError{ReasonProof, "not a JWS: " + err.Error()}
		}
		h = jose.Header{Algorithm: Ed25519Alg, JSONWebKey: head.JWK, ExtraHeaders: map[jose.HeaderKey]any{"typ": head.Typ}}
		if err := checkHeader(h); err != nil {
			return h, nil, err
		}
		pub, ok := h.JSONWebKey.Key.(ed25519.PublicKey)
		if !ok {
			return h, nil, &CheckError{ReasonProof, fmt.Sprintf("alg Ed25519 with a %T jwk", h.JSONWebKey.Key)}
		}
		if !ed25519.Verify(pub, []byte(parts[0]+"."+parts[1]), sig) {
			return h, nil, &CheckError{ReasonProof, "signature: Ed25519 verification failed"}
		}
		return h, p, nil
	}
	jws, err := jose.ParseSignedCompact(proof, Algs())
	if err != nil {
		return h, nil, &CheckError{ReasonProof, "not a JWS: " + err.Error()}
	}
	h = jws.Signatures[0].Protected
	if err := checkHeader(h); err != nil {
		return h, nil, err
	}
	payload, err = jws.Verify(h.JSONWebKey)
	if err != nil {
		return h, nil, &CheckError{ReasonProof, "signature: " + err.Error()}
	}
	return h, payload, nil
}

// headerAlg returns the alg of a compact JWS's header, unverified.
func headerAlg(proof string) (string, error) {
	head, _, _ := strings.Cut(proof, ".")
	raw, err := base64.RawURLEncoding.DecodeString(head)
	if err != nil {
		return "", err
	}
	var h struct {
		Alg string `json:"alg"`
	}
	err = json.Unmarshal(raw, &h)
	return h.Alg, err
}

// checkHeader checks a proof header's typ (dpop+jwt) and jwk (public,
// valid).
func checkHeader(h jose.Header) error {
	if typ, _ := h.ExtraHeaders["typ"].(string); typ != "dpop+jwt" {
		return &CheckError{ReasonType, "typ " + strconv.Quote(typ)}
	}
	if h.JSONWebKey == nil || !h.JSONWebKey.IsPublic() || !h.JSONWebKey.Valid() {
		return &CheckError{ReasonProof, "no public jwk in the header"}
	}
	return nil
}

// Gate is an http.Handler that lets a request through to Next only with a
// valid DPoP proof for it (Checker): signature, htm the request's method,
// htu "http://" (or "https://") + Host + path (as sent, escaped), iat
// within a minute of now, a jti not seen before, and when Nonce is set
// that nonce. A request with a proof without the nonce gets a nonce
// challenge: 400 {"error": "use_dpop_nonce"} (a token endpoint) or, with
// ResourceServer, 401 with WWW-Authenticate: DPoP error="use_dpop_nonce".
// Every answer carries the DPoP-Nonce header when Nonce is set. Next finds
// the proof with ProofFrom.
type Gate struct {
	// Next serves the requests that pass.
	Next http.Handler
	// Nonce is the nonce demanded, "" for none.
	Nonce string
	// ResourceServer answers as a resource server (401) rather than a
	// token endpoint (400).
	ResourceServer bool

	// Challenges counts nonce challenges sent; Refused other refusals.
	Challenges, Refused atomic.Int64

	checker Checker
}

type proofKey struct{}

// ProofFrom returns the proof Gate verified for the request.
func ProofFrom(ctx context.Context) (Proof, bool) {
	p, ok := ctx.Value(proofKey{}).(Proof)
	return p, ok
}

// ServeHTTP checks the proof.
func (g *Gate) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	if g.Nonce != "" {
		w.Header().Set("DPoP-Nonce", g.Nonce)
	}
	p, err := g.check(r)
	var ce *CheckError
	switch {
	case errors.As(err, &ce) && ce.Reason == ReasonNonce:
		g.Challenges.Add(1)
		if g.ResourceServer {
			w.Header().Set("WWW-Authenticate", `DPoP error="use_dpop_nonce", error_description="Resource server requires nonce in DPoP proof"`)
			w.WriteHeader(http.StatusUnauthorized)
			return
		}
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprint(w, `{"error":"use_dpop_nonce","error_description":"Authorization server requires nonce in DPoP proof"}`)
		return
	case err != nil:
		g.Refused.Add(1)
		w.Header().Set("Content-Type", "application/json")
		w.WriteHeader(http.StatusBadRequest)
		json.NewEncoder(w).Encode(map[string]string{"error": "invalid_dpop_proof", "error_description": err.Error()})
		return
	}
	g.Next.ServeHTTP(w, r.WithContext(context.WithValue(r.Context(), proofKey{}, p)))
}

func (g *Gate) check(r *http.Request) (Proof, error) {
	vals := r.Header.Values("DPoP")
	if len(vals) != 1 {
		return Proof{}, fmt.Errorf("%d DPoP headers, want 1", len(vals))
	}
	scheme := "http://"
	if r.TLS != nil {
		scheme = "https://"
	}
	want := Want{Method: r.Method, URL: scheme + r.Host + r.URL.EscapedPath()}
	if g.Nonce != "" {
		want.Nonce = func(n string) bool { return n == g.Nonce }
	}
	return g.checker.Check(vals[0], want)
}
