package reload

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"go.uber.org/zap"
	"go.uber.org/zap/zaptest/observer"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/fleet"
	"github.com/tokenbroker/caddy-token-broker/broker/nuapay"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
	"github.com/tokenbroker/caddy-token-broker/integration/clocktest"
	"github.com/tokenbroker/caddy-token-broker/integration/configtest"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
	"github.com/tokenbroker/caddy-token-broker/internal/seal"
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
	load := configtest.Reloader(t, "merchants.toml")
	parse := func(secret string) *config.Registry {
		t.Helper()
		reg, err := load([]byte(toml), config.Options{
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
	pb.SecretsSeen(new(Owner), old, zap.NewNop())
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
	reloadCore, reloadLogs := observer.New(zap.InfoLevel)
	pb.SecretsSeen(new(Owner), rotated, zap.New(reloadCore)) // what Provision does on the reload, with its config's logger
	if got := reloadLogs.FilterMessage("provider secret changed: its remembered failures are forgotten").Len(); got != 1 {
		t.Fatalf("the reloading config's logger has %d lines saying the secret changed, want 1", got)
	}
	if err := get(pb, rotated); err != nil {
		t.Fatalf("after rotation and reload: %v, want a token from the new secret", err)
	}
	if calls.Load() != 2 {
		t.Fatalf("token API calls = %d, want 2", calls.Load())
	}
	// A reload without a change forgets nothing: the credential refused
	// again (the partner revoked it) stays held.
	valid.Store("newer-secret")
	pb.PurgeMatching(func(*broker.Binding) bool { return true })
	if err := get(pb, rotated); err == nil || !strings.Contains(err.Error(), "invalid_client") {
		t.Fatalf("with the new secret revoked: %v, want invalid_client", err)
	}
	pb.SecretsSeen(new(Owner), parse("new-secret"), zap.New(reloadCore))
	if got := reloadLogs.FilterMessage("provider secret changed: its remembered failures are forgotten").Len(); got != 1 {
		t.Errorf("after a reload without a change, %d lines say the secret changed, want the rotation's 1", got)
	}
	if h := pb.SourceHealth(pn.ID); h.BackoffUntil.IsZero() {
		t.Error("a reload without a change forgot the refused credential")
	}
	if err := get(pb, rotated); err == nil || calls.Load() != 3 {
		t.Errorf("after a reload without a change: %v, %d token API calls; want the refusal remembered, 3 calls", err, calls.Load())
	}
}

// TestSecretsSeenPerRegistry: the app's registry and a handler's own,
// each in its own folder, with a provider of one name and settings but
// their own partner API keys, shown by each config of a reload after the
// other: neither is taken for a rotation of the other (no failures
// forgotten, nothing logged), and the source a revocation falls back on
// for each is its own registry's. What a config showed goes once no
// config that showed it is left (registries a reload dropped, the last
// config at shutdown).
func TestSecretsSeenPerRegistry(t *testing.T) {
	load := func(key string) (*config.Registry, *config.Provider) {
		t.Helper()
		reg := nuapayRegistry(t, configtest.Reloader(t, "merchants.toml"), "https://gatekeeper.example", key)
		return reg, reg.Providers["nuapay"]
	}
	core, logs := observer.New(zap.InfoLevel)
	pb := &Broker{Broker: broker.New(broker.Options{}), Logger: zap.NewNop()}
	t.Cleanup(pb.Close)
	app, pa := load("partner-a")
	own, po := load("partner-b")
	config1, config2, config3 := new(Owner), new(Owner), new(Owner)
	for _, cfg := range []*Owner{config1, config2} {
		pb.SecretsSeen(cfg, app, zap.New(core))
		pb.SecretsSeen(cfg, own, zap.New(core))
	}
	if n := logs.FilterMessage("provider secret changed: its remembered failures are forgotten").Len(); n != 0 {
		t.Errorf("%d lines say a secret changed, want none", n)
	}
	if pb.source(pa.ID) != pa.Source || pb.source(po.ID) != po.Source {
		t.Error("a registry's provider ID falls back on the other registry's source")
	}
	pb.Release(config1)
	if pb.source(pa.ID) != pa.Source || pb.source(po.ID) != po.Source {
		t.Error("the end of config 1 dropped what config 2 showed too")
	}
	other, pc := load("partner-c")
	pb.SecretsSeen(config3, other, zap.New(core)) // a reload without those two registries
	pb.Release(config2)
	if len(pb.seen) != 1 || pb.source(pc.ID) != pc.Source {
		t.Errorf("after config 2 ended, %d providers are kept, want config 3's one", len(pb.seen))
	}
	pb.Release(config3)
	if len(pb.seen) != 0 {
		t.Errorf("after the last config ended, %d providers are kept", len(pb.seen))
	}
}

// TestReleaseForgetsFailures: the failures remembered for a provider
// (a 429's backoff) are forgotten once no config that showed it is left,
// so that a provider a reload removed and a later one added back (its key
// fixed, say) is called at once; those of a provider a config still
// running shows are kept.
func TestReleaseForgetsFailures(t *testing.T) {
	base := gatekeeper(t, func(*http.Request) {})
	pb := &Broker{Broker: broker.New(broker.Options{MaxAttempts: 1}), Logger: zap.NewNop()}
	t.Cleanup(pb.Close)
	kept := nuapayRegistry(t, configtest.Reloader(t, "merchants.toml"), base, "partner-a").Providers["nuapay"]
	dropped := nuapayRegistry(t, configtest.Reloader(t, "merchants.toml"), base, "partner-b").Providers["nuapay"]
	config1, config2 := new(Owner), new(Owner)
	pb.SecretsSeen(config1, &config.Registry{Providers: map[string]*config.Provider{"kept": kept, "dropped": dropped}}, zap.NewNop())
	pb.SecretsSeen(config2, &config.Registry{Providers: map[string]*config.Provider{"kept": kept}}, zap.NewNop())
	for _, p := range []*config.Provider{kept, dropped} {
		if err := fetch(t, pb, base, p.ID, "acme", "o-429"); err == nil {
			t.Fatal("a 429 gave a token")
		}
	}
	pb.Release(config1)
	if h := pb.SourceHealth(dropped.ID); !h.BackoffUntil.IsZero() {
		t.Errorf("the provider no config shows is still held until %s", h.BackoffUntil)
	}
	if h := pb.SourceHealth(kept.ID); h.BackoffUntil.IsZero() {
		t.Error("the provider config 2 shows was forgotten")
	}
}

// nuapayRegistry is a registry, written and loaded by load
// (configtest.Reloader), of merchant acme of organisation org-acme at a
// Nuapay provider at baseURL whose API key is key.
func nuapayRegistry(t *testing.T, load func([]byte, config.Options) (*config.Registry, error), baseURL, key string) *config.Registry {
	t.Helper()
	toml := `[providers.nuapay]
type = "nuapay"
base_url = "` + baseURL + `"
api_key = "{env.NUAPAY_API_KEY}"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
`
	reg, err := load([]byte(toml), config.Options{LookupEnv: func(k string) (string, bool) { return key, k == "NUAPAY_API_KEY" }})
	if err != nil {
		t.Fatal(err)
	}
	return reg
}

// gatekeeper is a Nuapay token API for the revocation tests: every
// organisation gets a token with an id, except "o-noid" (a token without
// an id, which cannot be revoked), "o-503" (503) and "o-429" (429,
// Retry-After 60); a revocation runs hold, then succeeds.
func gatekeeper(t *testing.T, hold func(r *http.Request)) string {
	t.Helper()
	var minted atomic.Int64
	gk := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		switch {
		case strings.HasSuffix(r.URL.Path, "/revoke"):
			hold(r)
			fmt.Fprint(w, `{"data":{"status":"REVOKED"}}`)
		case strings.Contains(r.URL.Path, "/o-503/"):
			w.WriteHeader(http.StatusServiceUnavailable)
		case strings.Contains(r.URL.Path, "/o-429/"):
			w.Header().Set("Retry-After", "60")
			w.WriteHeader(http.StatusTooManyRequests)
		case strings.Contains(r.URL.Path, "/o-noid/"):
			n := minted.Add(1)
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, `{"data":{"accessToken":"tok-%d","tokenType":"BEARER","status":"ACTIVE"}}`, n)
		default:
			n := minted.Add(1)
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, `{"data":{"id":"t%d","accessToken":"tok-%d","tokenType":"BEARER","status":"ACTIVE"}}`, n, n)
		}
	}))
	t.Cleanup(gk.Close)
	return gk.URL
}

