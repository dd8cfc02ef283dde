package regcache

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/banktest"
)

// TestReleaseAtExitWaitsForRefreshes: a refresh of a registry's source is
// under way (sent, its caller gone, the bank not answering yet) when a
// config releases the registry. When the process exits and no other use
// of the registry is left, Release waits for the refresh, so that the
// rotated refresh token is saved, and the source starts no refresh
// afterwards; the wait is bounded (ExitWait, shortened here), and what
// still runs then is logged. A reload, or a use left, does not wait, and
// the source goes on refreshing.
func TestReleaseAtExitWaitsForRefreshes(t *testing.T) {
	tests := []struct {
		name     string
		exiting  bool
		uses     int           // loads of the registry before the release
		exitWait time.Duration // the bound
		wait     bool          // Release waits for the refresh
		closed   bool          // the source refuses to refresh afterwards
		logged   int           // refreshes logged as still under way
	}{
		{name: "reload", uses: 1, exitWait: ExitWait},
		{name: "exit, another use left", exiting: true, uses: 2, exitWait: ExitWait},
		{name: "exit", exiting: true, uses: 1, exitWait: ExitWait, wait: true, closed: true},
		{name: "exit, the bound reached", exiting: true, uses: 1, exitWait: 100 * time.Millisecond, closed: true, logged: 1},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bank := banktest.Start(t)
			store := &oauth.MemoryStore{}
			c := New()
			c.exitWait = tt.exitWait
			arrived, answer := bank.Hold(t)
			key, src := heldRefresh(t, c, bank, arrived, store, "rt-1", tt.uses)

			core, logs := observer.New(zap.InfoLevel)
			released := make(chan struct{})
			go func() { c.Release(key, tt.exiting, zap.New(core)); close(released) }()
			if tt.wait {
				select {
				case <-released:
					t.Fatal("Release at exit returned with a refresh unanswered")
				case <-time.After(300 * time.Millisecond):
				}
				answer()
			}
			select {
			case <-released:
			case <-time.After(10 * time.Second):
				t.Fatal("Release did not return")
			}
			answer()
			waitStored(t, store, src.StoreKey("acme"), "rt-2")

			// Other scopes: the abandoned refresh's access token is not
			// reused.
			_, err := src.Token(context.Background(), broker.Request{Merchant: "acme", Scopes: []string{"payments"}})
			if closed := errors.Is(err, oauth.ErrClosed); closed != tt.closed || tt.closed && !broker.IsTemporary(err) || !tt.closed && err != nil {
				t.Errorf("a refresh after the release: %v; want refused as closed (temporary): %v", err, tt.closed)
			}
			want := []string{"rt-1", "rt-2"}
			if tt.closed {
				want = want[:1]
			}
			if !slices.Equal(bank.Sent(), want) {
				t.Errorf("the bank was sent %q; want %q", bank.Sent(), want)
			}
			var logged int64
			for _, e := range logs.All() {
				if text := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(text, "rt-") {
					t.Errorf("a log shows a token: %s", text)
				}
				if n, ok := e.ContextMap()["refreshes"].(int64); ok {
					logged += n
				}
			}
			if logged != int64(tt.logged) {
				t.Errorf("%d refreshes logged as still under way; want %d", logged, tt.logged)
			}
		})
	}
}

// TestReleaseAtExitSharesOneBound: three registries each have a refresh
// under way that the bank does not answer when the process exits, and
// their configs release them one after another (Caddy runs the modules'
// Cleanups in turn). The first Release at exit sets the deadline of the
// cache: the three together wait about ExitWait (shortened here), not
// three times it.
func TestReleaseAtExitSharesOneBound(t *testing.T) {
	const exitWait = 500 * time.Millisecond
	bank := banktest.Start(t)
	c := New()
	c.exitWait = exitWait
	arrived, _ := bank.Hold(t)
	var keys []string
	for _, rt := range []broker.Secret{"rt-1", "rt-10", "rt-20"} {
		key, _ := heldRefresh(t, c, bank, arrived, &oauth.MemoryStore{}, rt, 1)
		keys = append(keys, key)
	}
	start := time.Now()
	for _, key := range keys {
		c.Release(key, true, zap.NewNop())
	}
	if took := time.Since(start); took >= 2*exitWait {
		t.Errorf("releasing three registries at exit took %v; want about one bound, %v", took, exitWait)
	}
}

// heldRefresh loads uses times into c a registry of its own naming bank,
// its refresh tokens in store, stores rt for the merchant "acme" and
// starts a refresh whose caller gives up once bank received it (on
// arrived, from bank.Hold): the refresh is under way until bank answers.
// It returns the registry's key and its source.
func heldRefresh(t *testing.T, c *Cache, bank *banktest.Bank, arrived <-chan string, store oauth.Store, rt broker.Secret, uses int) (string, *oauth.RefreshToken) {
	t.Helper()
	dir := t.TempDir()
	if err := os.WriteFile(filepath.Join(dir, "merchants.toml"), []byte(bank.Registry("timeout = \"1m\"", "acme")), 0o600); err != nil {
		t.Fatal(err)
	}
	var reg *config.Registry
	var key string
	for range uses {
		var err error
		if reg, key, _, err = c.Load(dir, config.Options{RefreshStore: store, LookupEnv: banktest.LookupEnv}, "store"); err != nil {
			t.Fatal(err)
		}
	}
	src, _ := reg.Providers["bank"].RefreshToken()
	if err := src.SetRefreshToken(context.Background(), "acme", rt); err != nil {
		t.Fatal(err)
	}
	ctx, giveUp := context.WithCancel(context.Background())
	refreshed := make(chan error, 1)
	go func() {
		_, err := src.Token(ctx, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
		refreshed <- err
	}()
	<-arrived
	giveUp()
	<-refreshed
	return key, src
}

// waitStored waits until store holds want under key.
func waitStored(t *testing.T, store oauth.Store, key string, want broker.Secret) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); ; time.Sleep(10 * time.Millisecond) {
		rt, err := store.Load(context.Background(), key)
		if rt == want {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("the store holds %q (%v); want %q", rt.Reveal(), err, want.Reveal())
		}
	}
}
