package broker

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
	"unsafe"
)

// SourceFunc adapts a function to the Source interface.
type SourceFunc func(ctx context.Context, req Request) (Token, error)

// Token calls f.
func (f SourceFunc) Token(ctx context.Context, req Request) (Token, error) { return f(ctx, req) }

// fakeClock is a clock that moves only when told to.
type fakeClock struct {
	mu sync.Mutex
	t  time.Time
}

func newFakeClock() *fakeClock { return &fakeClock{t: time.Date(2026, 11, 23, 12, 0, 0, 0, time.UTC)} }

func (c *fakeClock) Now() time.Time {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.t
}

func (c *fakeClock) Add(d time.Duration) {
	c.mu.Lock()
	c.t = c.t.Add(d)
	c.mu.Unlock()
}

// countingSource issues numbered tokens that live `life` on the fake clock.
type countingSource struct {
	clock *fakeClock
	life  time.Duration
	calls atomic.Int64

	mu   sync.Mutex
	gate chan struct{} // when non-nil, each call waits for it to close
	err  error
}

func (s *countingSource) set(gate chan struct{}, err error) {
	s.mu.Lock()
	s.gate, s.err = gate, err
	s.mu.Unlock()
}

func (s *countingSource) Token(ctx context.Context, req Request) (Token, error) {
	n := s.calls.Add(1)
	s.mu.Lock()
	gate, err := s.gate, s.err
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return Token{}, ctx.Err()
		}
	}
	if err != nil {
		return Token{}, err
	}
	return Token{Value: Secret(fmt.Sprintf("tok-%s-%d", req.Merchant, n)), Type: "Bearer", Expiry: s.clock.Now().Add(s.life)}, nil
}

// fetchObserver signals every completed fetch.
type fetchObserver struct {
	nopObserver
	fetched chan error
	mu      sync.Mutex
	results map[Result]int
}

func newObserver() *fetchObserver {
	return &fetchObserver{fetched: make(chan error, 100), results: map[Result]int{}}
}

func (o *fetchObserver) Lookup(_ *Binding, r Result) {
	o.mu.Lock()
	o.results[r]++
	o.mu.Unlock()
}

func (o *fetchObserver) Fetched(_ context.Context, _ *Binding, _ Token, _ time.Duration, _ bool, err error) {
	o.fetched <- err
}

func (o *fetchObserver) count(r Result) int {
	o.mu.Lock()
	defer o.mu.Unlock()
	return o.results[r]
}

func TestConcurrentFirstRequestsFetchOnce(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: time.Hour, gate: make(chan struct{})}
	br := New(Options{Now: clock.Now})
	b := NewBinding("nuapay#1", src, Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"a"}})

	const n = 200
	var started, done sync.WaitGroup
	started.Add(n)
	done.Add(n)
	tokens := make([]string, n)
	errs := make([]error, n)
	for i := range n {
		go func() {
			defer done.Done()
			started.Done()
			tok, err := br.Token(context.Background(), b)
			tokens[i], errs[i] = tok.Value.Reveal(), err
		}()
	}
	started.Wait()
	close(src.gate) // release the one fetch (and any other, which would fail the test)
	done.Wait()
	if got := src.calls.Load(); got != 1 {
		t.Fatalf("token API calls = %d, want 1", got)
	}
	for i := range n {
		if errs[i] != nil || tokens[i] != "tok-acme-1" {
			t.Fatalf("request %d: token %q, err %v", i, tokens[i], errs[i])
		}
	}
}

// A lookup that found no cached token, and whose own fetch starts only
// after another fetch of the key cached one, takes that token: it fetches
// nothing and is reported as a hit, not a miss.
func TestFetchAfterAnotherCachedTakesTheCachedToken(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now})
	t.Cleanup(br.Close)
	req := Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"a"}}
	first, late := NewBinding("nuapay#1", src, req), NewBinding("nuapay#1", src, req)
	if _, r, err := br.Get(context.Background(), first); err != nil || r != Miss {
		t.Fatalf("first lookup: %v, %v; want a miss", r, err)
	}
	// late looked before the first fetch ended (its binding holds no
	// entry); its fetch starts now.
	got, err := br.await(context.Background(), late, nil, "a token")
	if err != nil || got.err != nil {
		t.Fatalf("await: %v %v", err, got.err)
	}
	if !got.cached || got.joined || got.entry == nil || got.entry.Token().Value.Reveal() != "tok-acme-1" {
		t.Fatalf("await = cached %v joined %v entry %v; want the cached token, taken by its own fetch", got.cached, got.joined, got.entry)
	}
	if n := src.calls.Load(); n != 1 {
		t.Fatalf("token API calls = %d, want 1", n)
	}
	if late.current.Load() != got.entry {
		t.Fatal("the late binding does not remember the entry it was served")
	}
}