// fetch gets the token of merchant m at organisation org from the source
// sourceID of base URL base (see gatekeeper), and returns the error. A
// source whose ID starts with "norevoke" is not a broker.Revoker.
func fetch(t *testing.T, pb *Broker, base, sourceID, m, org string) error {
	t.Helper()
	np, err := nuapay.New(nuapay.Config{BaseURL: base, APIKey: "partner-key"})
	if err != nil {
		t.Fatal(err)
	}
	var src broker.Source = np
	if strings.HasPrefix(sourceID, "norevoke") {
		src = struct{ broker.Source }{src} // hides RevokeToken
	}
	b := brokertest.NewBinding(sourceID, src, broker.Request{Merchant: m, Organisation: org, Scopes: []string{"s"}})
	_, _, err = pb.Get(context.Background(), b)
	return err
}

// Revocations at shutdown run at most revokeWorkers at a time, and at
// most revokePerSource at a time per source: 5 sources of 8 tokens each,
// whose revocations are held until revokeWorkers are under way, see at
// most those many at once, and reach both bounds (16 over 5 sources puts
// 4 on one of them).
func TestRevokeAtShutdownIsBounded(t *testing.T) {
	const sources, perSource = 5, 8
	var mu sync.Mutex
	inFlight, peak := map[string]int{}, map[string]int{}
	release, released := make(chan struct{}), false
	count := func(source string, d int) {
		mu.Lock()
		defer mu.Unlock()
		for _, key := range []string{"all", source} {
			inFlight[key] += d
			peak[key] = max(peak[key], inFlight[key])
		}
		if inFlight["all"] == revokeWorkers && !released {
			close(release)
			released = true
		}
	}
	base := gatekeeper(t, func(r *http.Request) {
		source := strings.Split(r.URL.Path, "/")[1]
		count(source, 1)
		select {
		case <-release:
		case <-r.Context().Done(): // Revoke's time is up: the bound was never reached
		}
		count(source, -1)
	})
	core, logs := observer.New(zap.InfoLevel)
	pb := &Broker{Broker: broker.New(broker.Options{}), Logger: zap.New(core), revokeTimeout: time.Minute}
	t.Cleanup(pb.Close)
	for s := range sources {
		for i := range perSource {
			id := fmt.Sprint("s", s)
			if err := fetch(t, pb, base+"/"+id, id, fmt.Sprint("m", s, "-", i), fmt.Sprint("o", i)); err != nil {
				t.Fatal(err)
			}
		}
	}
	entries := pb.Tokens()
	slices.SortFunc(entries, func(a, b *broker.Entry) int { return strings.Compare(a.Binding().Merchant, b.Binding().Merchant) })
	pb.Revoke(entries)
	mu.Lock()
	defer mu.Unlock()
	perSourcePeak := 0
	for s := range sources {
		perSourcePeak = max(perSourcePeak, peak[fmt.Sprint("s", s)])
	}
	if peak["all"] != revokeWorkers || perSourcePeak != revokePerSource {
		t.Fatalf("at most %d revocations at once, %d for one source; want %d and %d", peak["all"], perSourcePeak, revokeWorkers, revokePerSource)
	}
	if n := logs.FilterMessage("token revoked at shutdown").Len(); n != sources*perSource {
		t.Fatalf("%d results logged, want %d", n, sources*perSource)
	}
}

