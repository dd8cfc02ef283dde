package callers

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	jose "github.com/go-jose/go-jose/v4"

	"github.com/tokenbroker/caddy-token-broker/broker/errcode"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/jwttest"
	"github.com/tokenbroker/caddy-token-broker/internal/httpclient"
)

// provisioned makes the policy of c with clock (nil: the real one).
func provisioned(t *testing.T, c *Config, clock *clocktest.Clock) (*Policy, error) {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	t.Cleanup(cancel)
	if clock != nil {
		c.Now = clock.Now
	}
	if c.Allow == nil {
		c.Allow = map[string][]string{"payments": {"acme"}}
	}
	return New(ctx, *c)
}

func mustProvision(t *testing.T, c *Config, clock *clocktest.Clock) *Policy {
	t.Helper()
	p, err := provisioned(t, c, clock)
	if err != nil {
		t.Fatal(err)
	}
	return p
}

// authn runs Authenticate on a request carrying the value in Authorization
// ("" for none).
func authn(p *Policy, authorization string) (string, *Error) {
	r := httptest.NewRequest("GET", "/", nil)
	if authorization != "" {
		r.Header.Set("Authorization", authorization)
	}
	return p.Authenticate(r)
}

// TestCallerKeysRefreshRateLimited: forged tokens
// with a known kid cost at most one key-set fetch per refresh interval,
// made-up kids at most one per unknownKidGap, and a key rotation at the
// issuer is still picked up.
func TestCallerKeysRefreshRateLimited(t *testing.T) {
	iss := startIssuer(t, false, "payments")
	clock := clocktest.New(time.Now())
	p := mustProvision(t, &Config{Issuer: iss.URL, Audience: callerAudience}, clock)
	good := iss.token(t, http.DefaultClient, "payments")

	// refused sends n forged tokens, in parallel or one after the other
	// (go-oidc's RemoteKeySet fetched once per token then).
	refused := func(n int, parallel bool, tok func(i int) string) {
		t.Helper()
		var wg sync.WaitGroup
		var accepted atomic.Int64
		for i := range n {
			wg.Add(1)
			send := func() {
				defer wg.Done()
				if _, cerr := authn(p, "Bearer "+tok(i)); cerr == nil || cerr.Code.Status() != http.StatusUnauthorized {
					accepted.Add(1)
				}
			}
			if parallel {
				go send()
			} else {
				send()
			}
		}
		wg.Wait()
		if accepted.Load() != 0 {
			t.Fatalf("%d forged tokens were not refused with 401", accepted.Load())
		}
	}
	fetches := func(want int64) {
		t.Helper()
		if got := iss.JWKSFetches.Load(); got != want {
			t.Fatalf("key-set fetches = %d, want %d", got, want)
		}
	}

	// 100 forged tokens with the issuer's kid: one fetch (the first
	// verification ever), none after.
	refused(100, false, func(i int) string { return jwttest.Forge(t, good, i, "") })
	fetches(1)
	if sub, cerr := authn(p, "Bearer "+good); cerr != nil || sub != "payments" {
		t.Fatalf("good token: %q %+v", sub, cerr)
	}
	fetches(1)

	// Made-up kids: nothing within unknownKidGap of the last fetch, then
	// one fetch for all of them.
	refused(20, true, func(i int) string { return jwttest.Forge(t, good, i, fmt.Sprintf("made-up-%d", i)) })
	fetches(1)
	clock.Add(unknownKidGap)
	refused(20, true, func(i int) string { return jwttest.Forge(t, good, i, fmt.Sprintf("made-up-again-%d", i)) })
	fetches(2)

	// Known kid: after the interval, one fetch again, then none.
	clock.Add(DefaultKeysRefreshInterval - time.Second)
	refused(100, true, func(i int) string { return jwttest.Forge(t, good, 1000+i, "") })
	fetches(2)
	clock.Add(time.Second)
	refused(100, true, func(i int) string { return jwttest.Forge(t, good, 2000+i, "") })
	fetches(3)

	// Rotation: a token signed with the new key is refused only within
	// unknownKidGap of the last fetch, then accepted after one fetch.
	iss.rotate(t)
	rotated := iss.token(t, http.DefaultClient, "payments")
	if _, cerr := authn(p, "Bearer "+rotated); cerr == nil {
		t.Fatal("a new kid was fetched within unknownKidGap of the last fetch")
	}
	fetches(3)
	clock.Add(unknownKidGap)
	if sub, cerr := authn(p, "Bearer "+rotated); cerr != nil || sub != "payments" {
		t.Fatalf("token signed with the rotated key: %q %+v", sub, cerr)
	}
	fetches(4)
	if iss.Discoveries.Load() != 1 {
		t.Fatalf("discoveries = %d, want 1", iss.Discoveries.Load())
	}

	// Keys older than keysMaxAge are fetched again once, so a key the
	// issuer withdrew stops being trusted.
	clock.Add(keysMaxAge)
	if _, cerr := authn(p, "Bearer "+jwttest.Forge(t, rotated, 1, "")); cerr == nil {
		t.Fatal("forged token accepted")
	}
	fetches(5)
}

