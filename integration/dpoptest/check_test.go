package dpoptest

import (
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
)

// TestJTIs: a key is refused until it expires; expired keys are dropped
// at most once per jtiSweep, not on every insert.
func TestJTIs(t *testing.T) {
	var j JTIs
	t0 := time.Unix(1_800_000_000, 0)
	if !j.Remember("a", t0.Add(time.Second), t0) || j.Remember("a", t0.Add(time.Second), t0) {
		t.Fatal("a new key must be remembered and its replay refused")
	}
	// A sweep ran at t0: the next is due at t0 + jtiSweep.
	for i, k := range []string{"b", "c", "d"} {
		now := t0.Add(2*time.Second + time.Duration(i)*time.Second)
		if !j.Remember(k, now.Add(time.Second), now) {
			t.Fatalf("%s refused", k)
		}
	}
	if n := j.Len(); n != 4 {
		t.Errorf("%d keys held within the sweep interval, want 4 (no scan per insert)", n)
	}
	if !j.Remember("a", t0.Add(time.Hour), t0.Add(2*time.Second)) {
		t.Error("an expired key refused")
	}
	later := t0.Add(jtiSweep)
	if !j.Remember("e", later.Add(time.Second), later) {
		t.Fatal("e refused")
	}
	if n := j.Len(); n != 2 { // "a" (until t0+1h) and "e"
		t.Errorf("%d keys held after the sweep, want 2", n)
	}
}

// TestCheckerReasons: each claim the Checker checks refuses with its
// reason; a proof passes once.
func TestCheckerReasons(t *testing.T) {
	k := NewKey(t)
	now := time.Unix(1_800_000_000, 0)
	c := &Checker{Now: func() time.Time { return now }}
	proof := func(htu, ath, nonce string, at time.Time) string {
		p, err := k.Proof("GET", htu, ath, nonce, at)
		if err != nil {
			t.Fatal(err)
		}
		return p
	}
	want := Want{Method: "GET", URL: "https://RS.test:443/a", AccessToken: "tok"}
	ok := proof("https://rs.test/a", dpop.ATH("tok"), "", now)
	for _, tc := range []struct {
		name, proof string
		want        Want
		reason      string
	}{
		{"good", ok, want, ""},
		{"replayed", ok, want, ReasonReplay},
		{"not a JWS", "x.y", want, ReasonProof},
		{"htm", proof("https://rs.test/a", dpop.ATH("tok"), "", now), Want{Method: "POST", URL: want.URL, AccessToken: "tok"}, ReasonHTM},
		{"htu path", proof("https://rs.test/b", dpop.ATH("tok"), "", now), want, ReasonHTU},
		{"htu with a query", proof("https://rs.test/a?x=1", dpop.ATH("tok"), "", now), want, ReasonHTU},
		{"iat old", proof("https://rs.test/a", dpop.ATH("tok"), "", now.Add(-2*time.Minute)), want, ReasonIAT},
		{"ath", proof("https://rs.test/a", dpop.ATH("other"), "", now), want, ReasonATH},
		{"nonce", proof("https://rs.test/a", dpop.ATH("tok"), "n-1", now),
			Want{Method: "GET", URL: want.URL, AccessToken: "tok", Nonce: func(n string) bool { return n == "n-2" }}, ReasonNonce},
	} {
		_, err := c.Check(tc.proof, tc.want)
		var ce *CheckError
		switch {
		case tc.reason == "" && err != nil:
			t.Errorf("%s: %v", tc.name, err)
		case tc.reason != "" && (!errors.As(err, &ce) || ce.Reason != tc.reason):
			t.Errorf("%s: %v, want %q", tc.name, err, tc.reason)
		}
	}
}

// TestGatePath: the Gate checks htu against the path as the request
// sent it, percent-encoding included: a proof for /a%2Fb passes.
func TestGatePath(t *testing.T) {
	gate := &Gate{Next: http.HandlerFunc(func(http.ResponseWriter, *http.Request) {})}
	srv := httptest.NewServer(gate)
	defer srv.Close()
	client := &http.Client{Transport: dpop.Transport(srv.Client().Transport, NewKey(t))}
	for _, path := range []string{"/a/b", "/a%2Fb", "/c%20d"} {
		resp, err := client.Get(srv.URL + path)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %d, want 200 (refusals %d)", path, resp.StatusCode, gate.Refused.Load())
		}
	}
}

// TestVerifyEd25519: a proof with alg Ed25519 (RFC 9864), which go-jose
// does not know, verifies with its Ed25519 jwk; a changed claim, or an
// Ed25519 label on another key's proof, does not.
func TestVerifyEd25519(t *testing.T) {
	_, priv, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	k, err := dpop.NewKey(priv, dpop.Ed25519)
	if err != nil {
		t.Fatal(err)
	}
	proof, err := k.Proof("POST", "https://as.example/token", "", "n-1", time.Unix(1_800_000_000, 0))
	if err != nil {
		t.Fatal(err)
	}
	p, err := Verify(proof)
	if err != nil || p.Alg != Ed25519Alg || p.JKT != k.Thumbprint() || p.HTU != "https://as.example/token" || p.Nonce != "n-1" {
		t.Fatalf("Verify: %+v, %v", p, err)
	}
	parts := strings.Split(proof, ".")
	claims, _ := base64.RawURLEncoding.DecodeString(parts[1])
	changed := parts[0] + "." + base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(claims), "POST", "GET!", 1))) + "." + parts[2]
	ecPriv, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	ec, err := dpop.NewKey(ecPriv, "")
	if err != nil {
		t.Fatal(err)
	}
	ecProof, err := ec.Proof("POST", "https://as.example/token", "", "", time.Unix(1_800_000_000, 0))
	if err != nil {
		t.Fatal(err)
	}
	ecParts := strings.Split(ecProof, ".")
	ecHead, _ := base64.RawURLEncoding.DecodeString(ecParts[0])
	relabelled := base64.RawURLEncoding.EncodeToString([]byte(strings.Replace(string(ecHead), `"ES256"`, `"Ed25519"`, 1))) + "." + ecParts[1] + "." + ecParts[2]
	for name, bad := range map[string]string{"changed claim": changed, "EC key labelled Ed25519": relabelled} {
		var ce *CheckError
		if _, err := Verify(bad); !errors.As(err, &ce) || ce.Reason != ReasonProof {
			t.Errorf("%s: %v, want a proof refusal", name, err)
		}
	}
}