func TestRefreshAheadAndExpiry(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: 100 * time.Second}
	obs := newObserver()
	br := New(Options{Now: clock.Now})
	b := NewBinding("nuapay#1", src, Request{Merchant: "acme", Organisation: "o", Scopes: []string{"a"}})
	b.Observer = obs
	ctx := context.Background()

	steps := []struct {
		name      string
		advance   time.Duration
		gate      bool // block the refresh so that many lookups see it in flight
		lookups   int
		want      string
		wantRes   Result
		wantCalls int64
	}{
		{"first request fetches", 0, false, 1, "tok-acme-1", Miss, 1},
		{"before the window: hit", 74 * time.Second, false, 5, "tok-acme-1", Hit, 1},
		// A token minted for a caller is planned at random before 97.5s
		// (its life less late, max(100s/40, Leeway+1s)).
		{"at the window's end: old token served, one refresh", 23500 * time.Millisecond, true, 50, "tok-acme-1", RefreshAhead, 2},
		{"after the refresh: new token", 0, false, 1, "tok-acme-2", Hit, 2},
		{"past the expiry of token 2: fetch anew", 200 * time.Second, false, 1, "tok-acme-3", Miss, 3},
	}
	for _, st := range steps {
		clock.Add(st.advance)
		gate := make(chan struct{})
		if st.gate {
			src.set(gate, nil)
		}
		before := obs.count(st.wantRes)
		for i := range st.lookups {
			e, res, err := br.Get(ctx, b)
			if err != nil {
				t.Fatalf("%s: %v", st.name, err)
			}
			if got := e.Token().Value.Reveal(); got != st.want {
				t.Fatalf("%s: lookup %d got %s, want %s", st.name, i, got, st.want)
			}
			if !e.Token().ValidAt(clock.Now(), 0) {
				t.Fatalf("%s: expired token returned", st.name)
			}
			if i == 0 && res != st.wantRes {
				t.Fatalf("%s: result %s, want %s", st.name, res, st.wantRes)
			}
		}
		if st.gate {
			if got := obs.count(RefreshAhead) - before; got != 1 {
				t.Fatalf("%s: %d lookups started a refresh, want 1", st.name, got)
			}
			close(gate)
			src.set(nil, nil)
		}
		if st.wantRes != Hit || st.gate {
			if err := <-obs.fetched; err != nil {
				t.Fatalf("%s: fetch failed: %v", st.name, err)
			}
		}
		if got := src.calls.Load(); got != st.wantCalls {
			t.Fatalf("%s: token API calls = %d, want %d", st.name, got, st.wantCalls)
		}
	}
}

func TestExpiredTokenNeverReturned(t *testing.T) {
	clock := newFakeClock()
	tests := []struct {
		name string
		life time.Duration
	}{
		{"already expired", -time.Second},
		{"expires now", 0},
		{"inside the leeway", 500 * time.Millisecond},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := &countingSource{clock: clock, life: tt.life}
			br := New(Options{Now: clock.Now, Leeway: time.Second})
			b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})
			if _, err := br.Token(context.Background(), b); !errors.Is(err, ErrExpiredToken) {
				t.Fatalf("err = %v, want ErrExpiredToken", err)
			}
		})
	}
	// A cached token that reaches its leeway is fetched anew, not served.
	src := &countingSource{clock: clock, life: 10 * time.Second}
	br := New(Options{Now: clock.Now, Leeway: time.Second, RefreshWindow: -1})
	b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})
	if _, err := br.Token(context.Background(), b); err != nil {
		t.Fatal(err)
	}
	clock.Add(9500 * time.Millisecond)
	tok, err := br.Token(context.Background(), b)
	if err != nil || tok.Value.Reveal() != "tok-acme-2" {
		t.Fatalf("token %s, err %v; want a new token", tok.Value.Reveal(), err)
	}
}