// TestCallerWithdrawnKeyRefusedAfterAgedFetch: a JWT verified with keys
// older than keysMaxAge while they are fetched again is not remembered as
// verified: once the fetch brings a key set without the JWT's key (the
// issuer withdrew it), the JWT is refused.
func TestCallerWithdrawnKeyRefusedAfterAgedFetch(t *testing.T) {
	iss := startIssuer(t, false, "payments")
	// The issuer's tokens live 5 minutes (keysMaxAge): the clock starts a
	// minute early so that they are still valid when the keys have aged.
	clock := clocktest.New(time.Now().Add(-time.Minute))
	p := mustProvision(t, &Config{Issuer: iss.URL, Audience: callerAudience}, clock)
	first, second := iss.token(t, http.DefaultClient, "payments"), iss.token(t, http.DefaultClient, "payments")
	if first == second {
		t.Fatal("the issuer gave the same token twice")
	}
	if sub, cerr := authn(p, "Bearer "+first); cerr != nil || sub != "payments" {
		t.Fatalf("a token of the issuer's key: %q %+v", sub, cerr)
	}

	release := make(chan struct{})
	iss.keysHeld.Store(&release)
	clock.Add(keysMaxAge)
	iss.withdraw(t)
	if sub, cerr := authn(p, "Bearer "+second); cerr != nil || sub != "payments" {
		t.Fatalf("while the aged keys are fetched again they serve, got %q %+v", sub, cerr)
	}
	close(release)
	fetchEnded(p.keys)
	if _, cerr := authn(p, "Bearer "+second); cerr == nil || cerr.Code != errcode.CallerUnauthenticated {
		t.Fatalf("a token of the key the issuer withdrew, verified while the aged keys were fetched again: got %+v, want 401 %s",
			cerr, errcode.CallerUnauthenticated)
	}
}

