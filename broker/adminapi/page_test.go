package adminapi

import (
	"context"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"slices"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
)

// perMerchantSource is a provider that issues every merchant a token of
// its own, valid for an hour.
type perMerchantSource struct{}

func (perMerchantSource) Token(_ context.Context, req broker.Request) (broker.Token, error) {
	return broker.Token{Value: broker.Secret("at-" + req.Merchant), Type: "Bearer", Expiry: time.Now().Add(time.Hour)}, nil
}

func (perMerchantSource) PerMerchant() bool { return true }

// listPage is a page of either list: the merchant of each row, and next.
type listPage struct {
	Tokens    []struct{ Merchant string } `json:"tokens"`
	Merchants []struct{ Merchant string } `json:"merchants"`
	Next      *string                     `json:"next"`
}

// getPage answers GET path and returns the merchant of each row and the
// next ("" when absent; a next present but empty fails).
func getPage(t *testing.T, path string, in *Instance) (merchants []string, next string) {
	t.Helper()
	rec := httptest.NewRecorder()
	if err := Serve(rec, httptest.NewRequest(http.MethodGet, path, nil), in); err != nil || rec.Code != http.StatusOK {
		t.Fatalf("GET %s: %v, %d %s", path, err, rec.Code, rec.Body)
	}
	var p listPage
	if err := json.Unmarshal(rec.Body.Bytes(), &p); err != nil {
		t.Fatalf("GET %s: %v: %s", path, err, rec.Body)
	}
	for _, r := range append(p.Tokens, p.Merchants...) {
		merchants = append(merchants, r.Merchant)
	}
	if p.Next != nil && *p.Next == "" {
		t.Fatalf("GET %s: next is present but empty: %s", path, rec.Body)
	}
	if p.Next != nil {
		next = *p.Next
	}
	return merchants, next
}

// TestTokensPages: GET /token_broker/tokens answers a page of merchants
// sorted by id, every token of a merchant on the same page (limit counts
// merchants), next naming the last merchant of a page when more remain
// and absent on the last; 100 merchants by default.
func TestTokensPages(t *testing.T) {
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	pisp := broker.NewProfile("bank#1", perMerchantSource{}, []string{"pisp"}, "", 0)
	aisp := broker.NewProfile("bank#1", perMerchantSource{}, []string{"aisp"}, "", 0)
	var ids []string
	for i := range opstate.DefaultLimit + 5 {
		id := fmt.Sprintf("m-%03d", i)
		ids = append(ids, id)
		profiles := []*broker.Profile{pisp}
		if i == 1 || i == 2 {
			profiles = append(profiles, aisp) // two tokens
		}
		for _, p := range profiles {
			if _, _, err := br.Get(context.Background(), broker.NewBindingFor(p, id, "org-"+id)); err != nil {
				t.Fatal(err)
			}
		}
	}
	in := &Instance{Broker: br, Logger: zap.NewNop()}
	for _, tt := range []struct {
		query string
		want  []string
		next  string
	}{
		{"?limit=2", []string{"m-000", "m-001", "m-001"}, "m-001"},
		{"?after=m-001&limit=1", []string{"m-002", "m-002"}, "m-002"},
		{"?after=m-002&limit=2", []string{"m-003", "m-004"}, "m-004"},
		{"?after=m-100&limit=1000", []string{"m-101", "m-102", "m-103", "m-104"}, ""},
		{"?after=m-104", nil, ""},
		{"?merchant=m-001&limit=1", []string{"m-001", "m-001"}, ""},
		{"?merchant=m-001&after=m-001", nil, ""},
	} {
		t.Run(tt.query, func(t *testing.T) {
			got, next := getPage(t, "/token_broker/tokens"+tt.query, in)
			if !slices.Equal(got, tt.want) || next != tt.next {
				t.Fatalf("%v, next %q; want %v, next %q", got, next, tt.want, tt.next)
			}
		})
	}
	t.Run("default", func(t *testing.T) {
		got, next := getPage(t, "/token_broker/tokens", in)
		if len(slices.Compact(got)) != opstate.DefaultLimit || next != ids[opstate.DefaultLimit-1] {
			t.Fatalf("%d merchants, next %q; want %d, next %q", len(slices.Compact(got)), next, opstate.DefaultLimit, ids[opstate.DefaultLimit-1])
		}
	})
}

// countingStore is a refresh token store that counts its Loads.
type countingStore struct {
	oauth.Store
	loads atomic.Int64
}

func (s *countingStore) Load(ctx context.Context, key string) (broker.Secret, error) {
	s.loads.Add(1)
	return s.Store.Load(ctx, key)
}

// TestConsentMerchantsPages: GET /token_broker/consent/merchants answers
// a page of the merchants sorted by id (of the provider asked for), next
// naming the last when more remain, and reads from the store the refresh
// tokens of that page's merchants only.
func TestConsentMerchantsPages(t *testing.T) {
	reg := &config.Registry{Providers: map[string]*config.Provider{}, Merchants: map[string]*config.Merchant{}}
	stores := map[string]*countingStore{}
	for _, name := range []string{"bank", "other"} {
		stores[name] = &countingStore{Store: &oauth.MemoryStore{}}
		src, err := oauth.NewRefreshToken(oauth.Config{Name: name, TokenURL: "https://" + name + ".example/token", ClientID: "c", ClientSecret: "s"}, stores[name])
		if err != nil {
			t.Fatal(err)
		}
		reg.Providers[name] = &config.Provider{Name: name, Source: src}
	}
	for i := range 250 {
		name := "bank"
		if i%2 == 1 {
			name = "other"
		}
		id := fmt.Sprintf("m-%03d", i)
		reg.Merchants[id] = &config.Merchant{ID: id, Terms: &config.Terms{Provider: name}}
	}
	br := broker.New(broker.Options{})
	t.Cleanup(br.Close)
	in := &Instance{Registry: reg, Broker: br, Logger: zap.NewNop()}
	for _, tt := range []struct {
		query       string
		first, last string
		n           int
		next        string
		bank, other int64 // the store reads
	}{
		{"", "m-000", "m-099", 100, "m-099", 50, 50},
		{"?after=m-099&limit=3", "m-100", "m-102", 3, "m-102", 2, 1},
		{"?after=m-200&limit=1000", "m-201", "m-249", 49, "", 24, 25},
		{"?provider=other&after=m-010&limit=2", "m-011", "m-013", 2, "m-013", 0, 2},
		{"?provider=bank&after=m-240", "m-242", "m-248", 4, "", 4, 0},
		{"?after=m-249", "", "", 0, "", 0, 0},
	} {
		t.Run(tt.query, func(t *testing.T) {
			for _, s := range stores {
				s.loads.Store(0)
			}
			got, next := getPage(t, "/token_broker/consent/merchants"+tt.query, in)
			if len(got) != tt.n || tt.n > 0 && (got[0] != tt.first || got[len(got)-1] != tt.last) || !slices.IsSorted(got) || next != tt.next {
				t.Fatalf("%d merchants %v, next %q; want %d from %s to %s, next %q", len(got), got, next, tt.n, tt.first, tt.last, tt.next)
			}
			if b, o := stores["bank"].loads.Load(), stores["other"].loads.Load(); b != tt.bank || o != tt.other {
				t.Fatalf("the stores were read %d and %d times; want %d and %d (the page's merchants)", b, o, tt.bank, tt.other)
			}
		})
	}
}