// A token whose source the failure policy keeps from being called (its
// breaker is open, or a 429 put it in backoff) is not revoked at
// shutdown: no call, and its log says why. A source that cannot revoke
// is reported so, whatever its breaker.
func TestRevokeAtShutdownFollowsTheFailurePolicy(t *testing.T) {
	var mu sync.Mutex
	var revoked []string
	base := gatekeeper(t, func(r *http.Request) {
		mu.Lock()
		defer mu.Unlock()
		revoked = append(revoked, strings.Split(r.URL.Path, "/")[1])
	})
	core, logs := observer.New(zap.InfoLevel)
	pb := &Broker{Broker: broker.New(broker.Options{MaxAttempts: 1, BreakerThreshold: 1}), Logger: zap.New(core)}
	t.Cleanup(pb.Close)
	for _, id := range []string{"ok", "open", "backoff", "norevoke"} {
		if err := fetch(t, pb, base+"/"+id, id, "m-"+id, "o1"); err != nil {
			t.Fatal(err)
		}
	}
	if err := fetch(t, pb, base+"/open", "open", "m-open-2", "o-503"); err == nil {
		t.Fatal("a 503 gave a token")
	}
	if err := fetch(t, pb, base+"/backoff", "backoff", "m-backoff-2", "o-429"); err == nil {
		t.Fatal("a 429 gave a token")
	}
	if err := fetch(t, pb, base+"/norevoke", "norevoke", "m-norevoke-2", "o-503"); err == nil {
		t.Fatal("a 503 gave a token")
	}
	pb.Revoke(pb.Tokens())
	mu.Lock()
	defer mu.Unlock()
	if strings.Join(revoked, " ") != "ok" {
		t.Fatalf("revocations sent to %q, want only to ok", revoked)
	}
	want := map[string]string{"m-ok": "", "m-open": "not revoked: the provider's circuit breaker is open",
		"m-backoff": "not revoked: the provider is not called until", "m-norevoke": "the provider has no revocation endpoint"}
	for _, e := range logs.FilterMessage("token revoked at shutdown").All() {
		m := e.ContextMap()
		reason, ok := want[m["merchant"].(string)]
		if !ok || m["revoked"] != (reason == "") || !strings.HasPrefix(m["error"].(string), reason) {
			t.Errorf("logged %v, want for %s revoked=%v with %q", m, m["merchant"], reason == "", reason)
		}
		delete(want, m["merchant"].(string))
	}
	if len(want) != 0 {
		t.Fatalf("no result logged for %v", want)
	}
}