// TestCallerIssuerTrust: an issuer behind TLS with a CA of its own is
// trusted with ca_file only, and jwks_file needs no request at all.
func TestCallerIssuerTrust(t *testing.T) {
	iss := startIssuer(t, true, "payments")
	good := iss.token(t, trusting(t, iss.CAFile), "payments")
	other := startIssuer(t, true)
	plain := startIssuer(t, false, "payments")
	jwksFile := filepath.Join(t.TempDir(), "jwks.json")
	if err := os.WriteFile(jwksFile, plain.jwksJSON(t), 0o600); err != nil {
		t.Fatal(err)
	}
	plainGood := plain.token(t, http.DefaultClient, "payments")

	tests := []struct {
		name       string
		policy     *Config
		token      string
		wantStatus int // 0: accepted
		wantCalls  bool
	}{
		{"ca_file, discovery", &Config{Issuer: iss.URL, CAFile: iss.CAFile}, good, 0, true},
		{"ca_file, jwks_url", &Config{Issuer: iss.URL, CAFile: iss.CAFile, JWKSURL: iss.URL + "/keys"}, good, 0, true},
		{"system roots only", &Config{Issuer: iss.URL}, good, http.StatusServiceUnavailable, false},
		{"another CA", &Config{Issuer: iss.URL, CAFile: other.CAFile}, good, http.StatusServiceUnavailable, false},
		{"another CA, jwks_url", &Config{Issuer: iss.URL, CAFile: other.CAFile, JWKSURL: iss.URL + "/keys"}, good, http.StatusServiceUnavailable, false},
		{"jwks_file", &Config{Issuer: plain.URL, JWKSFile: jwksFile}, plainGood, 0, false},
		{"jwks_file, forged", &Config{Issuer: plain.URL, JWKSFile: jwksFile}, jwttest.Forge(t, plainGood, 1, ""), http.StatusUnauthorized, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			before := iss.JWKSFetches.Load() + iss.Discoveries.Load()
			tt.policy.Audience = callerAudience
			p := mustProvision(t, tt.policy, nil)
			sub, cerr := authn(p, "Bearer "+tt.token)
			switch {
			case tt.wantStatus == 0 && (cerr != nil || sub != "payments"):
				t.Fatalf("refused: %+v", cerr)
			case tt.wantStatus != 0 && (cerr == nil || cerr.Code.Status() != tt.wantStatus):
				t.Fatalf("got %+v, want status %d", cerr, tt.wantStatus)
			}
			if calls := iss.JWKSFetches.Load() + iss.Discoveries.Load() - before; (calls > 0) != tt.wantCalls {
				t.Fatalf("%d discovery and key-set requests served", calls)
			}
		})
	}
	if n := plain.JWKSFetches.Load() + plain.Discoveries.Load(); n != 0 {
		t.Fatalf("jwks_file: %d requests to the issuer", n)
	}
}

func TestCallerPolicyConfigErrors(t *testing.T) {
	dir := t.TempDir()
	write := func(name, content string) string {
		path := filepath.Join(dir, name)
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return path
	}
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	private, _ := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: key, KeyID: "k1", Algorithm: "ES256"}}})
	privateFile := write("private.json", string(private))
	notPEM := write("not.pem", "hello")
	tests := []struct {
		name   string
		policy *Config
		want   string
	}{
		{"header not redacted", &Config{Header: "X-Caller-Token"}, `header "X-Caller-Token"`},
		{"header Cookie", &Config{Header: "Cookie"}, "Caddy's logs redact"},
		{"jwks_file and jwks_url", &Config{JWKSFile: privateFile, JWKSURL: "https://x/keys"}, "drop jwks_url"},
		{"jwks_file and ca_file", &Config{JWKSFile: privateFile, CAFile: notPEM}, "drop jwks_url and ca_file"},
		{"jwks_file private", &Config{JWKSFile: privateFile}, "private or symmetric key"},
		{"jwks_file missing", &Config{JWKSFile: filepath.Join(dir, "nope.json")}, "no such file"},
		{"jwks_file empty set", &Config{JWKSFile: write("empty.json", `{"keys":[]}`)}, "no usable signing key"},
		{"ca_file not PEM", &Config{CAFile: notPEM}, "no PEM certificate"},
		{"negative refresh_interval", &Config{RefreshInterval: -1}, "refresh_interval"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			tt.policy.Issuer, tt.policy.Audience = "https://issuer.example", "token-broker"
			_, err := provisioned(t, tt.policy, nil)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err = %v, want %q", err, tt.want)
			}
		})
	}
	for _, h := range []string{"authorization", "Proxy-Authorization"} {
		if _, err := provisioned(t, &Config{Issuer: "https://i", Audience: "a", Header: h}, nil); err != nil {
			t.Fatalf("header %s: %v", h, err)
		}
	}
}

