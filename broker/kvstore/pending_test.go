package kvstore

import (
	"context"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/certmagic"

	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
)

// storageFlow is a consent flow keeping its links and states in the
// file-system storage at dir: one per instance.
func storageFlow(t *testing.T, dir string, clock *clocktest.Clock) *oauth.AuthCode {
	t.Helper()
	src, err := oauth.NewRefreshToken(oauth.Config{Name: "bank", TokenURL: "https://bank.example/token", ClientID: "c", ClientSecret: "s", Now: clock.Now}, oauth.NewMemoryStore())
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
	clock.Add(oauth.StateTTL) // the two states expire; the links expired and are kept StateTTL longer
	if deleted, left, err := st.Sweep(ctx, clock.Now()); err != nil || deleted != 2 || left != 2 {
		t.Fatalf("sweep after the states' expiry: %d deleted, %d left, %v", deleted, left, err)
	}
	clock.Add(oauth.DefaultLinkTTL)
	if deleted, left, err := st.Sweep(ctx, clock.Now()); err != nil || deleted != 2 || left != 0 {
		t.Fatalf("sweep StateTTL after the links' expiry: %d deleted, %d left, %v", deleted, left, err)
	}
	for _, kind := range []string{"link", "state"} {
		if files, _ := os.ReadDir(filepath.Join(dir, "token_broker", "consents", kind)); len(files) != 0 {
			t.Errorf("%d %s files left after the sweep", len(files), kind)
		}
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
