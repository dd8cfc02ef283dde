package kvstore

import (
	"context"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// storageFlow is a consent flow keeping its links and states in the
// file-system storage at dir: one per instance.
func storageFlow(t *testing.T, dir string, clock *clocktest.Clock) *oauth.AuthCode {
	t.Helper()
	return storageFlowWith(t, dir, clock, "https://bank.example/token", &oauth.MemoryStore{})
}

// storageFlowWith is storageFlow with the provider's token endpoint
// tokenURL and the refresh token store tokens.
func storageFlowWith(t *testing.T, dir string, clock *clocktest.Clock, tokenURL string, tokens oauth.Store) *oauth.AuthCode {
	t.Helper()
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: tokenURL, ClientID: "c", ClientSecret: "s", Now: clock.Now}, tokens)
	if err != nil {
		t.Fatal(err)
	}
	flow, err := oauth.NewAuthCode(src, oauth.AuthCodeConfig{RedirectURIs: []string{"https://cb.partner.example/consent/callback"},
		ReturnURLs: []string{"https://app.partner.example/consent/"}, AuthorizationURL: "https://bank.example/authorize", Scopes: []string{"offline_access"}},
		&oauth.Pendings{Store: Pending{S: &certmagic.FileStorage{Path: dir}}, Now: clock.Now})
	if err != nil {
		t.Fatal(err)
	}
	return flow
}