// TestCallerKeysUnavailableToWaiters: a verification that waits for a
// key-set fetch already running gets what that fetch got: while the issuer
// cannot give its keys and none are cached, the keys are unavailable (503
// caller_keys_unavailable), not a bad token (401), and the fetch's error is
// returned.
func TestCallerKeysUnavailableToWaiters(t *testing.T) {
	_, jwt := signedJWT(t, "")
	down := errors.New("down")
	running := &keysFetch{done: make(chan struct{}), err: down}
	close(running.done)
	k := &keySet{url: "https://issuer.test/keys", interval: DefaultKeysRefreshInterval, now: time.Now, inflight: running}

	var unavailable bool
	_, err := k.VerifySignature(context.WithValue(context.Background(), keysUnavailableKey{}, &unavailable), jwt)
	if !unavailable {
		t.Errorf("the keys-unavailable flag is not set (the caller would get 401, not 503 %s); error: %v", errcode.CallerKeysUnavailable, err)
	}
	if !errors.Is(err, down) {
		t.Errorf("error = %v, want the running fetch's error %q", err, down)
	}
	if !k.tried.IsZero() {
		t.Error("the verification started a key-set fetch of its own instead of waiting for the running one")
	}
}

// TestCallerDiscoveryWaitEndsWithTheRequest: while the issuer's discovery
// is slow, a request that waits for it is answered when its own context
// ends (503 caller_keys_unavailable), not when the discovery does.
func TestCallerDiscoveryWaitEndsWithTheRequest(t *testing.T) {
	arrived, release := make(chan struct{}), make(chan struct{})
	var once sync.Once
	issuer := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		once.Do(func() { close(arrived) })
		select {
		case <-release:
		case <-r.Context().Done():
		}
		http.NotFound(w, r)
	}))
	t.Cleanup(issuer.Close)
	t.Cleanup(func() { close(release) })
	p := mustProvision(t, &Config{Issuer: issuer.URL, Audience: callerAudience}, nil)
	go authn(p, "Bearer a.b.c")
	<-arrived

	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := httptest.NewRequestWithContext(ctx, http.MethodGet, "/", nil)
	r.Header.Set("Authorization", "Bearer a.b.c")
	answered := make(chan *Error, 1)
	go func() {
		_, cerr := p.Authenticate(r)
		answered <- cerr
	}()
	select {
	case cerr := <-answered:
		if cerr == nil || cerr.Code != errcode.CallerKeysUnavailable {
			t.Fatalf("got %+v, want caller_keys_unavailable", cerr)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("a request whose context ended still waits for the discovery")
	}
}

// TestCallerRotatedKidWhileIssuerDown: a JWT whose kid the cached keys
// do not have (the issuer rotated its key) cannot be checked while the
// issuer's key set cannot be fetched: the keys are unavailable (503
// caller_keys_unavailable, the caller retries), not a bad token (401),
// also while the failed fetch is too recent to fetch again. A JWT of a
// cached kid that does not verify stays a bad token.
func TestCallerRotatedKidWhileIssuerDown(t *testing.T) {
	oldKey, _ := signedJWT(t, "old")
	_, rotated := signedJWT(t, "new")
	_, forged := signedJWT(t, "old")
	var down atomic.Bool
	k, clock := servedKeySet(t, context.Background(), oldKey, "old", func(w http.ResponseWriter, _ *http.Request) bool {
		if down.Load() {
			http.Error(w, "maintenance", http.StatusServiceUnavailable)
		}
		return down.Load()
	})
	down.Store(true)
	for _, tt := range []struct {
		name, jwt       string
		after           time.Duration // since the previous verification
		wantUnavailable bool
	}{
		{"rotated kid", rotated, DefaultKeysRefreshInterval, true},
		{"rotated kid, the failed fetch too recent to fetch again", rotated, time.Second, true},
		{"cached kid, bad signature", forged, DefaultKeysRefreshInterval, false},
	} {
		t.Run(tt.name, func(t *testing.T) {
			clock.Add(tt.after)
			var unavailable bool
			_, err := k.VerifySignature(context.WithValue(context.Background(), keysUnavailableKey{}, &unavailable), tt.jwt)
			if err == nil || unavailable != tt.wantUnavailable {
				t.Fatalf("keys unavailable = %v, want %v (error %v)", unavailable, tt.wantUnavailable, err)
			}
		})
	}
}

