package oauth

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
)

// TestDiscoveryOfAnOAuthServer: an authorization server without OpenID
// discovery (its /.well-known/openid-configuration answers 404) is found
// by its RFC 8414 metadata, at /.well-known/oauth-authorization-server
// inserted before the issuer's path (without the issuer's trailing
// slash; at the root for an issuer without a path): its token endpoint
// serves the tokens, and the consent checks the iss of its authorization
// responses (RFC 9207), which a provider configured by token_url cannot.
// Metadata that names another issuer, a trailing slash included, is
// refused with what to set, and so is an issuer with neither document. An
// OpenID discovery that fails otherwise (5xx, 429) is not a reason to
// read the metadata: it is tried again; a metadata endpoint that fails so
// says to try again, not to check the issuer; a document without
// token_endpoint is named.
func TestDiscoveryOfAnOAuthServer(t *testing.T) {
	mux := http.NewServeMux()
	srv := httptest.NewServer(mux)
	t.Cleanup(srv.Close)
	var mu sync.Mutex
	var metadataReads []string // the paths of the RFC 8414 metadata requests
	metadata := func(issuer string) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) {
			mu.Lock()
			metadataReads = append(metadataReads, r.URL.Path)
			mu.Unlock()
			doc := map[string]any{"issuer": issuer, "authorization_endpoint": srv.URL + "/authorize",
				"token_endpoint": srv.URL + "/token", "revocation_endpoint": srv.URL + "/revoke",
				"authorization_response_iss_parameter_supported": true, "code_challenge_methods_supported": []string{"S256"}}
			if strings.HasSuffix(issuer, "/notoken") {
				delete(doc, "token_endpoint")
			}
			json.NewEncoder(w).Encode(doc)
		}
	}
	answer := func(status int) http.HandlerFunc {
		return func(w http.ResponseWriter, r *http.Request) { http.Error(w, "<html>down</html>", status) }
	}
	mux.HandleFunc("/.well-known/oauth-authorization-server", metadata(srv.URL))
	mux.HandleFunc("/.well-known/oauth-authorization-server/tenant", metadata(srv.URL+"/tenant"))
	mux.HandleFunc("/.well-known/oauth-authorization-server/slash", metadata(srv.URL+"/slash/"))
	mux.HandleFunc("/.well-known/oauth-authorization-server/trailing", metadata(srv.URL+"/trailing/"))
	mux.HandleFunc("/.well-known/oauth-authorization-server/notoken", metadata(srv.URL+"/notoken"))
	mux.HandleFunc("/.well-known/oauth-authorization-server/busy", metadata(srv.URL+"/busy"))
	mux.HandleFunc("/.well-known/oauth-authorization-server/limited", metadata(srv.URL+"/limited"))
	mux.HandleFunc("/.well-known/oauth-authorization-server/flaky", answer(http.StatusBadGateway))
	mux.HandleFunc("/.well-known/openid-configuration", http.NotFound)
	mux.HandleFunc("/busy/.well-known/openid-configuration", answer(http.StatusServiceUnavailable))
	mux.HandleFunc("/limited/.well-known/openid-configuration", answer(http.StatusTooManyRequests))
	mux.HandleFunc("/oidcnotoken/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL + "/oidcnotoken", "authorization_endpoint": srv.URL + "/authorize"})
	})
	mux.HandleFunc("/oidc/.well-known/openid-configuration", func(w http.ResponseWriter, r *http.Request) {
		json.NewEncoder(w).Encode(map[string]any{"issuer": srv.URL + "/oidc/", "authorization_endpoint": srv.URL + "/authorize", "token_endpoint": srv.URL + "/token"})
	})
	var codes []string // the codes exchanged
	mux.HandleFunc("/token", func(w http.ResponseWriter, r *http.Request) {
		r.ParseForm()
		if r.PostForm.Get("grant_type") == "authorization_code" {
			mu.Lock()
			codes = append(codes, r.PostForm.Get("code"))
			mu.Unlock()
		}
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprint(w, `{"access_token":"at-1","token_type":"Bearer","expires_in":60,"refresh_token":"rt-1"}`)
	})
	ctx := context.Background()
	issuer := srv.URL + "/tenant"

	cc, err := NewClientCredentials(Config{Issuer: issuer, ClientID: "c", ClientSecret: secretValue})
	if err != nil {
		t.Fatal(err)
	}
	if tok, err := cc.Token(ctx, broker.Request{Merchant: "m"}); err != nil || tok.Value.Reveal() != "at-1" {
		t.Fatalf("Token from the RFC 8414 token endpoint = %v", err)
	}

	_, flow := newFlow(t, Config{Name: "bank", Issuer: issuer, ClientID: "c", ClientSecret: secretValue}, &MemoryStore{}, AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"accounts"}})
	start := func() url.Values {
		t.Helper()
		authURL, _, err := startLink(t, flow, "acme")
		if err != nil {
			t.Fatalf("Start: %v", err)
		}
		a, _ := url.Parse(authURL)
		if a.Scheme+"://"+a.Host+a.Path != srv.URL+"/authorize" {
			t.Fatalf("authorization URL %s, want the metadata's authorization_endpoint", authURL)
		}
		return url.Values{"state": {a.Query().Get("state")}}
	}
	host := "cb.partner.example"
	q := start()
	q.Set("code", "code-without-iss")
	var ce *ConsentError
	if _, err := flow.Callback(ctx, host, q); !errors.As(err, &ce) || ce.Reason != ReasonWrongIssuer {
		t.Errorf("Callback without iss from a server that sends it = %v, want %s", err, ReasonWrongIssuer)
	}
	q = start()
	q.Set("code", "code-1")
	q.Set("iss", issuer)
	if res, err := flow.Callback(ctx, host, q); err != nil || res.Fingerprint == "" {
		t.Fatalf("Callback with the issuer's iss = %v", err)
	}
	mu.Lock()
	if strings.Join(codes, ",") != "code-1" {
		t.Errorf("codes exchanged %q, want only the one with the issuer's iss", codes)
	}
	mu.Unlock()

	for _, issuer := range []string{srv.URL, srv.URL + "/trailing/"} {
		src, err := NewClientCredentials(Config{Issuer: issuer, ClientID: "c", ClientSecret: secretValue})
		if err != nil {
			t.Fatal(err)
		}
		if tok, err := src.Token(ctx, broker.Request{Merchant: "m"}); err != nil || tok.Value.Reveal() != "at-1" {
			t.Errorf("Token of issuer %s, from its RFC 8414 metadata = %v", issuer, err)
		}
	}

	for _, tc := range []struct {
		name, issuer string
		want         []string // in the error
		not          []string // not in the error
	}{
		{"metadata naming the issuer with a trailing slash", srv.URL + "/slash", []string{`RFC 8414 metadata names issuer "` + srv.URL + `/slash/"`, "trailing slash"}, nil},
		{"discovery document naming the issuer with a trailing slash", srv.URL + "/oidc", []string{`OpenID discovery document names issuer "` + srv.URL + `/oidc/"`, "trailing slash"}, nil},
		{"neither document", srv.URL + "/nothing", []string{"openid-configuration answered 404", "oauth-authorization-server answered 404", "token_url"}, nil},
		{"OpenID discovery answers 503", srv.URL + "/busy", []string{"answered 503 to the OpenID discovery document request", "the next call tries again"}, []string{"token_url", "RFC 8414"}},
		{"OpenID discovery answers 429", srv.URL + "/limited", []string{"answered 429 to the OpenID discovery document request", "the next call tries again"}, []string{"token_url", "RFC 8414"}},
		{"RFC 8414 metadata answers 502", srv.URL + "/flaky", []string{"openid-configuration answered 404", "answered 502 to the RFC 8414 metadata request", "the next call tries again"}, []string{"check the issuer", "token_url"}},
		{"RFC 8414 metadata without token_endpoint", srv.URL + "/notoken", []string{"the RFC 8414 metadata has no token_endpoint"}, []string{"OpenID"}},
		{"OpenID discovery document without token_endpoint", srv.URL + "/oidcnotoken", []string{"the OpenID discovery document has no token_endpoint"}, []string{"RFC 8414"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			src, err := NewClientCredentials(Config{Issuer: tc.issuer, ClientID: "c", ClientSecret: secretValue})
			if err != nil {
				t.Fatal(err)
			}
			_, err = src.Token(ctx, broker.Request{Merchant: "m"})
			var de *DiscoveryError
			if !errors.As(err, &de) {
				t.Fatalf("Token = %v, want a *DiscoveryError", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q does not say %q", err, w)
				}
			}
			for _, n := range tc.not {
				if strings.Contains(err.Error(), n) {
					t.Errorf("error %q says %q", err, n)
				}
			}
		})
	}
	mu.Lock()
	defer mu.Unlock()
	for _, p := range metadataReads {
		if p == "/.well-known/oauth-authorization-server/busy" || p == "/.well-known/oauth-authorization-server/limited" {
			t.Errorf("the RFC 8414 metadata was read (%s) after an OpenID discovery that failed with 5xx or 429", p)
		}
	}
}
