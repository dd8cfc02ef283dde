package oauth

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// TestAnswersOverTheLimit: an answer whose body is over
// httpclient.MaxResponseBytes, from the token, PAR or revocation endpoint
// or the discovery document, fails with an error that says so (the
// endpoint, its host, the limit, what to check), never as a document
// that is not JSON; a 429 or 5xx keeps its status and Retry-After, a 404
// of the token endpoint makes the endpoints discovered again, and a 2xx
// revocation succeeds.
func TestAnswersOverTheLimit(t *testing.T) {
	big := `{"access_token":"` + strings.Repeat("a", httpclient.MaxResponseBytes) + `","token_type":"Bearer","request_uri":"urn:x"}`
	limit := fmt.Sprintf("over %d bytes", httpclient.MaxResponseBytes)
	// answer writes the big body with status at path, and a discovery
	// document (with a PAR endpoint) at the well-known path unless path
	// is a well-known one (then the other answers 404).
	answer := func(t *testing.T, path string, status int, header http.Header) *httptest.Server {
		var srv *httptest.Server
		srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/.well-known/openid-configuration" && !strings.HasPrefix(path, "/.well-known/") {
				w.Header().Set("Content-Type", "application/json")
				fmt.Fprintf(w, `{"issuer":%q,"authorization_endpoint":%q,"token_endpoint":%q,"jwks_uri":%q,"pushed_authorization_request_endpoint":%q}`,
					srv.URL, srv.URL+"/authorize", srv.URL+"/token", srv.URL+"/jwks", srv.URL+"/par")
				return
			}
			if r.URL.Path != path {
				http.NotFound(w, r)
				return
			}
			for k, v := range header {
				w.Header()[k] = v
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(status)
			fmt.Fprint(w, big)
		}))
		t.Cleanup(srv.Close)
		return srv
	}
	token := func(cfg Config) error {
		cfg.ClientID, cfg.ClientSecret, cfg.Now = "id", secretValue, newClock().Now
		src, err := NewClientCredentials(cfg)
		if err != nil {
			t.Fatal(err)
		}
		_, err = src.Token(context.Background(), broker.Request{Merchant: "m"})
		if c := src.Classify(err); err != nil && c != broker.DefaultClass(err) {
			t.Errorf("class %d, want the default class of the error, %d", c, broker.DefaultClass(err))
		}
		return err
	}
	revoke := func(srv *httptest.Server) error {
		src, err := NewClientCredentials(Config{TokenURL: srv.URL + "/token", RevocationURL: srv.URL + "/revoke", ClientID: "id", ClientSecret: secretValue})
		if err != nil {
			t.Fatal(err)
		}
		return src.Revoke(context.Background(), "at-1", "access_token")
	}
	par := func(srv *httptest.Server) error {
		_, flow := newFlow(t, Config{Name: "bank", Issuer: srv.URL, ClientID: "bank-client", ClientSecret: secretValue}, &MemoryStore{},
			AuthCodeConfig{RedirectURIs: []string{callbackURL}, PAR: true}, &Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
		_, _, err := startLink(t, flow, "acme")
		return err
	}
	for _, tc := range []struct {
		name   string
		path   string
		status int
		header http.Header
		call   func(srv *httptest.Server) error
		code   string // the *broker.APIError's code; "" for another error
		host   bool   // the message names the server's host
		retry  time.Duration
		temp   bool
		want   []string // in the message
		// consentCode is the *ConsentError's Code; "" when not checked.
		consentCode string
		// permanent: the error is a *DiscoveryError that is not
		// transient (a *DiscoveryError is transient otherwise).
		permanent bool
	}{
		{name: "token endpoint 200", path: "/token", status: 200, code: "response_too_large", host: true,
			call: func(srv *httptest.Server) error { return token(Config{TokenURL: srv.URL + "/token"}) },
			want: []string{"oauth2 token endpoint", limit, "the limit of an answer the token broker reads", "check that the configured URL is the server's endpoint"}},
		{name: "token endpoint 400", path: "/token", status: 400, code: "response_too_large", host: true,
			call: func(srv *httptest.Server) error { return token(Config{TokenURL: srv.URL + "/token"}) },
			want: []string{"oauth2 token endpoint", limit}},
		{name: "token endpoint 503 keeps its status and Retry-After", path: "/token", status: 503, header: http.Header{"Retry-After": {"7"}},
			code: "response_too_large", host: true, retry: 7 * time.Second, temp: true,
			call: func(srv *httptest.Server) error { return token(Config{TokenURL: srv.URL + "/token"}) },
			want: []string{"answered 503", "oauth2 token endpoint", limit}},
		{name: "token endpoint 429 keeps its status and Retry-After", path: "/token", status: 429, header: http.Header{"Retry-After": {"9"}},
			code: "response_too_large", host: true, retry: 9 * time.Second, temp: true,
			call: func(srv *httptest.Server) error { return token(Config{TokenURL: srv.URL + "/token"}) },
			want: []string{"answered 429", "oauth2 token endpoint", limit}},
		{name: "discovered token endpoint 200", path: "/token", status: 200, code: "response_too_large", host: true,
			call: func(srv *httptest.Server) error { return token(Config{Issuer: srv.URL}) },
			want: []string{"oauth2 token endpoint", limit}},
		{name: "discovered token endpoint 404", path: "/token", status: 404, code: "response_too_large", host: true,
			call: func(srv *httptest.Server) error {
				src, err := NewClientCredentials(Config{Issuer: srv.URL, ClientID: "id", ClientSecret: secretValue})
				if err != nil {
					t.Fatal(err)
				}
				_, err = src.Token(context.Background(), broker.Request{Merchant: "m"})
				if src.ep.cached() != nil {
					t.Error("the endpoints are still cached after a 404: the token endpoint may have moved")
				}
				return err
			},
			want: []string{"oauth2 token endpoint", limit}},
		{name: "revocation endpoint 400", path: "/revoke", status: 400, code: "response_too_large", host: true, call: revoke,
			want: []string{"oauth2 revocation endpoint", limit}},
		// A document over the limit is wrong as it is: the consent
		// callback spends its state; the token API's failure policy
		// counts it as the provider's failure, temporary, as any failed
		// discovery.
		{name: "discovery document", path: "/.well-known/openid-configuration", status: 200, temp: true, host: true, permanent: true,
			call: func(srv *httptest.Server) error { return token(Config{Issuer: srv.URL}) },
			want: []string{"oauth2 discovery of issuer", limit, "the limit of an answer the token broker reads", "(status 200)"}},
		{name: "discovery document 503", path: "/.well-known/openid-configuration", status: 503, temp: true, host: true,
			call: func(srv *httptest.Server) error { return token(Config{Issuer: srv.URL}) },
			want: []string{"oauth2 discovery of issuer", limit, "(status 503)"}},
		// Metadata over the limit is not a failure the next call may
		// not meet: the consent callback must not offer a retry.
		{name: "RFC 8414 metadata", path: "/.well-known/oauth-authorization-server", status: 200, temp: true, host: true, permanent: true,
			call: func(srv *httptest.Server) error { return token(Config{Issuer: srv.URL}) },
			want: []string{"oauth2 discovery of issuer", limit, "the limit of an answer the token broker reads", "(status 200)"}},
		// As the OpenID discovery document's and the token endpoint's:
		// its class follows its status.
		{name: "RFC 8414 metadata 503", path: "/.well-known/oauth-authorization-server", status: 503, temp: true, host: true,
			call: func(srv *httptest.Server) error { return token(Config{Issuer: srv.URL}) },
			want: []string{"oauth2 discovery of issuer", limit, "(status 503)"}},
		{name: "PAR endpoint 201", path: "/par", status: 201, code: "response_too_large", host: true, call: par,
			want: []string{"PAR endpoint", limit}},
		// A refusal whose error code was in the body not read: its code
		// is unknown, with a hint about the size, not the provider's.
		{name: "PAR endpoint 400", path: "/par", status: 400, code: "response_too_large", host: true, call: par,
			consentCode: "unknown",
			want:        []string{"PAR endpoint", limit, "check that par_url (or the discovery document's pushed_authorization_request_endpoint) is the provider's PAR endpoint"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			srv := answer(t, tc.path, tc.status, tc.header)
			err := tc.call(srv)
			if err == nil {
				t.Fatal("no error")
			}
			msg := err.Error()
			want := tc.want
			if tc.host {
				want = append(want, httpclient.Host(srv.URL))
			}
			for _, w := range want {
				if !strings.Contains(msg, w) {
					t.Errorf("error %q does not say %q", msg, w)
				}
			}
			if ce := (*ConsentError)(nil); tc.consentCode != "" && (!errors.As(err, &ce) || ce.Code != tc.consentCode) {
				t.Errorf("err %v, want a *ConsentError of code %q", err, tc.consentCode)
			}
			for _, bad := range []string{"not a JSON", "decode", "unexpected end", "aaaaaaaa", "check the client's registration"} {
				if strings.Contains(msg, bad) {
					t.Errorf("error %q says %q", msg, bad)
				}
			}
			if de := (*DiscoveryError)(nil); tc.permanent && !errors.As(err, &de) || errors.As(err, &de) && permanent(err) != tc.permanent {
				t.Errorf("err %T %v, want a *DiscoveryError, transient %v", err, err, !tc.permanent)
			}
			if broker.IsTemporary(err) != tc.temp {
				t.Errorf("temporary %v, want %v: %v", broker.IsTemporary(err), tc.temp, err)
			}
			var ae *broker.APIError
			if tc.code == "" {
				return
			}
			if !errors.As(err, &ae) {
				t.Fatalf("err %T %v, want a *broker.APIError", err, err)
			}
			if ae.Code != tc.code || ae.StatusCode != tc.status || ae.RetryAfter != tc.retry {
				t.Errorf("APIError code %q status %d Retry-After %v, want %q %d %v", ae.Code, ae.StatusCode, ae.RetryAfter, tc.code, tc.status, tc.retry)
			}
			if tl := (*httpclient.TooLargeError)(nil); !errors.As(ae, &tl) || tl.Host != httpclient.Host(srv.URL) {
				t.Errorf("APIError %v: cause %v, want a *httpclient.TooLargeError for %s", ae, ae.Err, httpclient.Host(srv.URL))
			}
		})
	}
	// A revocation answered 2xx succeeded, whatever its body (RFC 7009
	// §2.2 reads the status).
	t.Run("revocation endpoint 200", func(t *testing.T) {
		if err := revoke(answer(t, "/revoke", 200, nil)); err != nil {
			t.Errorf("revocation answered 200 with a large body: %v, want success", err)
		}
	})
}