// TestCallerAgedKeysServeWhileIssuerHangs: once the cached keys are
// older than keysMaxAge, a JWT that they verify does not wait for the
// issuer's key set, which is fetched again in the background: an issuer
// that hangs does not hold the callers' requests.
func TestCallerAgedKeysServeWhileIssuerHangs(t *testing.T) {
	key, jwt := signedJWT(t, "k1")
	var hang atomic.Bool
	release := make(chan struct{})
	k, clock := servedKeySet(t, context.Background(), key, "k1", func(_ http.ResponseWriter, r *http.Request) bool {
		if hang.Load() {
			select {
			case <-release:
			case <-r.Context().Done():
			}
		}
		return hang.Load()
	})
	// Before the issuer's server closes (registered earlier, run later),
	// which waits for the request it holds.
	t.Cleanup(func() {
		close(release)
		fetchEnded(k)
	})
	hang.Store(true)
	clock.Add(keysMaxAge)
	done := make(chan error, 1)
	go func() {
		_, err := k.VerifySignature(context.Background(), jwt)
		done <- err
	}()
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("a JWT of a cached key: %v", err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("the verification waits for the key-set fetch of aged keys from a hanging issuer")
	}
}

// TestCallerKeysFetchEndsWithThePolicy: the background fetch of aged
// keys runs on the policy's context, not on the request's: when the
// policy is unloaded, a fetch from a hanging issuer ends at once instead
// of holding a connection for its 10 s bound.
func TestCallerKeysFetchEndsWithThePolicy(t *testing.T) {
	key, jwt := signedJWT(t, "k1")
	policyCtx, unload := context.WithCancel(context.Background())
	t.Cleanup(unload)
	var hang atomic.Bool
	k, clock := servedKeySet(t, policyCtx, key, "k1", func(_ http.ResponseWriter, r *http.Request) bool {
		if hang.Load() {
			<-r.Context().Done()
		}
		return hang.Load()
	})
	hang.Store(true)
	clock.Add(keysMaxAge)
	if _, err := k.VerifySignature(context.Background(), jwt); err != nil {
		t.Fatalf("a JWT of a cached key: %v", err)
	}
	unload()
	ended := make(chan struct{})
	go func() {
		fetchEnded(k)
		close(ended)
	}()
	select {
	case <-ended:
	case <-time.After(5 * time.Second):
		t.Fatal("the background key-set fetch still runs 5 s after the policy's context ended")
	}
}

// signedJWT returns a new P-256 key and a JWT it signs (ES256, with kid
// when not ""), for subject payments.
func signedJWT(t *testing.T, kid string) (*ecdsa.PrivateKey, string) {
	t.Helper()
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	signer, err := jose.NewSigner(jose.SigningKey{Algorithm: jose.ES256, Key: jose.JSONWebKey{Key: key, KeyID: kid}}, nil)
	if err != nil {
		t.Fatal(err)
	}
	jws, err := signer.Sign([]byte(`{"sub":"payments"}`))
	if err != nil {
		t.Fatal(err)
	}
	jwt, err := jws.CompactSerialize()
	if err != nil {
		t.Fatal(err)
	}
	return key, jwt
}

// fetchEnded waits for the key-set fetch running on k, if any, to end.
func fetchEnded(k *keySet) {
	k.mu.Lock()
	running := k.inflight
	k.mu.Unlock()
	if running != nil {
		<-running.done
	}
}