func TestScopeSetsKeyTheCache(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: time.Hour}
	br := New(Options{Now: clock.Now})
	get := func(scopes ...string) string {
		tok, err := br.Token(context.Background(), NewBinding("s", src, Request{Merchant: "acme", Organisation: "o", Scopes: scopes}))
		if err != nil {
			t.Fatal(err)
		}
		return tok.Value.Reveal()
	}
	aisp := get("openbanking_aisp")
	pisp := get("openbanking_pisp")
	both := get("openbanking_aisp", "openbanking_pisp")
	bothReordered := get("openbanking_pisp", "openbanking_aisp", "openbanking_pisp")
	if aisp == pisp || aisp == both || pisp == both {
		t.Fatalf("different scope sets share a token: %s %s %s", aisp, pisp, both)
	}
	if both != bothReordered {
		t.Fatalf("same scope set in another order got another token: %s vs %s", both, bothReordered)
	}
	if got := src.calls.Load(); got != 3 {
		t.Fatalf("token API calls = %d, want 3", got)
	}
}

func TestWaiterKeepsItsOwnContext(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: time.Hour, gate: make(chan struct{})}
	br := New(Options{Now: clock.Now})
	b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})

	impatient, cancel := context.WithCancel(context.Background())
	errc := make(chan error)
	go func() { _, err := br.Token(impatient, b); errc <- err }()
	patient := make(chan string)
	go func() {
		tok, err := br.Token(context.Background(), b)
		if err != nil {
			t.Error(err)
		}
		patient <- tok.Value.Reveal()
	}()
	for src.calls.Load() == 0 {
		time.Sleep(time.Millisecond) // wait for the fetch to start, not for time to pass
	}
	cancel()
	if err := <-errc; !errors.Is(err, context.Canceled) {
		t.Fatalf("cancelled waiter: err = %v", err)
	}
	close(src.gate)
	if got := <-patient; got != "tok-acme-1" {
		t.Fatalf("patient waiter got %q", got)
	}
}

func TestFailedRefreshKeepsServingAndRetriesLater(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: 1000 * time.Second}
	obs := newObserver()
	br := New(Options{Now: clock.Now, FailureTTL: 5 * time.Second, MaxAttempts: 1})
	b := NewBinding("s", src, Request{Merchant: "acme", Scopes: []string{"a"}})
	b.Observer = obs
	ctx := context.Background()
	e, _, err := br.Get(ctx, b)
	if err != nil {
		t.Fatal(err)
	}
	<-obs.fetched
	src.set(nil, &APIError{Provider: "nuapay", StatusCode: 503})
	clock.Add(e.RefreshAt().Sub(clock.Now())) // at most 975s: 25s left
	for range 3 {
		if tok, err := br.Token(ctx, b); err != nil || tok.Value.Reveal() != "tok-acme-1" {
			t.Fatalf("token %s, err %v", tok.Value.Reveal(), err)
		}
	}
	if err := <-obs.fetched; err == nil {
		t.Fatal("refresh should have failed")
	}
	// wait for the refresh goroutine to record its failure
	for {
		if v, ok := br.cache.Get(b.Key()); ok && !v.(*Entry).refreshing.Load() {
			break
		}
		time.Sleep(time.Millisecond)
	}
	for range 3 {
		br.Token(ctx, b) // inside the failure memory: no new attempt
	}
	if got := src.calls.Load(); got != 2 {
		t.Fatalf("calls = %d, want 2 (no retry while the failure memory holds)", got)
	}
	src.set(nil, nil)
	clock.Add(6 * time.Second)
	br.Token(ctx, b)
	if err := <-obs.fetched; err != nil {
		t.Fatal(err)
	}
	if tok, _ := br.Token(ctx, b); tok.Value.Reveal() != "tok-acme-3" {
		t.Fatalf("after recovery got %s", tok.Value.Reveal())
	}
}

