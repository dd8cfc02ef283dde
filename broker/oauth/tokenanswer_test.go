package oauth

import (
	"context"
	"errors"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestTokenAnswerSpellings: answers that other authorization servers send
// and RFC 6749 §5.1 allows are read: expires_in as a JSON number with a
// fraction or as a string of one (a fraction under one second is one
// second), an empty, null or infinite expires_in (missing), a JSON body
// labelled text/plain or form-encoded, and a JSON body behind a byte order
// mark.
func TestTokenAnswerSpellings(t *testing.T) {
	s := &stub{}
	srv := startStub(t, s)
	clock := newClock()
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", ClientID: "id", ClientSecret: secretValue,
		DefaultLifetime: 7 * time.Minute, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name, contentType, body string
		want                    time.Duration
	}{
		{"expires_in 3600.0", "", `{"access_token":"a1","token_type":"Bearer","expires_in":3600.0}`, time.Hour},
		{"expires_in 3599.7", "", `{"access_token":"a1","token_type":"Bearer","expires_in":3599.7}`, 3599 * time.Second},
		{`expires_in "3600.0"`, "", `{"access_token":"a1","token_type":"Bearer","expires_in":"3600.0"}`, time.Hour},
		{`expires_in ""`, "", `{"access_token":"a1","token_type":"Bearer","expires_in":""}`, 7 * time.Minute},
		{"expires_in null", "", `{"access_token":"a1","token_type":"Bearer","expires_in":null}`, 7 * time.Minute},
		{"expires_in 1e300", "", `{"access_token":"a1","token_type":"Bearer","expires_in":1e300}`, maxExpiresIn * time.Second},
		{"expires_in 0.4", "", `{"access_token":"a1","token_type":"Bearer","expires_in":0.4}`, time.Second},
		{`expires_in "0.5"`, "", `{"access_token":"a1","token_type":"Bearer","expires_in":"0.5"}`, time.Second},
		{`expires_in "Infinity"`, "", `{"access_token":"a1","token_type":"Bearer","expires_in":"Infinity"}`, 7 * time.Minute},
		{"expires_in 1e400", "", `{"access_token":"a1","token_type":"Bearer","expires_in":1e400}`, 7 * time.Minute},
		{"form expires_in inf", "application/x-www-form-urlencoded", `access_token=a1&token_type=bearer&expires_in=inf`, 7 * time.Minute},
		{"JSON as text/plain", "text/plain; charset=utf-8", `{"access_token":"a1","token_type":"Bearer","expires_in":60}`, time.Minute},
		{"byte order mark", "application/json", "\ufeff" + `{"access_token":"a1","token_type":"Bearer","expires_in":60}`, time.Minute},
		{"form as text/plain", "text/plain", `access_token=a1&token_type=bearer&expires_in=60`, time.Minute},
		{"JSON labelled form-encoded", "application/x-www-form-urlencoded", `{"access_token":"a1","token_type":"Bearer","expires_in":60}`, time.Minute},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s.mu.Lock()
			s.status, s.body, s.header = 200, tc.body, nil
			if tc.contentType != "" {
				s.header = http.Header{"Content-Type": {tc.contentType}}
			}
			s.mu.Unlock()
			tok, err := src.Token(context.Background(), broker.Request{Merchant: "m"})
			if err != nil {
				t.Fatal(err)
			}
			if tok.Value.Reveal() != "a1" || !tok.Expiry.Equal(clock.Now().Add(tc.want)) {
				t.Errorf("token %q expires in %s, want a1 in %s", tok.Value.Reveal(), tok.Expiry.Sub(clock.Now()), tc.want)
			}
		})
	}
}

// TestRevokeSuccessStatuses: a revocation endpoint that answers a 2xx
// other than 200 (204 No Content, 202 Accepted) has revoked the token, or
// does not know it: both are RFC 7009 successes.
func TestRevokeSuccessStatuses(t *testing.T) {
	s := &stub{}
	srv := startStub(t, s)
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", RevocationURL: srv.URL + "/revoke", ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	for _, status := range []int{http.StatusOK, http.StatusAccepted, http.StatusNoContent} {
		s.mu.Lock()
		s.status, s.body = status, ""
		s.mu.Unlock()
		if err := src.Revoke(context.Background(), "at-1", "access_token"); err != nil {
			t.Errorf("Revoke answered %d = %v, want success", status, err)
		}
	}
}

// TestBearerTypeCanonical: a bearer token_type in any case ("bearer",
// "BEARER", OneID's lower case) is cached as broker's "Bearer", as an
// absent one is, so that the cache keeps no per-token copy of the type.
func TestBearerTypeCanonical(t *testing.T) {
	s := &stub{}
	srv := startStub(t, s)
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	for _, typ := range []string{"bearer", "BEARER", "Bearer"} {
		s.mu.Lock()
		s.status, s.body = 200, `{"access_token":"a1","token_type":"`+typ+`","expires_in":60}`
		s.mu.Unlock()
		tok, err := src.Token(context.Background(), broker.Request{Merchant: "m"})
		if err != nil || tok.Type != "Bearer" {
			t.Errorf("token_type %q: Type %q, %v; want Bearer", typ, tok.Type, err)
		}
	}
}