// servedKeySet returns a keySet, on a settable clock and the policy
// context ctx, of an issuer whose key set holds key's public key as kid,
// fetched once already. Each later fetch is answered by fault when it
// returns true (it wrote the answer, or wrote none), else with the key set.
func servedKeySet(t *testing.T, ctx context.Context, key *ecdsa.PrivateKey, kid string, fault func(http.ResponseWriter, *http.Request) bool) (*keySet, *clocktest.Clock) {
	t.Helper()
	set, err := json.Marshal(jose.JSONWebKeySet{Keys: []jose.JSONWebKey{{Key: &key.PublicKey, KeyID: kid, Algorithm: "ES256", Use: "sig"}}})
	if err != nil {
		t.Fatal(err)
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !fault(w, r) {
			_, _ = w.Write(set)
		}
	}))
	t.Cleanup(srv.Close)
	clock := clocktest.New(time.Now())
	k := &keySet{ctx: ctx, url: srv.URL, client: srv.Client(), interval: DefaultKeysRefreshInterval, now: clock.Now}
	if err := k.refresh(context.Background(), false, kid); err != nil {
		t.Fatal(err)
	}
	return k, clock
}

// TestCallerDiscoveryAnswerBounded: a failed discovery whose answer is
// huge gives an error of bounded length, for the log (go-oidc quotes the
// whole body it read).
func TestCallerDiscoveryAnswerBounded(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		w.WriteHeader(http.StatusInternalServerError)
		chunk := []byte(strings.Repeat("x", 64<<10))
		for range 64 { // 4 MiB, unless the reader stops first
			if _, err := w.Write(chunk); err != nil {
				return
			}
		}
	}))
	t.Cleanup(srv.Close)
	_, jwt := signedJWT(t, "k1")
	p := mustProvision(t, &Config{Issuer: srv.URL, Audience: callerAudience}, nil)
	_, cerr := authn(p, "Bearer "+jwt)
	if cerr == nil || cerr.Code != errcode.CallerKeysUnavailable || len(cerr.Error()) > 1000 {
		t.Fatalf("error of %d bytes (%+v), want caller_keys_unavailable of at most 1000 bytes", len(fmt.Sprint(cerr)), cerr)
	}
}

// TestCallerKeySetOverTheLimit: a key set over httpclient.MaxResponseBytes
// fails with a *httpclient.TooLargeError naming the host and the status,
// through the policy's client (httpclient.LimitBody) and through a plain
// one, never as a key set cut short that is not a JWK set.
func TestCallerKeySetOverTheLimit(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		fmt.Fprintf(w, `{"keys":[],"pad":%q}`, strings.Repeat("x", httpclient.MaxResponseBytes))
	}))
	t.Cleanup(srv.Close)
	for _, tc := range []struct {
		name   string
		client *http.Client
	}{
		{"the policy's client", &http.Client{Transport: httpclient.LimitBody(nil)}},
		{"a plain client", srv.Client()},
	} {
		t.Run(tc.name, func(t *testing.T) {
			k := &keySet{url: srv.URL, client: tc.client, interval: DefaultKeysRefreshInterval, now: time.Now}
			_, err := k.fetch(context.Background())
			var tl *httpclient.TooLargeError
			if !errors.As(err, &tl) || tl.Host != httpclient.Host(srv.URL) || tl.Status != http.StatusOK {
				t.Fatalf("err = %v, want a *httpclient.TooLargeError for %s, status 200", err, httpclient.Host(srv.URL))
			}
			if msg := err.Error(); strings.Contains(msg, "JWK set") || strings.Contains(msg, "provider") {
				t.Errorf("error %q reads as a malformed key set or names a provider", msg)
			}
		})
	}
}

// TestNilPolicyAdmitsEveryCaller checks that a nil policy (no caller
// policy configured) authenticates every request and allows every merchant.
func TestNilPolicyAdmitsEveryCaller(t *testing.T) {
	var p *Policy
	sub, err := p.Authenticate(httptest.NewRequest("GET", "/", nil))
	if sub != "" || err != nil {
		t.Fatalf("Authenticate = %q, %v; want \"\", nil", sub, err)
	}
	if !p.Allows("", "acme") || p.Header() != "" {
		t.Fatalf("Allows = %v, Header = %q; want true, \"\"", p.Allows("", "acme"), p.Header())
	}
}