// fleetNodes starts a real Redis and a gatekeeper; node starts a broker
// of a fleet on them, and get returns the fingerprint of the token a node
// serves merchant "acme" of organisation org.
func fleetNodes(t *testing.T) (node func() *Broker, get func(pb *Broker, org string) string) {
	t.Helper()
	srv := redistest.Start(t)
	base := gatekeeper(t, func(*http.Request) {})
	keys, err := seal.New(bytes.Repeat([]byte{3}, seal.KeySize))
	if err != nil {
		t.Fatal(err)
	}
	node = func() *Broker {
		tier, err := fleet.New(fleet.Options{Client: srv.Client(), Keys: keys, Timeout: 5 * time.Second})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { tier.Close() })
		pb := &Broker{Broker: broker.New(broker.Options{Shared: tier}), Logger: zap.NewNop()}
		t.Cleanup(pb.Close)
		return pb
	}
	src, err := nuapay.New(nuapay.Config{BaseURL: base, APIKey: "partner-key"})
	if err != nil {
		t.Fatal(err)
	}
	get = func(pb *Broker, org string) string {
		t.Helper()
		e, _, err := pb.Get(context.Background(), brokertest.NewBinding("np", src, broker.Request{Merchant: "acme", Organisation: org, Scopes: []string{"s"}}))
		if err != nil {
			t.Fatal(err)
		}
		return e.Fingerprint()
	}
	return node, get
}

// sharedByTwo starts nodes a and b, and returns them with the fingerprint
// of the token of organisation org that a fetched and b adopted from the
// shared tier.
func sharedByTwo(t *testing.T, node func() *Broker, get func(*Broker, string) string, org string) (a, b *Broker, fp string) {
	t.Helper()
	a, b = node(), node()
	fp = get(a, org)
	if got := get(b, org); got != fp {
		t.Fatalf("node b got token %s, want node a's %s from the shared tier", got, fp)
	}
	return a, b, fp
}

