// Package banktest is a provider's token endpoint that rotates refresh
// tokens, and a merchants file naming it, for tests of the refresh_token
// grant. Tests only.
package banktest

import (
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
)

// Bank is a token endpoint (any path) that rotates refresh tokens: a
// refresh with "rt-N" it has not been sent before answers the access
// token "at-N" and the refresh token "rt-N+1"; a refresh token sent
// before, or not of that form, is refused (invalid_grant). It does not
// check the client's credentials.
type Bank struct {
	// URL is the endpoint's base URL.
	URL string

	mu      sync.Mutex
	sent    []string
	arrived chan string   // Hold's: each refresh token as it arrives
	gate    chan struct{} // Hold's: closed by its release
}

// Start starts a Bank that stops when the test ends.
func Start(t testing.TB) *Bank {
	b := &Bank{}
	srv := httptest.NewServer(http.HandlerFunc(b.serve))
	t.Cleanup(srv.Close)
	b.URL = srv.URL
	return b
}

// Hold has the refreshes that arrive from now on wait, once received,
// until release is called (at the latest when the test ends); arrived
// receives each one's refresh token as it arrives (buffered, 16).
func (b *Bank) Hold(t testing.TB) (arrived <-chan string, release func()) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.arrived, b.gate = make(chan string, 16), make(chan struct{})
	release = sync.OnceFunc(func() { close(b.gate) })
	t.Cleanup(release) // before Start's srv.Close, which waits for the held requests
	return b.arrived, release
}

// Sent returns the refresh tokens the refreshes sent, in the order they
// arrived.
func (b *Bank) Sent() []string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return append([]string(nil), b.sent...)
}

func (b *Bank) serve(w http.ResponseWriter, r *http.Request) {
	_ = r.ParseForm()
	rt := r.PostForm.Get("refresh_token")
	b.mu.Lock()
	spent := slices.Contains(b.sent, rt)
	b.sent = append(b.sent, rt)
	arrived, gate := b.arrived, b.gate
	b.mu.Unlock()
	if gate != nil {
		arrived <- rt
		<-gate
	}
	w.Header().Set("Content-Type", "application/json")
	n, err := strconv.Atoi(strings.TrimPrefix(rt, "rt-"))
	if spent || err != nil || r.PostForm.Get("grant_type") != "refresh_token" {
		w.WriteHeader(http.StatusBadRequest)
		fmt.Fprint(w, `{"error":"invalid_grant"}`)
		return
	}
	fmt.Fprintf(w, `{"access_token":"at-%d","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-%d"}`, n, n+1)
}

// Registry returns a merchants file naming b as the provider "bank"
// (grant refresh_token, client "tpp", its secret from {env.BANK_SECRET}:
// see LookupEnv), with the lines of provider added to the provider's
// table, and a merchant with scopes ["accounts"] for each name of
// merchants.
func (b *Bank) Registry(provider string, merchants ...string) string {
	var s strings.Builder
	fmt.Fprintf(&s, "[providers.bank]\ntype = \"oauth2\"\ngrant = \"refresh_token\"\ntoken_url = %q\nclient_id = \"tpp\"\nclient_secret = \"{env.BANK_SECRET}\"\n%s\n", b.URL+"/token", provider)
	for _, m := range merchants {
		fmt.Fprintf(&s, "\n[merchants.%s]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n", m)
	}
	return s.String()
}

// LookupEnv resolves the environment variables a registry of Registry
// reads (config.Options.LookupEnv).
func LookupEnv(name string) (string, bool) { return "bank-secret", name == "BANK_SECRET" }
