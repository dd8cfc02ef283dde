package sandbox

import (
	"crypto/hmac"
	"crypto/sha256"
	"encoding/base64"
	"encoding/binary"
	"errors"
	"fmt"
	"net/http"
	"strings"
	"time"

	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
)

// DPoP (RFC 9449) at the bank and the echo upstream. A token request with
// a DPoP header gets a DPoP-bound access token (token_type DPoP, cnf.jkt
// the proof key's thumbprint); a client with BankClient.DPoP must send one.
// The echo upstream accepts such a token only as "Authorization: DPoP"
// with a proof of the same key for that request (htm, htu, ath). A proof's
// htu is the request's target URI without query (RFC 9449 section 4.3):
// at the token endpoint the bank's token_endpoint (below Config.BankIssuer
// when set), at the echo scheme://Host/path of the request as it arrives,
// Host header included (behind a reverse proxy that keeps the client's
// Host, that Host). Its iat must be within dpopWindow of now, and its jti
// is refused the second time. With Config.DPoPNonce both demand the
// sandbox's DPoP-Nonce (use_dpop_nonce).

const (
	// dpopWindow bounds |now - iat| of a proof; a jti is remembered that
	// long after its iat.
	dpopWindow = 2 * time.Minute
	// dpopNonceStep is how long a nonce is the current one; the previous
	// one is accepted too.
	dpopNonceStep = time.Minute
)

// dpopAlgNames are the names of the proof signature algorithms accepted
// (dpoptest.Algs).
func dpopAlgNames() []string {
	accepted := dpoptest.Algs()
	algs := make([]string, len(accepted))
	for i, a := range accepted {
		algs[i] = string(a)
	}
	return algs
}

// dpopDiscovery adds the DPoP metadata (RFC 9449 section 5.1) to the
// bank's discovery document.
func dpopDiscovery(doc map[string]any) {
	doc["dpop_signing_alg_values_supported"] = dpopAlgNames()
}

// dpopError is a refused DPoP request: code is invalid_dpop_proof,
// use_dpop_nonce (the answer carries a fresh DPoP-Nonce) or, at the echo,
// invalid_token (a token presented against its binding).
type dpopError struct {
	code, desc string
}

func (e *dpopError) Error() string { return e.code + ": " + e.desc }

// checkDPoP verifies the request's DPoP proof for htu (and, when
// accessToken is not empty, its ath) with the shared proof check
// (dpoptest.Checker: signature, typ, jti, htm, htu, iat within dpopWindow,
// ath, the nonce with Config.DPoPNonce, jti replay) and returns the proof
// key's thumbprint; "" and nil when the request has no DPoP header.
func (s *Server) checkDPoP(r *http.Request, htu, accessToken string) (string, *dpopError) {
	proofs := r.Header.Values("DPoP")
	switch len(proofs) {
	case 0:
		return "", nil
	case 1:
	default:
		return "", &dpopError{"invalid_dpop_proof", "more than one DPoP header"}
	}
	want := dpoptest.Want{Method: r.Method, URL: htu, AccessToken: accessToken}
	if s.cfg.DPoPNonce {
		now := s.cfg.Now()
		want.Nonce = func(n string) bool { return s.validDPoPNonce(n, now) }
	}
	p, err := s.dpop.Check(proofs[0], want)
	var ce *dpoptest.CheckError
	switch {
	case errors.As(err, &ce) && ce.Reason == dpoptest.ReasonNonce:
		return "", &dpopError{"use_dpop_nonce", "the proof must carry the DPoP-Nonce the sandbox sends"}
	case err != nil:
		return "", &dpopError{"invalid_dpop_proof", err.Error()}
	}
	return p.JKT, nil
}

// dpopNonce is the nonce of the step that holds t: an HMAC of the step
// number with the server's key.
func (s *Server) dpopNonce(t time.Time) string {
	m := hmac.New(sha256.New, s.key)
	m.Write([]byte("dpop-nonce"))
	m.Write(binary.BigEndian.AppendUint64(nil, uint64(t.UnixNano()/int64(dpopNonceStep))))
	return base64.RawURLEncoding.EncodeToString(m.Sum(nil))
}

// validDPoPNonce reports whether nonce is the current or the previous
// step's nonce.
func (s *Server) validDPoPNonce(nonce string, now time.Time) bool {
	for _, t := range []time.Time{now, now.Add(-dpopNonceStep)} {
		if hmac.Equal([]byte(nonce), []byte(s.dpopNonce(t))) {
			return true
		}
	}
	return false
}

// tokenDPoP checks the DPoP proof of a token request of client c and
// returns its key thumbprint ("" without a proof, allowed unless c.DPoP);
// it writes the error answer and returns false when the proof is refused.
func (s *Server) tokenDPoP(w http.ResponseWriter, r *http.Request, c *bankClient) (string, bool) {
	if s.cfg.DPoPNonce {
		w.Header().Set("DPoP-Nonce", s.dpopNonce(s.cfg.Now()))
	}
	jkt, e := s.checkDPoP(r, s.bankIssuer(r)+bankTokenPath, "")
	switch {
	case e != nil:
		oauthError(w, http.StatusBadRequest, e.code, e.desc)
		return "", false
	case jkt == "" && c.DPoP:
		oauthError(w, http.StatusBadRequest, "invalid_dpop_proof", "this client's tokens are DPoP-bound: send a DPoP proof")
		return "", false
	}
	return jkt, true
}

// echoDPoP checks that the echo's request presents token t as its binding
// asks: a DPoP-bound token with "Authorization: DPoP" and a proof of its
// key for this request, a bearer token with "Authorization: Bearer". It
// records the outcome in a and returns the error to answer, if any. With
// Config.DPoPNonce, the answer to a request that presents a DPoP-bound
// token carries the current DPoP-Nonce.
func (s *Server) echoDPoP(w http.ResponseWriter, r *http.Request, scheme, cred string, t token, a *EchoAuth) *dpopError {
	a.JKT = t.jkt
	if s.cfg.DPoPNonce && t.jkt != "" {
		w.Header().Set("DPoP-Nonce", s.dpopNonce(s.cfg.Now()))
	}
	dpopScheme := strings.EqualFold(scheme, "DPoP")
	if t.jkt == "" {
		if dpopScheme {
			return &dpopError{"invalid_token", "a bearer token presented with the DPoP scheme"}
		}
		return nil
	}
	if !dpopScheme {
		return &dpopError{"invalid_token", "a DPoP-bound token presented as a bearer token"}
	}
	jkt, e := s.checkDPoP(r, requestOrigin(r)+r.URL.Path, cred)
	switch {
	case e != nil:
		return e
	case jkt == "":
		return &dpopError{"invalid_token", "a DPoP-bound token without a DPoP proof"}
	case jkt != t.jkt:
		return &dpopError{"invalid_token", "the proof's key is not the one the token is bound to"}
	}
	a.DPoP = true
	return nil
}

// dpopChallenge writes the echo's WWW-Authenticate for a refused DPoP
// request.
func dpopChallenge(w http.ResponseWriter, e *dpopError) {
	w.Header().Set("WWW-Authenticate", fmt.Sprintf(`DPoP algs="%s", error=%q, error_description=%q`, strings.Join(dpopAlgNames(), " "), e.code, e.desc))
}
