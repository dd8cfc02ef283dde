package dpop

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"strings"
	"time"
)

// Transport returns a RoundTripper for a provider's token and PAR
// endpoints: each request it sends carries a fresh proof in the DPoP
// header (htm and htu of that request, the origin's remembered nonce), and
// the DPoP-Nonce of every answer is remembered for the origin. When the
// server answers with a nonce challenge (NonceChallenge: 400 from a token
// endpoint, 401 from a resource server, error use_dpop_nonce with a
// DPoP-Nonce header), onChallenge is called (when not nil) and the request
// is sent once more with a new proof carrying the nonce, its body replayed
// with GetBody; a request whose body cannot be replayed gets the challenge
// back (the nonce is remembered for the next one). base nil is
// http.DefaultTransport.
func Transport(base http.RoundTripper, k *Key, onChallenge func()) http.RoundTripper {
	if base == nil {
		base = http.DefaultTransport
	}
	return &transport{base: base, key: k, onChallenge: onChallenge, now: time.Now}
}

type transport struct {
	base        http.RoundTripper
	key         *Key
	onChallenge func()
	now         func() time.Time
}

// RoundTrip sends req with a proof, and once more on a nonce challenge.
func (t *transport) RoundTrip(req *http.Request) (*http.Response, error) {
	origin := Origin(req.URL)
	resp, err := t.send(req, req.Body, origin)
	if err != nil {
		return nil, err
	}
	if _, ok := NonceChallenge(resp); !ok {
		return resp, nil
	}
	body, ok := replay(req)
	if !ok {
		return resp, nil
	}
	if t.onChallenge != nil {
		t.onChallenge()
	}
	io.Copy(io.Discard, io.LimitReader(resp.Body, maxErrorBody))
	resp.Body.Close()
	return t.send(req, body, origin)
}

// send sends a copy of req with body and a fresh proof, and remembers the
// answer's nonce.
func (t *transport) send(req *http.Request, body io.ReadCloser, origin string) (*http.Response, error) {
	proof, err := t.key.Proof(req.Method, HTU(req.URL), "", t.key.Nonce(origin), t.now())
	if err != nil {
		if body != nil {
			body.Close()
		}
		return nil, err
	}
	r := req.Clone(req.Context())
	r.Body = body
	r.Header.Set("DPoP", proof)
	resp, err := t.base.RoundTrip(r)
	if err != nil {
		return nil, err
	}
	if n := resp.Header.Get("DPoP-Nonce"); n != "" {
		t.key.SetNonce(origin, n)
	}
	return resp, nil
}

// replay returns a fresh copy of req's body for a second attempt; false
// when it cannot be had.
func replay(req *http.Request) (io.ReadCloser, bool) {
	if req.Body == nil || req.Body == http.NoBody {
		return req.Body, true
	}
	if req.GetBody == nil {
		return nil, false
	}
	b, err := req.GetBody()
	return b, err == nil
}

// maxErrorBody bounds what is read of an error answer's body.
const maxErrorBody = 64 << 10

// NonceChallenge reports whether resp asks for a proof with the server's
// nonce (RFC 9449 §8, §9): a DPoP-Nonce header with a valid nonce, and
// either 401 with a WWW-Authenticate challenge naming use_dpop_nonce (a
// resource server) or 400 with the JSON error use_dpop_nonce (a token or
// PAR endpoint). It returns the nonce. For a 400 it reads the start of the
// body and puts it back, so the caller still reads the whole body.
func NonceChallenge(resp *http.Response) (string, bool) {
	nonce := resp.Header.Get("DPoP-Nonce")
	if !checkNonce(nonce) {
		return "", false
	}
	switch resp.StatusCode {
	case http.StatusUnauthorized:
		for _, v := range resp.Header.Values("WWW-Authenticate") {
			if strings.Contains(v, "use_dpop_nonce") {
				return nonce, true
			}
		}
	case http.StatusBadRequest:
		if resp.Body == nil {
			return "", false
		}
		head, err := io.ReadAll(io.LimitReader(resp.Body, maxErrorBody))
		resp.Body = readCloser{io.MultiReader(bytes.NewReader(head), resp.Body), resp.Body}
		var e struct {
			Error string `json:"error"`
		}
		if err == nil && json.Unmarshal(head, &e) == nil && e.Error == "use_dpop_nonce" {
			return nonce, true
		}
	}
	return "", false
}

// readCloser reads from one reader and closes another.
type readCloser struct {
	io.Reader
	io.Closer
}
