package oauth

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/banktest"
)

// TestUnsavedRotatedRefreshToken: the bank rotates rt-1 to rt-2 and the
// store fails to save rt-2, which the source keeps in memory with rt-1.
// What the store holds when the merchant's next refresh starts decides
// which refresh token it sends: rt-2 (saved first) while the store still
// holds rt-1, or when rt-2 is stored after all; otherwise what the store
// holds, rt-2 being dropped and logged by store key: a token another node
// saved since, or none (deleted on purpose: consent revoked), is never
// overwritten by rt-2.
func TestUnsavedRotatedRefreshToken(t *testing.T) {
	tests := []struct {
		name   string
		stored broker.Secret // the store's token at the next refresh, "" none
		sent   string        // the refresh token the next refresh sends, "" none
		after  broker.Secret // the store's token after it, "" none
		logged bool          // rt-2 dropped, logged
	}{
		{name: "the store still holds the replaced token", stored: "rt-1", sent: "rt-2", after: "rt-3"},
		{name: "saved after all", stored: "rt-2", sent: "rt-2", after: "rt-3"},
		{name: "superseded on another node", stored: "rt-50", sent: "rt-50", after: "rt-51", logged: true},
		{name: "deleted on purpose", stored: "", sent: "", after: "", logged: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bank := banktest.Start(t)
			core, logs := observer.New(zap.InfoLevel)
			store := &failingStore{MemoryStore: &MemoryStore{}}
			src, err := NewRefreshToken(Config{Name: "bank", TokenURL: bank.URL + "/token", ClientID: "tpp", ClientSecret: secretValue,
				Now: newClock().Now, Logger: zap.New(core)}, store)
			if err != nil {
				t.Fatal(err)
			}
			ctx, key := context.Background(), src.StoreKey("acme")
			if err := src.SetRefreshToken(ctx, "acme", "rt-1"); err != nil {
				t.Fatal(err)
			}
			store.mu.Lock()
			store.fail = true
			store.mu.Unlock()
			var se *SaveError
			if _, err := src.Token(ctx, broker.Request{Merchant: "acme"}); !errors.As(err, &se) {
				t.Fatalf("a refresh whose rotated token is not saved: %v; want a SaveError", err)
			}
			store.mu.Lock()
			store.fail = false
			store.tokens[key] = tt.stored
			if tt.stored == "" {
				delete(store.tokens, key)
			}
			store.mu.Unlock()

			tok, err := src.Token(ctx, broker.Request{Merchant: "acme"})
			var ce *ConsentRequiredError
			switch {
			case tt.sent == "" && !errors.As(err, &ce):
				t.Errorf("the next refresh: %v; want a ConsentRequiredError", err)
			case tt.sent != "" && (err != nil || tok.Value != broker.Secret(strings.Replace(tt.sent, "rt-", "at-", 1))):
				t.Errorf("the next refresh: %q, %v; want the access token of %s", tok.Value.Reveal(), err, tt.sent)
			}
			if want := slices.DeleteFunc([]string{"rt-1", tt.sent}, func(s string) bool { return s == "" }); !slices.Equal(bank.Sent(), want) {
				t.Errorf("the bank was sent %q; want %q", bank.Sent(), want)
			}
			if rt, _ := store.Load(ctx, key); rt != tt.after {
				t.Errorf("the store holds %q; want %q", rt.Reveal(), tt.after.Reveal())
			}
			dropped := logs.FilterMessageSnippet("is dropped").FilterField(zap.String("store_key", key))
			if got := dropped.Len() == 1; got != tt.logged {
				t.Errorf("the drop logged: %v; want %v", got, tt.logged)
			}
			for _, e := range logs.All() {
				if text := fmt.Sprint(e.Message, e.ContextMap()); strings.Contains(text, "rt-") {
					t.Errorf("a log shows a refresh token: %s", text)
				}
			}
		})
	}
}

// loadFailingStore is a failingStore whose Load also fails while
// failLoad is set.
type loadFailingStore struct {
	*failingStore
	failLoad bool // guarded by failingStore.mu
}

func (s *loadFailingStore) Load(ctx context.Context, key string) (broker.Secret, error) {
	s.mu.Lock()
	fail := s.failLoad
	s.mu.Unlock()
	if fail {
		return "", errors.New("store unreachable")
	}
	return s.MemoryStore.Load(ctx, key)
}

// TestUnsavedKeptWhenLoadFails: rt-2, rotated from rt-1, could not be
// saved, and the store cannot be read at the merchant's next refresh:
// nothing is sent to the bank, the error is temporary, and rt-2 is kept.
// Once the store answers again, still holding rt-1, the next refresh
// saves and sends rt-2.
func TestUnsavedKeptWhenLoadFails(t *testing.T) {
	bank := banktest.Start(t)
	store := &loadFailingStore{failingStore: &failingStore{MemoryStore: &MemoryStore{}}}
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: bank.URL + "/token", ClientID: "tpp", ClientSecret: secretValue, Now: newClock().Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	ctx, req := context.Background(), broker.Request{Merchant: "acme"}
	if err := src.SetRefreshToken(ctx, "acme", "rt-1"); err != nil {
		t.Fatal(err)
	}
	set := func(failSave, failLoad bool) {
		store.mu.Lock()
		store.fail, store.failLoad = failSave, failLoad
		store.mu.Unlock()
	}
	set(true, false)
	var se *SaveError
	if _, err := src.Token(ctx, req); !errors.As(err, &se) {
		t.Fatalf("a refresh whose rotated token is not saved: %v; want a SaveError", err)
	}
	set(false, true)
	var ce *ConsentRequiredError
	if _, err := src.Token(ctx, req); err == nil || errors.As(err, &ce) || !broker.IsTemporary(err) {
		t.Errorf("a refresh whose store cannot be read: %v; want a temporary error", err)
	}
	if !slices.Equal(bank.Sent(), []string{"rt-1"}) {
		t.Errorf("the bank was sent %q; want only rt-1", bank.Sent())
	}
	set(false, false)
	if tok, err := src.Token(ctx, req); err != nil || tok.Value != "at-2" {
		t.Errorf("the refresh once the store answers: %q, %v; want the access token of rt-2", tok.Value.Reveal(), err)
	}
	if rt, _ := store.Load(ctx, src.StoreKey("acme")); rt != "rt-3" {
		t.Errorf("the store holds %q; want rt-3", rt.Reveal())
	}
}
