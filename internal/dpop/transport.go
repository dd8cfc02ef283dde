package dpop

import (
	"net/http"
	"time"
)

// Transport returns a RoundTripper for a provider's token and PAR
// endpoints: each request carries a fresh proof in the DPoP header, with
// the nonce remembered for the authorization server at its origin, and
// the DPoP-Nonce of every answer is remembered (or its refusal:
// Key.RefusedNonce). It does not answer a nonce challenge itself: the
// request may hold single-use credentials (a private_key_jwt assertion),
// so the caller builds it again. base nil is http.DefaultTransport.
func Transport(base http.RoundTripper, k *Key) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &transport{base: base, key: k}
}

type transport struct {
	base http.RoundTripper
	key  *Key
}

// RoundTrip sends a copy of req with a proof and remembers the answer's
// nonce.
func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	proof, err := t.key.Proof(req.Method, HTU(req.URL), "", t.key.Nonce(AuthorizationServer, req.URL), time.Now())
	if err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	r := req.Clone(req.Context())
	r.Header.Set("DPoP", proof)
	resp, err := t.base.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	if n := resp.Header.Get("DPoP-Nonce"); n != "" {
		// A refused nonce is not an error of this answer, which may
		// carry a token: the key records it (RefusedNonce).
		_ = t.key.SetNonce(AuthorizationServer, req.URL, n)
	}
	return resp, nil
}
