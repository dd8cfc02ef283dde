package reload

import (
	"context"
	"fmt"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/brokertest"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
)

// An operator rotates a client secret after invalid_client and reloads:
// the provider ID stays (no secret in it) and the pooled broker survives,
// but its secret version changed, so the remembered invalid_client (key
// memory, source hold) is forgotten and the next lookup calls the token
// API with the new secret.
func TestSecretRotationForgetsFailures(t *testing.T) {
	var valid atomic.Value
	valid.Store("old-secret-rejected")
	var calls atomic.Int64
	as := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		calls.Add(1)
		w.Header().Set("Content-Type", "application/json")
		if _, secret, ok := r.BasicAuth(); !ok || secret != valid.Load().(string) {
			w.WriteHeader(http.StatusUnauthorized)
			w.Write([]byte(`{"error":"invalid_client"}`))
			return
		}
		w.Write([]byte(`{"access_token":"at-1","token_type":"Bearer","expires_in":3600}`))
	}))
	t.Cleanup(as.Close)
	toml := `[providers.bank]
type = "oauth2"
token_url = "` + as.URL + `/token"
client_id = "tpp"
client_secret = "{env.BANK_SECRET}"

[merchants.acme]
provider = "bank"
scopes = ["payments"]
`
	parse := func(secret string) *config.Registry {
		t.Helper()
		reg, err := configtest.Load(t, "merchants.toml", []byte(toml), config.Options{
			LookupEnv: func(k string) (string, bool) { return secret, k == "BANK_SECRET" }})
		if err != nil {
			t.Fatal(err)
		}
		return reg
	}
	get := func(pb *Broker, reg *config.Registry) error {
		p := reg.Providers["bank"]
		_, _, err := pb.Get(context.Background(), brokertest.NewBinding(p.ID, p.Source, broker.Request{Merchant: "acme", Scopes: []string{"payments"}}))
		return err
	}
	pb := &Broker{Broker: broker.New(broker.Options{MaxAttempts: 1}), Logger: zap.NewNop()}
	t.Cleanup(pb.Close)

	old := parse("old-secret")
	pb.SecretsSeen(old)
	if err := get(pb, old); err == nil || !strings.Contains(err.Error(), "invalid_client") {
		t.Fatalf("with the old secret: %v, want invalid_client", err)
	}
	valid.Store("new-secret")
	rotated := parse("new-secret")
	po, pn := old.Providers["bank"], rotated.Providers["bank"]
	if po.ID != pn.ID || po.SecretVersion == pn.SecretVersion || po.SecretVersion == "" {
		t.Fatalf("IDs %s / %s, secret versions equal: %t: want one ID, two versions", po.ID, pn.ID, po.SecretVersion == pn.SecretVersion)
	}
	if strings.Contains(pn.SecretVersion, "new-secret") || strings.Contains(pn.ID, pn.SecretVersion[:8]) {
		t.Fatal("the secret version shows the secret, or is part of the ID")
	}
	pb.SecretsSeen(rotated) // what Provision does on the reload
	if err := get(pb, rotated); err != nil {
		t.Fatalf("after rotation and reload: %v, want a token from the new secret", err)
	}
	if calls.Load() != 2 {
		t.Fatalf("token API calls = %d, want 2", calls.Load())
	}
	// A reload without a change forgets nothing.
	pb.SecretsSeen(parse("new-secret"))
}

// Revoking at shutdown does not wait for each provider answer in turn:
// 40 tokens whose revocations take 400 ms each are all revoked within the
// 10 s the shutdown gives (one after the other they would take 16 s).
func TestRevokeAtShutdownDoesNotQueue(t *testing.T) {
	const tokens = 40
	var minted atomic.Int64
	gk := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if strings.HasSuffix(r.URL.Path, "/revoke") {
			select {
			case <-r.Context().Done():
				return
			case <-time.After(400 * time.Millisecond):
			}
			fmt.Fprint(w, `{"data":{"status":"REVOKED"}}`)
			return
		}
		n := minted.Add(1)
		w.WriteHeader(http.StatusCreated)
		fmt.Fprintf(w, `{"data":{"id":"t%d","accessToken":"tok-%d","tokenType":"BEARER","status":"ACTIVE"}}`, n, n)
	}))
	t.Cleanup(gk.Close)
	src, err := nuapay.New(nuapay.Config{BaseURL: gk.URL, APIKey: "partner-key"})
	if err != nil {
		t.Fatal(err)
	}
	core, logs := observer.New(zap.InfoLevel)
	pb := &Broker{Broker: broker.New(broker.Options{}), Logger: zap.New(core)}
	t.Cleanup(pb.Close)
	for i := range tokens {
		b := brokertest.NewBinding("np", src, broker.Request{Merchant: fmt.Sprint("m", i), Organisation: fmt.Sprint("o", i), Scopes: []string{"s"}})
		if _, _, err := pb.Get(context.Background(), b); err != nil {
			t.Fatal(err)
		}
	}
	pb.Revoke(pb.Tokens())
	revoked := 0
	for _, e := range logs.FilterMessage("token revoked at shutdown").All() {
		if e.ContextMap()["revoked"] == true {
			revoked++
		}
	}
	if revoked != tokens {
		t.Fatalf("%d of %d tokens revoked at shutdown", revoked, tokens)
	}
}