// waitDropped waits until pb no longer serves the token of organisation
// org whose fingerprint is fp, and fails the test after 10 seconds.
func waitDropped(t *testing.T, pb *Broker, get func(*Broker, string) string, org, fp string) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); get(pb, org) == fp; {
		if time.Now().After(deadline) {
			t.Fatalf("a node still serves the revoked token %s", fp)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// In a fleet, a token revoked at shutdown is purged from the shared tier:
// a node that starts afterwards does not adopt it, and a node that served
// it hears the purge and fetches a new one.
func TestRevokeAtShutdownPurgesTheFleet(t *testing.T) {
	node, get := fleetNodes(t)
	a, b, revoked := sharedByTwo(t, node, get, "o1")
	a.Revoke(a.Tokens())
	if got := get(node(), "o1"); got == revoked {
		t.Fatalf("a node started after the revocation adopted the revoked token %s", got)
	}
	waitDropped(t, b, get, "o1", revoked)
}

// In a fleet, a token that cannot be revoked (a Nuapay token without an
// id) stays in the shared tier when a node shuts down: the other nodes
// keep serving it. Node a then revokes a token that can be revoked; once
// node b has heard that purge, it has heard every earlier one.
func TestRevokeAtShutdownKeepsWhatCannotBeRevoked(t *testing.T) {
	node, get := fleetNodes(t)
	a, b, kept := sharedByTwo(t, node, get, "o-noid")
	a.Revoke(a.Tokens())
	revoked := get(a, "o1")
	get(b, "o1")
	a.Revoke(slices.DeleteFunc(a.Tokens(), func(e *broker.Entry) bool { return e.Binding().Organisation != "o1" }))
	waitDropped(t, b, get, "o1", revoked)
	if got := get(b, "o-noid"); got != kept {
		t.Fatalf("node b serves token %s, want %s, which could not be revoked", got, kept)
	}
	if got := get(node(), "o-noid"); got != kept {
		t.Fatalf("a node started after the shutdown got token %s, want %s from the shared tier", got, kept)
	}
}

// An operator rotates the partner API key (the old one is revoked at
// Nuapay) and reloads: the tokens fetched with the old key are revoked at
// shutdown with the key of the config last seen, not with the old one
// that Gatekeeper now refuses.
func TestRevokeAtShutdownUsesTheRotatedKey(t *testing.T) {
	var validKey atomic.Value
	validKey.Store("old-partner-key")
	var revoked atomic.Int64
	gk := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if key, _, _ := r.BasicAuth(); key != validKey.Load().(string) {
			w.WriteHeader(http.StatusUnauthorized)
			fmt.Fprint(w, `{"returnCode":"40100","returnDescription":"Unauthorized"}`)
			return
		}
		if strings.HasSuffix(r.URL.Path, "/revoke") {
			revoked.Add(1)
			fmt.Fprint(w, `{"data":{"id":"t1","status":"REVOKED"}}`)
			return
		}
		w.WriteHeader(http.StatusCreated)
		fmt.Fprint(w, `{"data":{"id":"t1","accessToken":"tok-1","tokenType":"BEARER","status":"ACTIVE"}}`)
	}))
	t.Cleanup(gk.Close)
	load := configtest.Reloader(t, "merchants.toml")
	parse := func(key string) *config.Registry { return nuapayRegistry(t, load, gk.URL, key) }
	core, logs := observer.New(zap.InfoLevel)
	pb := &Broker{Broker: broker.New(broker.Options{}), Logger: zap.New(core)}
	t.Cleanup(pb.Close)
	old := parse("old-partner-key")
	pb.SecretsSeen(new(Owner), old, zap.NewNop())
	p := old.Providers["nuapay"]
	b := brokertest.NewBinding(p.ID, p.Source, broker.Request{Merchant: "acme", Organisation: "org-acme", Scopes: []string{"openbanking_pisp"}})
	if _, _, err := pb.Get(context.Background(), b); err != nil {
		t.Fatal(err)
	}

	validKey.Store("new-partner-key")
	pb.SecretsSeen(new(Owner), parse("new-partner-key"), zap.NewNop())
	pb.Revoke(pb.Tokens())
	lines := logs.FilterMessage("token revoked at shutdown").All()
	if len(lines) != 1 || !lines[0].ContextMap()["revoked"].(bool) || revoked.Load() != 1 {
		t.Fatalf("revocations at Gatekeeper %d, log lines %+v; want the token revoked with the rotated key", revoked.Load(), lines)
	}
}

