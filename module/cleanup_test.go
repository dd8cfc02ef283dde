package module

import (
	"context"
	"encoding/base64"
	"errors"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/brokertest"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet/redisstore"
	"github.com/tokenbroker/caddy-token-broker/broker/reload"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// TestCleanupWaitsForRefresh: a merchant's refresh is sent to a bank that
// rotates refresh tokens, the broker's fetch times out, and Caddy stops
// (the app's Cleanup: the registry released, the broker and the shared
// tier closed) before the bank answers. Cleanup returns only once the
// rotated refresh token is saved in Redis: after it the process may exit,
// and with only the spent refresh token stored the merchant would need to
// consent again.
func TestCleanupWaitsForRefresh(t *testing.T) {
	r := redistest.Start(t)
	sent, answer := make(chan struct{}), make(chan struct{})
	bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.ParseForm() != nil || req.PostForm.Get("refresh_token") != "rt-1" {
			w.WriteHeader(http.StatusBadRequest)
			w.Write([]byte(`{"error":"invalid_grant"}`))
			return
		}
		close(sent)
		<-answer
		w.Header().Set("Content-Type", "application/json")
		w.Write([]byte(`{"access_token":"at-1","token_type":"Bearer","expires_in":3600,"refresh_token":"rt-2"}`))
	}))
	t.Cleanup(bank.Close)
	path := filepath.Join(t.TempDir(), "merchants.toml")
	toml := "[providers.bank]\ntype = \"oauth2\"\ngrant = \"refresh_token\"\ntoken_url = \"" + bank.URL + "/token\"\nclient_id = \"tpp\"\nclient_secret = \"{env.BANK_SECRET}\"\n\n" +
		"[merchants.acme]\nprovider = \"bank\"\nscopes = [\"accounts\"]\n"
	if err := os.WriteFile(path, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}

	key := base64.StdEncoding.EncodeToString([]byte(strings.Repeat("k", 32)))
	cctx, cancel := caddy.NewContext(caddy.Context{Context: context.Background()})
	defer cancel()
	tier, fleetKey, err := (&RedisConfig{Address: []string{r.Addr()}, EncryptionKey: key}).provision(cctx, 0, zap.NewNop(), zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	reg, regKey, _, err := registries.Load(path, config.Options{RefreshStore: tier.Cache.Store(),
		LookupEnv: func(k string) (string, bool) { return "bank-secret", k == "BANK_SECRET" }}, "store "+fleetKey)
	if err != nil {
		t.Fatal(err)
	}
	poolKey := "fetch_timeout=200ms " + t.Name()
	val, _, err := brokers.LoadOrNew(poolKey, func() (caddy.Destructor, error) {
		return &pooledBroker{Broker: &reload.Broker{Broker: broker.New(broker.Options{FetchTimeout: 200 * time.Millisecond, MaxAttempts: 1}),
			Logger: zap.NewNop()}, unwatchFleet: func() {}}, nil
	})
	if err != nil {
		t.Fatal(err)
	}
	app := &App{registry: reg, registryKey: regKey, fleet: tier, fleetKey: fleetKey, poolKey: poolKey}
	p := reg.Providers["bank"]
	src, _ := p.RefreshToken()
	if err := src.SetRefreshToken(context.Background(), "acme", "rt-1"); err != nil {
		t.Fatal(err)
	}

	b := brokertest.NewBinding(p.ID, p.Source, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
	if _, _, err := val.(*pooledBroker).Get(context.Background(), b); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("a fetch the bank does not answer: %v; want its timeout", err)
	}
	<-sent
	cleaned := make(chan error, 1)
	go func() { cleaned <- app.Cleanup() }()
	select {
	case <-cleaned:
		close(answer)
		t.Fatal("Cleanup returned while a refresh it had sent was unanswered: the process may exit before the rotated refresh token is saved")
	case <-time.After(300 * time.Millisecond):
	}
	close(answer)
	if err := <-cleaned; err != nil {
		t.Fatal(err)
	}

	// Another sidecar of the fleet (a tier of its own) loads the rotated one.
	plan, err := redisstore.Prepare(redisstore.Settings{Address: []string{r.Addr()}, EncryptionKey: key, Timeout: time.Second})
	if err != nil {
		t.Fatal(err)
	}
	other, err := plan.Open(zap.NewNop())
	if err != nil {
		t.Fatal(err)
	}
	defer other.Destruct()
	if rt, err := other.Cache.Store().Load(context.Background(), src.StoreKey("acme")); err != nil || rt != "rt-2" {
		t.Fatalf("after Cleanup the store has %q (%v); want the rotated rt-2", rt.Reveal(), err)
	}
}