func TestSecretNeverPrints(t *testing.T) {
	tok := Token{Value: "super-secret-token", Expiry: time.Now()}
	for _, s := range []string{
		fmt.Sprint(tok), fmt.Sprintf("%v %+v %#v %s %q", tok, tok, tok, tok.Value, tok.Value),
	} {
		if contains(s, "super-secret") {
			t.Fatalf("token leaked: %s", s)
		}
	}
	if tok.Fingerprint() != Fingerprint("super-secret-token") || len(tok.Fingerprint()) != 8 {
		t.Fatalf("fingerprint %q", tok.Fingerprint())
	}
}

func contains(s, sub string) bool {
	for i := 0; i+len(sub) <= len(s); i++ {
		if s[i:i+len(sub)] == sub {
			return true
		}
	}
	return false
}

// Two bindings with the same key (two routes, same scopes) share the
// token; one binding's refresh is seen by the other as a hit, and a purge
// by one is seen by the other.
func TestBindingsSharingAKey(t *testing.T) {
	clock := newFakeClock()
	src := &countingSource{clock: clock, life: 100 * time.Second}
	br := New(Options{Now: clock.Now, RefreshWindow: -1})
	req := Request{Merchant: "acme", Organisation: "o", Scopes: []string{"a"}}
	b1, b2 := NewBinding("s", src, req), NewBinding("s", src, req)
	ctx := context.Background()
	steps := []struct {
		name    string
		advance time.Duration
		b       *Binding
		purge   bool
		want    string
		wantRes Result
	}{
		{"b1 fetches", 0, b1, false, "tok-acme-1", Miss},
		{"b2 shares it", 0, b2, false, "tok-acme-1", Hit},
		{"expired: b1 fetches anew", 150 * time.Second, b1, false, "tok-acme-2", Miss},
		{"b2 sees the new token as a hit", 0, b2, false, "tok-acme-2", Hit},
		{"b2 purges it, b1 fetches anew", 0, b1, true, "tok-acme-3", Miss},
		{"b2 sees token 3", 0, b2, false, "tok-acme-3", Hit},
	}
	for _, st := range steps {
		clock.Add(st.advance)
		if st.purge {
			cur, _, _ := br.Get(ctx, b2)
			if br.Reject(b2, cur.Token().Value) != RejectionPurged {
				t.Fatalf("%s: purge failed", st.name)
			}
		}
		e, res, err := br.Get(ctx, st.b)
		if err != nil || e.Token().Value.Reveal() != st.want || res != st.wantRes {
			t.Fatalf("%s: got %v %s %v, want %s %s", st.name, e, res, err, st.want, st.wantRes)
		}
	}
	br.Close()
	if _, res, _ := br.Get(ctx, b1); res != Miss {
		t.Fatalf("after Close: %s, want a miss", res)
	}
}

type perMerchantSource struct{ *countingSource }

func (perMerchantSource) PerMerchant() bool { return true }

// Merchants of a refresh-token source never share a token, even with the
// same organisation, scopes and audience; client-credentials merchants do.
func TestPerMerchantSourcesKeyByMerchant(t *testing.T) {
	clock := newFakeClock()
	tests := []struct {
		name      string
		src       Source
		wantShare bool
	}{
		{"client credentials", &countingSource{clock: clock, life: time.Hour}, true},
		{"refresh token", perMerchantSource{&countingSource{clock: clock, life: time.Hour}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			br := New(Options{Now: clock.Now})
			a := NewBinding("bank#1", tt.src, Request{Merchant: "acme", Scopes: []string{"accounts"}})
			b := NewBinding("bank#1", tt.src, Request{Merchant: "globex", Scopes: []string{"accounts"}})
			ta, _ := br.Token(context.Background(), a)
			tb, _ := br.Token(context.Background(), b)
			if shared := ta.Value == tb.Value; shared != tt.wantShare || (a.Key() == b.Key()) != tt.wantShare {
				t.Fatalf("acme %s, globex %s: shared=%v, want %v", ta.Value.Reveal(), tb.Value.Reveal(), shared, tt.wantShare)
			}
		})
	}
}