// revocationScript is how a gatekeeper of throttledGatekeeper answers a
// revocation sent to one source when the clock has moved by moved since
// the gatekeeper started: its status (200 revokes) and Retry-After (""
// for none).
type revocationScript func(moved time.Duration) (status int, retryAfter string)

// throttledGatekeeper is a Nuapay token API whose revocations under
// /{source}/ are answered as script[source] says (200 for a source
// without one); it counts them per source, and notes the clock's time
// of each.
func throttledGatekeeper(t *testing.T, now func() time.Time, script map[string]revocationScript) (base string, sent func(source string) []time.Time) {
	t.Helper()
	start := now()
	var mu sync.Mutex
	at := map[string][]time.Time{}
	var minted atomic.Int64
	gk := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		source := strings.Split(r.URL.Path, "/")[1]
		if !strings.HasSuffix(r.URL.Path, "/revoke") {
			n := minted.Add(1)
			w.WriteHeader(http.StatusCreated)
			fmt.Fprintf(w, `{"data":{"id":"t%d","accessToken":"tok-%d","tokenType":"BEARER","status":"ACTIVE"}}`, n, n)
			return
		}
		mu.Lock()
		at[source] = append(at[source], now())
		mu.Unlock()
		if s := script[source]; s != nil {
			if status, retryAfter := s(now().Sub(start)); status != http.StatusOK {
				if retryAfter != "" {
					w.Header().Set("Retry-After", retryAfter)
				}
				w.WriteHeader(status)
				return
			}
		}
		fmt.Fprint(w, `{"data":{"status":"REVOKED"}}`)
	}))
	t.Cleanup(gk.Close)
	return gk.URL, func(source string) []time.Time {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(at[source])
	}
}

