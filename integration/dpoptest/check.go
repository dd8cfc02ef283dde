package dpoptest

import (
	"crypto/sha256"
	"crypto/subtle"
	"encoding/base64"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"time"
)

// Reasons a proof is refused, as CheckError.Reason says them.
const (
	ReasonProof  = "malformed or unverifiable DPoP proof"
	ReasonType   = "proof typ is not dpop+jwt"
	ReasonHTM    = "proof htm is not the request method"
	ReasonHTU    = "proof htu is not the request URL"
	ReasonATH    = "proof ath is not the hash of the token"
	ReasonIAT    = "proof iat outside the window"
	ReasonReplay = "proof jti replayed"
	ReasonNonce  = "proof nonce missing or stale"
)

// CheckError is a refused proof: Reason is one of the Reason constants,
// Detail says more (never the proof or the token).
type CheckError struct {
	// Reason is one of the Reason constants.
	Reason string
	// Detail says more, never the proof or the token.
	Detail string
}

// Error is the reason and the detail.
func (e *CheckError) Error() string {
	if e.Detail == "" {
		return e.Reason
	}
	return e.Reason + ": " + e.Detail
}

// Want is what a proof must match: the request as the server received it.
type Want struct {
	// Method is the request's method (htm).
	Method string
	// URL is the request's URL (htu; RFC 9449 §4.3: scheme and host
	// without regard to case, a default port the same as none, the path
	// exactly; an htu with a query or fragment is refused).
	URL string
	// AccessToken, when not empty, is the token the request presents: the
	// proof's ath must be its hash. Empty at a token endpoint.
	AccessToken string
	// Nonce, when set, reports whether the proof's nonce is one the server
	// accepts now (ReasonNonce otherwise). nil: no nonce demanded.
	Nonce func(nonce string) bool
}

// Checker checks DPoP proofs as a server does (RFC 9449 §4.3): Verify,
// then jti, htm, htu, iat within Window of now, ath, the nonce, and a jti
// not seen before from the same key (JTIs). Safe for concurrent use.
type Checker struct {
	// Window bounds |now - iat|. Default one minute.
	Window time.Duration
	// Now is the clock. Default time.Now.
	Now func() time.Time
	// JTIs remembers the proofs' jtis, until their iat + Window; nil: the
	// Checker's own.
	JTIs *JTIs

	own JTIs
}

// Check verifies proof, the request's one DPoP header value, against
// want, and returns its header and claims. A refusal is a *CheckError.
func (c *Checker) Check(proof string, want Want) (Proof, error) {
	p, err := Verify(proof)
	if err != nil {
		return Proof{}, err
	}
	window, now := c.Window, time.Now()
	if window == 0 {
		window = time.Minute
	}
	if c.Now != nil {
		now = c.Now()
	}
	switch {
	case p.JTI == "":
		return Proof{}, &CheckError{ReasonProof, "no jti"}
	case p.HTM != want.Method:
		return Proof{}, &CheckError{ReasonHTM, p.HTM + " for " + want.Method}
	case !SameURL(p.HTU, want.URL):
		return Proof{}, &CheckError{ReasonHTU, p.HTU + " for " + want.URL}
	}
	if d := now.Sub(time.Unix(p.IAT, 0)); d > window || d < -window {
		return Proof{}, &CheckError{ReasonIAT, "iat " + d.String() + " from now"}
	}
	if want.AccessToken != "" {
		sum := sha256.Sum256([]byte(want.AccessToken))
		if subtle.ConstantTimeCompare([]byte(p.ATH), []byte(base64.RawURLEncoding.EncodeToString(sum[:]))) != 1 {
			return Proof{}, &CheckError{ReasonATH, ""}
		}
	}
	if want.Nonce != nil && !want.Nonce(p.Nonce) {
		return Proof{}, &CheckError{ReasonNonce, "nonce " + strconv.Quote(p.Nonce)}
	}
	jtis := c.JTIs
	if jtis == nil {
		jtis = &c.own
	}
	if !jtis.Remember("dpop\x00"+p.JKT+"\x00"+p.JTI, time.Unix(p.IAT, 0).Add(window), now) {
		return Proof{}, &CheckError{ReasonReplay, "jti " + strconv.Quote(p.JTI)}
	}
	return p, nil
}

// SameURL reports whether a proof's htu names the URL received (RFC 9449
// §4.3): scheme and host without regard to case, a default port the same
// as none, the path exactly. An htu with a query or fragment is refused:
// htu is the URI without them (§4.2).
func SameURL(htu, received string) bool {
	a, err1 := url.Parse(htu)
	b, err2 := url.Parse(received)
	if err1 != nil || err2 != nil || a.RawQuery != "" || a.ForceQuery || a.Fragment != "" {
		return false
	}
	return strings.EqualFold(a.Scheme, b.Scheme) && hostPort(a) == hostPort(b) && a.EscapedPath() == b.EscapedPath()
}

// hostPort is u's host in lower case with its port, the scheme's default
// port made explicit.
func hostPort(u *url.URL) string {
	port := u.Port()
	if port == "" {
		switch strings.ToLower(u.Scheme) {
		case "http":
			port = "80"
		case "https":
			port = "443"
		}
	}
	return strings.ToLower(u.Hostname()) + ":" + port
}

// jtiSweep is how often JTIs drops what it no longer needs.
const jtiSweep = time.Minute

// JTIs remembers one-time identifiers (proof or assertion jtis) until
// they expire. Expired ones are dropped at most once per jtiSweep (one
// scan then), not on every insert. The zero value is ready; safe for
// concurrent use.
type JTIs struct {
	mu        sync.Mutex
	until     map[string]time.Time
	nextSweep time.Time
}

// Remember records key, valid until until, at now; false when key was
// recorded before and has not expired: a replay.
func (j *JTIs) Remember(key string, until, now time.Time) bool {
	j.mu.Lock()
	defer j.mu.Unlock()
	if u, seen := j.until[key]; seen && now.Before(u) {
		return false
	}
	if j.until == nil {
		j.until = map[string]time.Time{}
	}
	if !now.Before(j.nextSweep) {
		for k, u := range j.until {
			if !now.Before(u) {
				delete(j.until, k)
			}
		}
		j.nextSweep = now.Add(jtiSweep)
	}
	j.until[key] = until
	return true
}

// Len is the number of identifiers held (expired ones not yet swept
// included).
func (j *JTIs) Len() int {
	j.mu.Lock()
	defer j.mu.Unlock()
	return len(j.until)
}