// A 429 throttles one client: it is remembered for its key but does not
// count towards the provider's breaker; 5xx do.
func TestBreakerCountsOnlyProviderFailures(t *testing.T) {
	for _, tt := range []struct {
		name   string
		status int
		want   BreakerState
	}{
		{"429s leave it closed", 429, BreakerClosed},
		{"503s open it", 503, BreakerOpen},
		{"401s leave it closed", 401, BreakerClosed},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock := newFakeClock()
			src := &countingSource{clock: clock, life: time.Hour}
			src.set(nil, &APIError{Provider: "nuapay", StatusCode: tt.status, RetryAfter: 3 * time.Hour})
			br := New(Options{Now: clock.Now, MaxAttempts: 1, BreakerThreshold: 3, Sleep: func(context.Context, time.Duration) error { return nil }})
			for i := range 6 {
				b := NewBinding("s", src, Request{Merchant: fmt.Sprintf("m%d", i), Organisation: fmt.Sprint(i), Scopes: []string{"a"}})
				br.Token(context.Background(), b)
			}
			if got := br.SourceHealth("s").Breaker; got != tt.want {
				t.Fatalf("breaker %s, want %s", got, tt.want)
			}
			// Failure memory never exceeds MaxRetryAfterMemory, whatever
			// Retry-After said.
			b := NewBinding("s", src, Request{Merchant: "m0", Organisation: "0", Scopes: []string{"a"}})
			clock.Add(MaxRetryAfterMemory + time.Second)
			src.set(nil, nil)
			if tt.want == BreakerClosed {
				if _, err := br.Token(context.Background(), b); err != nil {
					t.Fatalf("MaxRetryAfterMemory later: %v, want the failure forgotten", err)
				}
			}
		})
	}
}

// entryShareRuns numbers the runs of TestEntrySharesScopesAndType.
var entryShareRuns atomic.Int64

// TestEntrySharesScopesAndType: a cached token whose granted scopes are
// the binding's shares the binding's slice (each run asks for a scope of
// its own), and the tokens of two merchants of type Bearer share that
// string: fewer heap objects and bytes per cached token. Scopes that
// differ are kept as granted.
func TestEntrySharesScopesAndType(t *testing.T) {
	run := fmt.Sprintf("run-%d", entryShareRuns.Add(1)) // sorts after "payments"
	asked := []string{"payments", "accounts", run}
	tests := []struct {
		name      string
		granted   []string
		wantShare bool
	}{
		{"same scopes", []string{"accounts", "payments", run}, true},
		{"other scopes", []string{"accounts"}, false},
		{"none granted", nil, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			src := SourceFunc(func(_ context.Context, req Request) (Token, error) {
				var scopes []string
				for _, s := range tt.granted {
					scopes = append(scopes, strings.Clone(s)) // as decoded from JSON
				}
				return Token{Value: "tok-" + Secret(req.Organisation), Type: strings.Clone("Bearer"),
					Expiry: time.Now().Add(time.Hour), Scopes: scopes}, nil
			})
			br := New(Options{})
			defer br.Close()
			b := NewBinding("src", src, Request{Merchant: "m1", Organisation: "org1", Scopes: asked})
			e, _, err := br.Get(context.Background(), b)
			if err != nil {
				t.Fatal(err)
			}
			got := e.Token()
			if !slices.Equal(got.Scopes, tt.granted) {
				t.Fatalf("scopes %q, want %q", got.Scopes, tt.granted)
			}
			shared := len(got.Scopes) > 0 && &got.Scopes[0] == &b.Scopes[0]
			if shared != tt.wantShare {
				t.Errorf("scopes shared with the binding: %t, want %t", shared, tt.wantShare)
			}
			if got.Type != "Bearer" {
				t.Errorf("type %q, want Bearer", got.Type)
			}
			b2 := NewBinding("src", src, Request{Merchant: "m2", Organisation: "org2", Scopes: asked})
			e2, _, err := br.Get(context.Background(), b2)
			if err != nil {
				t.Fatal(err)
			}
			if got2 := e2.Token(); unsafe.StringData(got2.Type) != unsafe.StringData(got.Type) {
				t.Errorf("two merchants' tokens of type Bearer do not share its string")
			}
		})
	}
}