// At shutdown, a provider's revocation answers hold or stop its own next
// revocations, on the broker's clock, and no other provider's: a 429
// holds them until its Retry-After (1 s without one, doubled at each
// 429 in a row), and the token it was answered for is sent again then;
// a hold that would end past the shutdown's deadline (10 s), or 3 5xx in
// a row, stop them, and the provider's tokens not revoked are counted in
// one log (its name, how many). The token requests' failure policy is
// not told: the provider's token requests are not held.
func TestRevokeAtShutdownHoldsAThrottledProvider(t *testing.T) {
	const tokens = 8
	always := func(status int, retryAfter string) revocationScript {
		return func(time.Duration) (int, string) { return status, retryAfter }
	}
	for _, tc := range []struct {
		name         string
		script       revocationScript // provider a's answers; provider b revokes all
		revoked      int              // a's tokens revoked
		minSent      int              // revocations sent to a, at least
		maxSent      int              // and at most
		held         time.Duration    // how long the clock moved: the holds waited for
		sentInHold   int              // revocations sent to a before the first hold's end, at most
		stoppedCount int              // not_revoked of a's log of stopped revocations; 0: none
	}{
		{name: "429 Retry-After 2, then revoked", revoked: tokens, minSent: tokens + 1, maxSent: tokens + revokePerSource,
			script: func(moved time.Duration) (int, string) {
				if moved == 0 {
					return http.StatusTooManyRequests, "2"
				}
				return http.StatusOK, ""
			},
			held: 2 * time.Second, sentInHold: revokePerSource},
		{name: "429 Retry-After past the deadline", script: always(http.StatusTooManyRequests, "60"),
			minSent: 1, maxSent: revokePerSource, stoppedCount: tokens},
		{name: "429 without Retry-After, again and again", script: always(http.StatusTooManyRequests, ""),
			// holds of 1, 2 and 4 s; the next, 8 s, would end past 10 s
			minSent: 4, maxSent: 4 * revokePerSource, held: 7 * time.Second, sentInHold: revokePerSource, stoppedCount: tokens},
		{name: "503 with Retry-After, in a row", script: always(http.StatusServiceUnavailable, "1"),
			minSent: revokeFailures, maxSent: revokeFailures + revokePerSource - 1, stoppedCount: tokens},
	} {
		t.Run(tc.name, func(t *testing.T) {
			start := time.Now()
			clock := clocktest.New(start)
			base, sent := throttledGatekeeper(t, clock.Now, map[string]revocationScript{"a": tc.script})
			core, logs := observer.New(zap.InfoLevel)
			pb := &Broker{Broker: broker.New(broker.Options{MaxAttempts: 1, BreakerThreshold: 2, Now: clock.Now,
				Sleep: func(ctx context.Context, d time.Duration) error { clock.Add(d); return ctx.Err() }}),
				Logger: zap.New(core), revokeTimeout: 10 * time.Second}
			t.Cleanup(pb.Close)
			for _, id := range []string{"a", "b"} {
				for i := range tokens {
					if err := fetch(t, pb, base+"/"+id, id, fmt.Sprint("m-", id, i), fmt.Sprint("o", i)); err != nil {
						t.Fatal(err)
					}
				}
			}
			pb.Revoke(pb.Tokens())

			a := sent("a")
			if len(a) < tc.minSent || len(a) > tc.maxSent {
				t.Errorf("%d revocations sent to a, want %d to %d", len(a), tc.minSent, tc.maxSent)
			}
			if len(sent("b")) != tokens {
				t.Errorf("%d revocations sent to b, want %d: a's answers do not hold b", len(sent("b")), tokens)
			}
			if moved := clock.Now().Sub(start); moved != tc.held {
				t.Errorf("the clock moved %s, want %s: the holds waited for on the broker's clock", moved, tc.held)
			}
			if tc.held > 0 {
				inHold := 0 // the clock moves only when a hold is waited for
				for _, at := range a {
					if at.Equal(start) {
						inHold++
					}
				}
				if inHold > tc.sentInHold {
					t.Errorf("%d revocations sent to a before its first hold ended, want at most %d (those under way when it began)", inHold, tc.sentInHold)
				}
				if tc.revoked == tokens && len(a) != tokens+inHold {
					t.Errorf("%d revocations sent to a, %d of them answered 429; want each of those sent again once", len(a), inHold)
				}
			}
			revoked := map[bool]int{}
			for _, e := range logs.FilterMessage("token revoked at shutdown").All() {
				m := e.ContextMap()
				if strings.HasPrefix(m["merchant"].(string), "m-a") {
					revoked[m["revoked"].(bool)]++
				} else if m["revoked"] != true {
					t.Errorf("b's token not revoked: %v", m)
				}
			}
			if revoked[true] != tc.revoked || revoked[false] != tokens-tc.revoked {
				t.Errorf("a's tokens logged revoked %d, not revoked %d; want %d and %d", revoked[true], revoked[false], tc.revoked, tokens-tc.revoked)
			}
			stops := logs.FilterMessage("revocations at shutdown stopped for a provider").All()
			switch {
			case tc.stoppedCount == 0 && len(stops) != 0:
				t.Errorf("logged %v, want no provider stopped", stops[0].ContextMap())
			case tc.stoppedCount != 0 && (len(stops) != 1 || stops[0].ContextMap()["provider"] != "a" || stops[0].ContextMap()["not_revoked"] != int64(tc.stoppedCount)):
				t.Errorf("logs of stopped revocations %v, want one of provider a, not_revoked %d", stops, tc.stoppedCount)
			}
			for _, e := range logs.All() {
				for k, v := range e.ContextMap() {
					if s, ok := v.(string); ok && strings.Contains(s, "tok-") {
						t.Errorf("log %q: %s carries a token", e.Message, k)
					}
				}
			}
			if h := pb.SourceHealth("a"); h.Breaker == broker.BreakerOpen || !h.BackoffUntil.IsZero() {
				t.Errorf("a's token requests held after its revocations' answers: %+v", h)
			}
		})
	}
}