// TestRefreshTokenWithSpace: a refresh token is 1*VSCHAR (RFC 6749
// Appendix A.17: spaces allowed) and only ever travels in a form body, so
// one with a space inside or at either end is stored when loaded and when
// the provider rotates to it, and sent form-encoded on the next refresh; a
// control character, non-ASCII or more than broker.MaxTokenBytes is
// refused.
func TestRefreshTokenWithSpace(t *testing.T) {
	s := &stub{status: 200, body: `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt NEW 2"}`}
	srv := startStub(t, s)
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: srv.URL + "/token", ClientID: "c", ClientSecret: secretValue, Now: newClock().Now}, &MemoryStore{})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	for _, tc := range []struct {
		rt string
		ok bool
	}{
		{"rt\t1", false}, {"rt-é", false}, {"rt\x00", false}, {strings.Repeat("r", broker.MaxTokenBytes+1), false},
		{" rt-1", true}, {"rt-1 ", true}, {strings.Repeat("r", broker.MaxTokenBytes), true}, {"rt OLD 1", true},
	} {
		if err := src.SetRefreshToken(ctx, "acme", broker.Secret(tc.rt)); (err == nil) != tc.ok {
			t.Errorf("SetRefreshToken(%.20q) = %v, want accepted %v", tc.rt, err, tc.ok)
		}
	}
	if _, err := src.Token(ctx, broker.Request{Merchant: "acme"}); err != nil {
		t.Fatalf("Token = %v", err)
	}
	if rt, err := src.Store().Load(ctx, src.StoreKey("acme")); err != nil || rt.Reveal() != "rt NEW 2" {
		t.Errorf("stored refresh token %s (%v), want the rotated one", rt.Fingerprint(), err)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if got := s.form.Get("refresh_token"); got != "rt OLD 1" {
		t.Errorf("refresh_token sent %q", got)
	}
}

// TestJWTExpiryBounded: without expires_in, the exp of a JWT access token
// is how long the token is kept, up to maxExpiresIn (as expires_in is
// bounded); an exp further away (in milliseconds, or centuries ahead) is
// not credible and the token gets the default lifetime, as one without
// exp does.
func TestJWTExpiryBounded(t *testing.T) {
	s := &stub{}
	srv := startStub(t, s)
	clock := newClock()
	now := clock.Now()
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", ClientID: "id", ClientSecret: secretValue,
		DefaultLifetime: 7 * time.Minute, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name      string
		exp, want time.Time
	}{
		{"exp in a year", now.Add(366 * 24 * time.Hour), now.Add(366 * 24 * time.Hour)},
		{"exp at the bound", now.Add(maxExpiresIn * time.Second), now.Add(maxExpiresIn * time.Second)},
		{"exp in milliseconds", time.Unix(now.Add(time.Hour).UnixMilli(), 0), now.Add(7 * time.Minute)},
		{"exp in the year 2300", time.Date(2300, 1, 1, 0, 0, 0, 0, time.UTC), now.Add(7 * time.Minute)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s.mu.Lock()
			s.status, s.header, s.body = 200, nil, `{"access_token":"`+testJWT(t, tc.exp)+`","token_type":"Bearer"}`
			s.mu.Unlock()
			tok, err := src.Token(context.Background(), broker.Request{Merchant: "m"})
			if err != nil {
				t.Fatal(err)
			}
			if !tok.Expiry.Equal(tc.want) {
				t.Errorf("expires in %s, want %s", tok.Expiry.Sub(now), tc.want.Sub(now))
			}
		})
	}
}

// TestRevokeRefusalSpellings: a revocation endpoint's error answer is read
// as a token endpoint's is (RFC 7009 §2.2.1 refers to RFC 6749 §5.2): a
// JSON body behind a byte order mark or labelled text/plain, or a
// form-encoded one, gives its error code.
func TestRevokeRefusalSpellings(t *testing.T) {
	s := &stub{}
	srv := startStub(t, s)
	src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", RevocationURL: srv.URL + "/revoke", ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ name, contentType, body string }{
		{"byte order mark", "application/json", "\ufeff" + `{"error":"invalid_client","error_description":"unknown client"}`},
		{"JSON as text/plain", "text/plain; charset=utf-8", `{"error":"invalid_client","error_description":"unknown client"}`},
		{"form-encoded", "application/x-www-form-urlencoded", `error=invalid_client&error_description=unknown+client`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s.mu.Lock()
			s.status, s.header, s.body = http.StatusUnauthorized, http.Header{"Content-Type": {tc.contentType}}, tc.body
			s.mu.Unlock()
			err := src.Revoke(context.Background(), "at-1", "access_token")
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.Code != "invalid_client" || !strings.Contains(ae.Description, "unknown client") {
				t.Errorf("Revoke = %v, want invalid_client: unknown client", err)
			}
		})
	}
}