// TestStoragePendingSharedSealedSwept: two instances on one storage
// folder: a link made by one opens at the other, and again at the
// first (until a callback consumes it); the storage holds
// neither link, merchant nor return URL; the sweep deletes what has
// expired, and only that.
func TestStoragePendingSharedSealedSwept(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := clocktest.New(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	a, b := storageFlow(t, dir, clock), storageFlow(t, dir, clock)
	const ret = "https://app.partner.example/consent/done-marker"
	link, err := a.NewLink(ctx, "merchant-marker", ret, "")
	if err != nil {
		t.Fatal(err)
	}
	id := mustQuery(t, link.URL, "link")
	_ = filepath.WalkDir(filepath.Join(dir, "token_broker"), func(p string, d os.DirEntry, err error) error {
		if err != nil || d.IsDir() {
			return err
		}
		data, _ := os.ReadFile(p)
		for _, s := range []string{id, "merchant-marker", "done-marker"} {
			if strings.Contains(p, s) || strings.Contains(string(data), s) {
				t.Errorf("%s shows %q", p, s)
			}
		}
		return nil
	})
	authURL, rec, err := b.Start(ctx, id, "cb.partner.example", oauth.NewBrowser())
	if err != nil || rec.Merchant != "merchant-marker" || mustQuery(t, authURL, "state") == "" {
		t.Fatalf("start at the second instance: %v %+v", err, rec)
	}
	// Started, the link stays until a callback consumes it (another tab
	// may start it again), here at the first instance.
	if _, rec, err := a.Start(ctx, id, "cb.partner.example"); err != nil || rec.Merchant != "merchant-marker" {
		t.Fatalf("the link started again at the first instance: %v %+v", err, rec)
	}

	st := Pending{S: &certmagic.FileStorage{Path: dir}}
	if _, err := a.NewLink(ctx, "globex", "", ""); err != nil {
		t.Fatal(err)
	}
	if deleted, left, err := st.Sweep(ctx, clock.Now()); err != nil || deleted != 0 || left != 4 {
		t.Fatalf("sweep before expiry: %d deleted, %d left, %v", deleted, left, err)
	}
	clock.Add(oauth.StateTTL) // the two states expire; the links expired and are kept StateTTL and a minute longer
	if deleted, left, err := st.Sweep(ctx, clock.Now()); err != nil || deleted != 2 || left != 2 {
		t.Fatalf("sweep after the states' expiry: %d deleted, %d left, %v", deleted, left, err)
	}
	clock.Add(oauth.DefaultLinkTTL)
	if deleted, left, err := st.Sweep(ctx, clock.Now()); err != nil || deleted != 0 || left != 2 {
		t.Fatalf("sweep StateTTL after the links' expiry: %d deleted, %d left, %v; want them kept a minute more", deleted, left, err)
	}
	clock.Add(time.Minute)
	if deleted, left, err := st.Sweep(ctx, clock.Now()); err != nil || deleted != 2 || left != 0 {
		t.Fatalf("sweep StateTTL and a minute after the links' expiry: %d deleted, %d left, %v", deleted, left, err)
	}
	for _, kind := range []string{"link", "state"} {
		if files, _ := os.ReadDir(filepath.Join(dir, "token_broker", "consents", kind)); len(files) != 0 {
			t.Errorf("%d %s files left after the sweep", len(files), kind)
		}
	}
}

// countingStore is a refresh token store that counts its saves.
type countingStore struct {
	oauth.Store
	saves atomic.Int64
}

// Save counts the save and stores rt.
func (s *countingStore) Save(ctx context.Context, key string, rt broker.Secret) error {
	s.saves.Add(1)
	return s.Store.Save(ctx, key, rt)
}

// TestStorageLinkClaimedOnce: two instances on one storage folder, each
// with starts of one link; all the callbacks arrive at once, at both:
// exactly one claims the link (under the storage's lock), has its code
// exchanged and saves a refresh token; the others are refused as a used
// link.
func TestStorageLinkClaimedOnce(t *testing.T) {
	ctx := context.Background()
	dir := t.TempDir()
	clock := clocktest.New(time.Date(2030, 1, 2, 3, 4, 5, 0, time.UTC))
	var exchanges atomic.Int64
	bank := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.FormValue("grant_type") != "authorization_code" {
			http.Error(w, `{"error":"unsupported_grant_type"}`, http.StatusBadRequest)
			return
		}
		n := exchanges.Add(1)
		w.Header().Set("Content-Type", "application/json")
		fmt.Fprintf(w, `{"access_token":"at-%d","token_type":"Bearer","expires_in":300,"refresh_token":"rt-%d"}`, n, n)
	}))
	defer bank.Close()
	tokens := &countingStore{Store: &oauth.MemoryStore{}}
	flows := []*oauth.AuthCode{storageFlowWith(t, dir, clock, bank.URL, tokens), storageFlowWith(t, dir, clock, bank.URL, tokens)}
	link, err := flows[0].NewLink(ctx, "acme", "", "")
	if err != nil {
		t.Fatal(err)
	}
	id := mustQuery(t, link.URL, "link")
	const n = 6
	states := make([]string, n)
	for i := range n {
		authURL, _, err := flows[i%2].Start(ctx, id, "cb.partner.example")
		if err != nil {
			t.Fatal(err)
		}
		states[i] = mustQuery(t, authURL, "state")
	}
	errs := make([]error, n)
	var wg sync.WaitGroup
	for i, state := range states {
		wg.Go(func() {
			_, errs[i] = flows[i%2].Callback(ctx, "cb.partner.example", url.Values{"state": {state}, "code": {fmt.Sprintf("code-%d", i)}})
		})
	}
	wg.Wait()
	ok := 0
	for _, err := range errs {
		var ce *oauth.ConsentError
		switch {
		case err == nil:
			ok++
		case !errors.As(err, &ce) || ce.Reason != oauth.ReasonUnknownState:
			t.Errorf("a callback = %v, want success or unknown_state", err)
		}
	}
	if ok != 1 || exchanges.Load() != 1 || tokens.saves.Load() != 1 {
		t.Errorf("%d callbacks succeeded, %d codes exchanged, %d refresh tokens saved; want 1 each", ok, exchanges.Load(), tokens.saves.Load())
	}
}

func mustQuery(t *testing.T, u, name string) string {
	t.Helper()
	pu, err := url.Parse(u)
	if err != nil {
		t.Fatal(err)
	}
	return pu.Query().Get(name)
}
