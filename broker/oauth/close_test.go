package oauth

import (
	"context"
	"errors"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/integration/banktest"
)

// gatedStore is a MemoryStore whose second Lock call signals asked when
// it starts and locked once it holds the lock, then waits for gate.
type gatedStore struct {
	*MemoryStore
	mu                  sync.Mutex
	calls               int
	asked, locked, gate chan struct{}
}

func (s *gatedStore) Lock(ctx context.Context, key string) (func(), error) {
	s.mu.Lock()
	s.calls++
	second := s.calls == 2
	s.mu.Unlock()
	if !second {
		return s.MemoryStore.Lock(ctx, key)
	}
	close(s.asked)
	unlock, err := s.MemoryStore.Lock(ctx, key)
	close(s.locked)
	<-s.gate
	return unlock, err
}

// TestCloseWaitsForAdmittedRefreshes: a refresh of a merchant is sent (its
// caller gone) and a second Token of the merchant, for other scopes, waits
// for the merchant's lock when the process exits: Close, then Wait. The
// bank answers the first refresh, whose rotated refresh token is saved;
// the second, admitted before Close, is counted while it waits for the
// lock, so Wait does not return before it ends, and it is refused without
// a request to the bank (ErrClosed, temporary), as is a Token after
// Close.
func TestCloseWaitsForAdmittedRefreshes(t *testing.T) {
	bank := banktest.Start(t)
	arrived, answer := bank.Hold(t)
	store := &gatedStore{MemoryStore: &MemoryStore{}, asked: make(chan struct{}), locked: make(chan struct{}), gate: make(chan struct{})}
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: bank.URL + "/token", ClientID: "tpp", ClientSecret: secretValue, Now: newClock().Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	if err := store.Save(context.Background(), src.StoreKey("acme"), "rt-1"); err != nil {
		t.Fatal(err)
	}
	ctx, giveUp := context.WithCancel(context.Background())
	first, second := make(chan error, 1), make(chan error, 1)
	go func() {
		_, err := src.Token(ctx, broker.Request{Merchant: "acme", Scopes: []string{"accounts"}})
		first <- err
	}()
	<-arrived
	giveUp()
	<-first
	go func() {
		_, err := src.Token(context.Background(), broker.Request{Merchant: "acme", Scopes: []string{"payments"}})
		second <- err
	}()
	<-store.asked

	src.Close()
	waited := make(chan int, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		waited <- src.Wait(ctx)
	}()
	late, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := src.Token(late, broker.Request{Merchant: "acme"}); !errors.Is(err, ErrClosed) || !broker.IsTemporary(err) {
		t.Errorf("Token after Close: %v; want ErrClosed, temporary", err)
	}
	answer()
	<-store.locked // the second's lock wait has ended
	select {
	case n := <-waited:
		t.Fatalf("Wait returned (%d under way) while a refresh admitted before Close was still in the store's Lock", n)
	case <-time.After(300 * time.Millisecond):
	}
	close(store.gate)
	if err := <-second; !errors.Is(err, ErrClosed) || !broker.IsTemporary(err) {
		t.Errorf("the refresh that waited for the lock: %v; want ErrClosed, temporary", err)
	}
	if n := <-waited; n != 0 {
		t.Errorf("Wait: %d refreshes under way; want none", n)
	}
	if !slices.Equal(bank.Sent(), []string{"rt-1"}) {
		t.Errorf("the bank was sent %q; want only the first refresh's", bank.Sent())
	}
	if rt, err := store.Load(context.Background(), src.StoreKey("acme")); err != nil || rt != "rt-2" {
		t.Errorf("the store holds %q (%v); want the rotated rt-2", rt.Reveal(), err)
	}
}

// askedStore is a MemoryStore that signals asked when Lock is called.
type askedStore struct {
	*MemoryStore
	asked chan struct{}
}

func (s *askedStore) Lock(ctx context.Context, key string) (func(), error) {
	close(s.asked)
	return s.MemoryStore.Lock(ctx, key)
}

// TestCloseEndsLockWaits: a Token waits for the merchant's lock, which
// another holder (another node of the fleet) keeps, when the process
// exits. Close ends the wait: Token is refused (ErrClosed, temporary)
// without a request to the bank, and Wait returns at once with nothing
// under way instead of waiting for a lock that would only lead to the
// refusal.
func TestCloseEndsLockWaits(t *testing.T) {
	bank := banktest.Start(t)
	store := &askedStore{MemoryStore: &MemoryStore{}, asked: make(chan struct{})}
	src, err := NewRefreshToken(Config{Name: "bank", TokenURL: bank.URL + "/token", ClientID: "tpp", ClientSecret: secretValue, Now: newClock().Now}, store)
	if err != nil {
		t.Fatal(err)
	}
	unlock, err := store.MemoryStore.Lock(context.Background(), src.StoreKey("acme"))
	if err != nil {
		t.Fatal(err)
	}
	defer unlock()
	refused := make(chan error, 1)
	go func() {
		_, err := src.Token(context.Background(), broker.Request{Merchant: "acme"})
		refused <- err
	}()
	<-store.asked
	src.Close()
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	defer cancel()
	if n := src.Wait(ctx); n != 0 {
		t.Fatalf("Wait after Close: %d refreshes still under way; want the lock wait ended", n)
	}
	if err := <-refused; !errors.Is(err, ErrClosed) || !broker.IsTemporary(err) {
		t.Errorf("the Token that waited for the lock: %v; want ErrClosed, temporary", err)
	}
	if len(bank.Sent()) != 0 {
		t.Errorf("the bank was sent %q; want nothing", bank.Sent())
	}
}