// TestRevocationsAnswers: what a provider's revocation answers at
// shutdown do to its next revocations, in order. 5xx, timeouts and
// failed connections stop them at the third in a row; a success resets
// the count, other refusals (4xx) neither count nor reset it. A 429
// holds them for its Retry-After, or 1 s without one, doubled at each
// hold in a row (a success resets the doubling), and its revocation is
// sent again; a 429 to a revocation sent before the hold began neither
// doubles nor lengthens it; a hold that would end at the deadline or
// later stops them.
func TestRevocationsAnswers(t *testing.T) {
	t0 := time.Date(2026, 12, 1, 9, 0, 0, 0, time.UTC)
	throttled := func(wait time.Duration) error {
		return &broker.APIError{Provider: "nuapay", StatusCode: http.StatusTooManyRequests, RetryAfter: wait}
	}
	failed := &broker.APIError{Provider: "nuapay", StatusCode: http.StatusBadGateway}
	refused := &broker.APIError{Provider: "nuapay", StatusCode: http.StatusBadRequest, Code: "not_revoked"}
	noConnection := &net.OpError{Op: "dial", Net: "tcp", Err: errors.New("connection refused")}
	type step struct {
		err     error
		at      time.Duration // answered at t0 + at
		stale   bool          // sent before the last hold began
		again   bool          // the revocation is sent again
		until   time.Duration // the hold ends at t0 + until (unless stopped)
		stopped bool
	}
	for _, tc := range []struct {
		name  string
		steps []step
	}{
		{name: "5xx, timeouts and a failed connection, a success between", steps: []step{
			{err: failed}, {err: context.DeadlineExceeded}, {}, {err: noConnection}, {err: failed}, {err: context.DeadlineExceeded, stopped: true},
		}},
		{name: "a 4xx neither counts nor resets", steps: []step{
			{err: failed}, {err: refused}, {err: failed}, {err: refused}, {err: failed, stopped: true},
		}},
		{name: "429s without Retry-After", steps: []step{
			{err: throttled(0), again: true, until: time.Second},
			{err: throttled(0), stale: true, again: true, until: time.Second},
			{err: throttled(0), at: time.Second, again: true, until: 3 * time.Second},
			{err: throttled(0), at: 3 * time.Second, again: true, until: 7 * time.Second},
			{err: throttled(0), at: 7 * time.Second, stopped: true}, // 8 s: past 10 s
		}},
		{name: "a success resets the doubling", steps: []step{
			{err: throttled(0), again: true, until: time.Second},
			{err: throttled(0), at: time.Second, again: true, until: 3 * time.Second},
			{at: 3 * time.Second, until: 3 * time.Second},
			{err: throttled(0), at: 3 * time.Second, again: true, until: 4 * time.Second},
		}},
		{name: "429s with Retry-After", steps: []step{
			{err: throttled(3 * time.Second), again: true, until: 3 * time.Second},
			{err: throttled(9 * time.Second), stale: true, again: true, until: 3 * time.Second},
			{err: throttled(6 * time.Second), at: 3 * time.Second, again: true, until: 9 * time.Second},
			{err: throttled(time.Second), at: 9 * time.Second, stopped: true}, // ends at the deadline
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := &revocations{deadline: t0.Add(10 * time.Second)}
			for i, s := range tc.steps {
				round := r.round
				if s.stale {
					round--
				}
				again := r.answered(s.err, round, t0.Add(s.at))
				var until time.Duration
				if !r.until.IsZero() {
					until = r.until.Sub(t0)
				}
				if again != s.again || until != s.until && !s.stopped || (r.stopped != "") != s.stopped {
					t.Fatalf("answer %d (%v): again %v, hold until +%s, stopped %q; want %v, +%s, stopped %v",
						i, s.err, again, until, r.stopped, s.again, s.until, s.stopped)
				}
			}
		})
	}
}
