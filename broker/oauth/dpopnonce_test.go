package oauth

import (
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/dpoptest"
	"github.com/tokenbroker/caddy-token-broker/internal/dpop"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// TestDPoPNonceSizes: through the broker, an authorization server's nonce
// of up to dpop.MaxNonce bytes is carried by the request sent again at
// once (two requests, a DPoP token); a larger one is refused: the
// challenge is a temporary failure, never sent again at once (one
// request), whose message names the server, the nonce's size and the
// limit, never the nonce. The consent's pushed authorization request
// sends no second request either.
func TestDPoPNonceSizes(t *testing.T) {
	nonceOf := func(n int) string { return strings.Repeat("N", n-1) + "z" }
	for _, tc := range []struct {
		name    string
		size    int
		refused bool
	}{
		{"1.5 KiB", 1536, false},
		{"at the limit", dpop.MaxNonce, false},
		{"one byte over the limit", dpop.MaxNonce + 1, true},
		{"64 KiB", 64 << 10, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			as := newDPoPAS(t, "basic", nil)
			nonce := nonceOf(tc.size)
			as.gate.Nonce = nonce
			key := dpoptest.NewKey(t)
			src, err := NewClientCredentials(Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID, ClientSecret: secretValue, DPoP: key})
			if err != nil {
				t.Fatal(err)
			}
			tok, err := brokerToken(t, src, broker.Request{Merchant: "m1"})
			if !tc.refused {
				if err != nil || tok.Type != broker.DPoPType {
					t.Fatalf("token type %q, err %v", tok.Type, err)
				}
				if c, n := as.gate.Challenges.Load(), len(as.jkts); c != 1 || n != 1 {
					t.Errorf("%d nonce challenges and %d token requests passed, want 1 and 1", c, n)
				}
				return
			}
			var ae *broker.APIError
			if !errors.As(err, &ae) || ae.Code != "use_dpop_nonce" {
				t.Fatalf("err %v, want use_dpop_nonce", err)
			}
			if c := src.Classify(err); c != broker.ClassTemporary {
				t.Errorf("class %v, want temporary (not sent again at once)", c)
			}
			var ne *dpop.NonceError
			if !errors.As(err, &ne) || ne.Size != tc.size || ne.Server != dpop.AuthorizationServer {
				t.Errorf("err %v, want a *dpop.NonceError of the authorization server, %d bytes", err, tc.size)
			}
			checkNonceMessage(t, err, tc.size, as.srv.URL, nonce)
			if c, n := as.gate.Challenges.Load(), len(as.jkts); c != 1 || n != 0 {
				t.Errorf("%d nonce challenges and %d token requests passed, want 1 and 0", c, n)
			}

			// The consent's PAR request, whose challenge is answered
			// by the flow itself (nonceRetried).
			_, flow := newFlow(t, Config{Name: "bank", TokenURL: as.srv.URL + "/token", ClientID: as.clientID, ClientSecret: secretValue, DPoP: key}, &MemoryStore{},
				AuthCodeConfig{RedirectURIs: []string{callbackURL}, Scopes: []string{"offline_access"}, AuthorizationURL: as.srv.URL + "/authorize", PARURL: as.srv.URL + "/par", PAR: true},
				&Pendings{Store: &MemoryPendingStore{}, Now: newClock().Now})
			_, _, err = startLink(t, flow, "m1")
			if err == nil {
				t.Fatal("Start succeeded")
			}
			checkNonceMessage(t, err, tc.size, as.srv.URL, nonce)
			if c := as.gate.Challenges.Load(); c != 2 {
				t.Errorf("%d nonce challenges in all, want 2 (the PAR request sent once)", c)
			}
		})
	}
}

// checkNonceMessage checks that err says that the authorization server at
// srvURL sent a nonce of size bytes, over the limit, without quoting it.
func checkNonceMessage(t *testing.T, err error, size int, srvURL, nonce string) {
	t.Helper()
	msg := err.Error()
	for _, w := range []string{"authorization server http://" + httpclient.Host(srvURL), fmt.Sprintf("DPoP-Nonce of %d bytes", size), fmt.Sprintf("over the limit of %d bytes", dpop.MaxNonce)} {
		if !strings.Contains(msg, w) {
			t.Errorf("error %q does not say %q", msg, w)
		}
	}
	if strings.Contains(msg, nonce) || strings.Contains(msg, "NNNN") {
		t.Errorf("the error quotes the nonce: %.300s", msg)
	}
}
