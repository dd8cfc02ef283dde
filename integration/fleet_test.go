package integration

import (
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"math"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/cmd/sandbox/sandbox"
	"github.com/tokenbroker/caddy-token-broker/integration/redistest"
)

// The fleet tests run three (or more) real `caddy run` processes built from
// cmd/caddy, with the same Caddyfile (examples/fleet-redis) and registry,
// sharing one real redis-server, against an in-process sandbox whose token
// API counts the mints.

// startRedisServer starts a real redis-server for the test (see
// redistest): skipped without redis-server, except under CI.
func startRedisServer(t *testing.T) *redistest.Server { return redistest.Start(t) }

// newCacheKey returns a fresh base64 AES-256 key.
func newCacheKey() string {
	b := make([]byte, 32)
	rand.Read(b)
	return base64.StdEncoding.EncodeToString(b)
}

// tokenTap serves a sandbox and keeps every access token its Nuapay token
// API issues, so that a test can look for them where they must not be.
type tokenTap struct {
	url string
	// lifetime, when set, shortens every Nuapay token's expiryTime to now
	// plus lifetime (the sandbox's minimum is 10 s): the broker takes the
	// earlier of the asked and the answered expiry.
	lifetime atomic.Int64
	mu       sync.Mutex
	seen     []string
}

func (tp *tokenTap) tokens() []string {
	tp.mu.Lock()
	defer tp.mu.Unlock()
	return slices.Clone(tp.seen)
}

// startTappedSandbox is startSandbox behind a tokenTap: SANDBOX_URL and
// NUAPAY_API point at the tap, NUAPAY_API_KEY is apiKey.
func startTappedSandbox(t *testing.T, opts ...func(*sandbox.Config)) (*sandbox.Server, *tokenTap) {
	t.Helper()
	sb, tap := serveTappedSandbox(t, opts...)
	t.Setenv("SANDBOX_URL", tap.url)
	t.Setenv("NUAPAY_API", tap.url)
	t.Setenv("NUAPAY_API_KEY", apiKey)
	return sb, tap
}

// serveTappedSandbox is serveSandbox behind a tokenTap, at tap.url; it
// leaves the environment alone.
func serveTappedSandbox(t *testing.T, opts ...func(*sandbox.Config)) (*sandbox.Server, *tokenTap) {
	t.Helper()
	sb, _ := serveSandbox(t, opts...)
	tap := &tokenTap{}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || !strings.HasSuffix(r.URL.Path, "/tokens") {
			sb.ServeHTTP(w, r)
			return
		}
		rec := httptest.NewRecorder()
		sb.ServeHTTP(rec, r)
		raw := rec.Body.Bytes()
		var body map[string]any
		if json.Unmarshal(raw, &body) == nil {
			if data, ok := body["data"].(map[string]any); ok {
				if tok, ok := data["accessToken"].(string); ok && tok != "" {
					tap.mu.Lock()
					tap.seen = append(tap.seen, tok)
					tap.mu.Unlock()
				}
				if d := time.Duration(tap.lifetime.Load()); d > 0 {
					data["expiryTime"] = time.Now().Add(d).UnixMilli()
					raw, _ = json.Marshal(body)
				}
			}
		}
		for k, v := range rec.Header() {
			w.Header()[k] = v
		}
		w.Header().Del("Content-Length")
		w.WriteHeader(rec.Code)
		w.Write(raw)
	}))
	t.Cleanup(ts.Close)
	tap.url = ts.URL
	return sb, tap
}

// fleetNode is one sidecar process of a fleet.
type fleetNode struct {
	base, admin string
	stop        func()
	out         *syncBuffer
}

// fleetEnv is what every node of a fleet shares.
type fleetEnv struct {
	t          *testing.T
	bin        string
	sb         *sandbox.Server
	tap        *tokenTap
	sandboxURL string
	redis      *redistest.Server
	registry   string
	key        string
	oldKeys    string
	// caddyfile, when set, replaces examples/fleet-redis/Caddyfile;
	// env is added to every node's environment.
	caddyfile string
	env       []string
}

// fleetOrgs are the organisations of the fleet registry: one per merchant,
// so that every merchant has its own token (cache key).
const fleetMerchants = 40

// newFleetEnv starts the sandbox (tokens of lifetime as the registry asks)
// and a redis-server, and writes a registry of merchants m00..m39, each in
// its own organisation, with token_lifetime lifetime.
func newFleetEnv(t *testing.T, lifetime string) *fleetEnv {
	t.Helper()
	bin := builtOnce(t, "./cmd/caddy")
	r := startRedisServer(t)
	var orgs []sandbox.Organisation
	for i := range fleetMerchants {
		orgs = append(orgs, sandbox.Organisation{ID: fmt.Sprintf("org-m%02d", i), Name: fmt.Sprintf("M%02d", i)})
	}
	sb, tap := serveTappedSandbox(t, func(c *sandbox.Config) { c.Organisations = append(c.Organisations, orgs...) })
	url := tap.url
	var reg strings.Builder
	fmt.Fprintf(&reg, "[providers.nuapay-sandbox]\ntype = \"nuapay\"\nbase_url = %q\napi_key = \"{env.NUAPAY_API_KEY}\"\ntimeout = \"5s\"\ntoken_lifetime = %q\n",
		url, lifetime)
	for i := range fleetMerchants {
		fmt.Fprintf(&reg, "\n[merchants.m%02d]\nprovider = \"nuapay-sandbox\"\norganisation = \"org-m%02d\"\nscopes = [\"openbanking_pisp\"]\n", i, i)
	}
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(reg.String()), 0o600); err != nil {
		t.Fatal(err)
	}
	return &fleetEnv{t: t, bin: bin, sb: sb, tap: tap, sandboxURL: url, redis: r, registry: path, key: newCacheKey()}
}

// startNode starts one `caddy run` of examples/fleet-redis on free ports.
// A port freePort returned can be taken by another process (a test binary
// beside this one) before Caddy binds it: Caddy then exits with "address
// already in use", and the node is started again on other ports.
func (f *fleetEnv) startNode() *fleetNode {
	f.t.Helper()
	for try := 1; ; try++ {
		n, busy := f.tryNode()
		if !busy {
			return n
		}
		if try == 3 {
			f.t.Fatalf("caddy run found its ports taken 3 times:\n%s", n.out.String())
		}
	}
}

// tryNode starts one `caddy run` and waits until Caddy says it serves its
// configuration (a dial could reach another process on a taken port). It
// reports busy when Caddy exited because a port was taken.
func (f *fleetEnv) tryNode() (n *fleetNode, busy bool) {
	t := f.t
	t.Helper()
	port, adminPort := freePort(t), freePort(t)
	dir := t.TempDir()
	env := append(os.Environ(),
		"SANDBOX_URL="+f.sandboxURL, "NUAPAY_API_KEY="+apiKey,
		"TOKEN_BROKER_CONFIG="+f.registry, "REDIS_ADDR="+f.redis.Addr(), "TOKEN_CACHE_KEY="+f.key,
		// The machine may be busy (a test suite beside this one): a Redis
		// call that misses the example's 50 ms is bypassed by design, which
		// these tests of fleet sharing must not depend on.
		"REDIS_TIMEOUT=1s",
		fmt.Sprintf("TOKEN_BROKER_PORT=%d", port), fmt.Sprintf("TOKEN_BROKER_ADMIN_PORT=%d", adminPort),
		"HOME="+dir, "XDG_DATA_HOME="+filepath.Join(dir, "data"), "XDG_CONFIG_HOME="+filepath.Join(dir, "config"))
	caddyfile := filepath.Join(repoRoot(t), "examples", "fleet-redis", "Caddyfile")
	if f.caddyfile != "" {
		caddyfile = f.caddyfile
	}
	env = append(env, f.env...)
	if f.oldKeys != "" {
		// The example's Caddyfile with the rotation's old key added.
		src := readFile(t, caddyfile)
		src = strings.Replace(src, "encryption_key {env.TOKEN_CACHE_KEY}",
			"encryption_key {env.TOKEN_CACHE_KEY}\n\t\t\tencryption_keys_old {env.TOKEN_CACHE_KEYS_OLD}", 1)
		caddyfile = filepath.Join(dir, "Caddyfile")
		if err := os.WriteFile(caddyfile, []byte(src), 0o600); err != nil {
			t.Fatal(err)
		}
		env = append(env, "TOKEN_CACHE_KEYS_OLD="+f.oldKeys)
	}
	out := new(syncBuffer)
	cmd := exec.Command(f.bin, "run", "--config", caddyfile, "--adapter", "caddyfile")
	cmd.Dir, cmd.Env, cmd.Stdout, cmd.Stderr = dir, env, out, out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	go func() { _ = cmd.Wait(); close(done) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			_ = cmd.Process.Signal(os.Interrupt)
			select {
			case <-done:
			case <-time.After(10 * time.Second):
				_ = cmd.Process.Kill()
				<-done
			}
		})
	}
	n = &fleetNode{base: fmt.Sprintf("http://127.0.0.1:%d", port), admin: fmt.Sprintf("http://127.0.0.1:%d", adminPort), stop: stop, out: out}
	// Generous: the machine is shared; an exited process fails at once.
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(20 * time.Millisecond) {
		if strings.Contains(out.String(), "serving initial configuration") {
			break
		}
		select {
		case <-done:
			if strings.Contains(out.String(), "address already in use") {
				return n, true
			}
			t.Fatalf("caddy run exited before serving:\n%s", out.String())
		default:
		}
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("caddy on port %d does not serve its configuration after 30s:\n%s", port, out.String())
		}
	}
	t.Cleanup(func() {
		stop()
		if t.Failed() {
			t.Logf("caddy %s output:\n%s", n.base, out.String())
		}
	})
	return n, false
}

// startFleet starts n nodes.
func (f *fleetEnv) startFleet(n int) []*fleetNode {
	nodes := make([]*fleetNode, n)
	for i := range nodes {
		nodes[i] = f.startNode()
	}
	return nodes
}

// fleetClient has room for many concurrent connections per node.
var fleetClient = &http.Client{Transport: &http.Transport{MaxIdleConnsPerHost: 200, MaxConnsPerHost: 0}, Timeout: 30 * time.Second}

// call sends GET /tpp/payments for merchant to node with optional extra
// headers; it returns the status and the echo (zero if not 200).
func (n *fleetNode) call(merchant string, headers ...string) (int, echo, error) {
	req, _ := http.NewRequest("GET", n.base+"/tpp/payments", nil)
	req.Header.Set("X-Merchant-Id", merchant)
	for i := 0; i+1 < len(headers); i += 2 {
		req.Header.Set(headers[i], headers[i+1])
	}
	resp, err := fleetClient.Do(req)
	if err != nil {
		return 0, echo{}, err
	}
	defer resp.Body.Close()
	var e echo
	if resp.StatusCode == http.StatusOK {
		if err := json.NewDecoder(resp.Body).Decode(&e); err != nil {
			return resp.StatusCode, e, err
		}
	} else {
		var b bytes.Buffer
		b.ReadFrom(resp.Body)
		return resp.StatusCode, e, fmt.Errorf("%d %s", resp.StatusCode, b.String())
	}
	return resp.StatusCode, e, nil
}

// mustCall calls and fails the test unless a valid token reached the upstream.
func (n *fleetNode) mustCall(t *testing.T, merchant string, headers ...string) echo {
	t.Helper()
	status, e, err := n.call(merchant, headers...)
	if err != nil || status != http.StatusOK || !e.Authorization.Valid {
		t.Fatalf("%s for %s: status %d, %v, authorization %+v", n.base, merchant, status, err, e.Authorization)
	}
	return e
}

// tokens returns the node's admin token list for merchant.
func (n *fleetNode) tokens(t *testing.T, merchant string) []map[string]any {
	t.Helper()
	resp, err := http.Get(n.admin + "/token_broker/tokens?merchant=" + merchant)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var out struct {
		Tokens []map[string]any `json:"tokens"`
	}
	if err := json.NewDecoder(resp.Body).Decode(&out); err != nil {
		t.Fatal(err)
	}
	return out.Tokens
}

// concurrently runs n calls, call i on nodes[i%len(nodes)], all at once.
func concurrently(n int, nodes []*fleetNode, call func(i int, node *fleetNode)) {
	var wg sync.WaitGroup
	start := make(chan struct{})
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			call(i, nodes[i%len(nodes)])
		}()
	}
	close(start)
	wg.Wait()
}

// TestFleetColdBurstMintsOnce: 300 concurrent cold requests spread over
// three sidecars sharing one Redis make exactly one token request, and the
// nodes that did not mint say the token is "shared".
func TestFleetColdBurstMintsOnce(t *testing.T) {
	f := newFleetEnv(t, "1h")
	nodes := f.startFleet(3)
	var failed atomic.Int64
	fps := sync.Map{}
	concurrently(300, nodes, func(i int, n *fleetNode) {
		status, e, err := n.call("m00")
		if err != nil || status != http.StatusOK || !e.Authorization.Valid {
			failed.Add(1)
			t.Errorf("request %d on %s: %d %v", i, n.base, status, err)
			return
		}
		fps.Store(e.Authorization.Fingerprint, true)
	})
	if got := f.sb.TokenRequests(); got != 1 {
		t.Errorf("token requests = %d, want exactly 1 for the fleet", got)
	}
	distinct := 0
	fps.Range(func(any, any) bool { distinct++; return true })
	if distinct != 1 {
		t.Errorf("the upstream saw %d different tokens, want 1", distinct)
	}
	origins := map[string]int{}
	for _, n := range nodes {
		for _, tok := range n.tokens(t, "m00") {
			origins[fmt.Sprint(tok["origin"])]++
		}
	}
	if origins["minted"] != 1 || origins["shared"] != 2 {
		t.Errorf("origins in the admin lists = %v, want 1 minted and 2 shared", origins)
	}
}

// TestFleetUpstream401BurstAndAdminPurge: the fleet's token is revoked at
// the provider; 100 concurrent calls spread over three sidecars all get the
// upstream's 401 invalid_token for it, and the fleet mints one replacement
// (every call succeeds on its retry). Then an admin purge on one node makes
// the other two stop serving that token within 1 s.
func TestFleetUpstream401BurstAndAdminPurge(t *testing.T) {
	f := newFleetEnv(t, "1h")
	nodes := f.startFleet(3)
	var old string
	for _, n := range nodes {
		old = n.mustCall(t, "m00").Authorization.Fingerprint
	}
	if got := f.sb.TokenRequests(); got != 1 {
		t.Fatalf("token requests after warming = %d, want 1", got)
	}
	revokeAll(t, f.sandboxURL, "org-m00")

	var fresh sync.Map
	concurrently(100, nodes, func(i int, n *fleetNode) {
		status, e, err := n.call("m00", "X-Sandbox-Require-Token", "1")
		if err != nil || status != http.StatusOK || !e.Authorization.Valid {
			t.Errorf("request %d on %s: %d %v %+v", i, n.base, status, err, e.Authorization)
			return
		}
		fresh.Store(e.Authorization.Fingerprint, true)
	})
	if got := f.sb.TokenRequests(); got != 2 {
		t.Fatalf("token requests = %d, want 2 (the first and one replacement for the fleet)", got)
	}
	var cur string
	fresh.Range(func(k, _ any) bool { cur = k.(string); return true })
	if cur == old || cur == "" {
		t.Fatalf("the upstream saw %q after the purge, the revoked token was %q", cur, old)
	}
	for _, n := range nodes {
		n.mustCall(t, "m00") // every node holds the replacement in memory
	}

	// Admin purge on node 0: the others drop the token (pub/sub) within 1 s.
	resp, err := http.Post(nodes[0].admin+"/token_broker/merchants/m00/purge", "application/json", nil)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("admin purge: %v %v", err, resp)
	}
	resp.Body.Close()
	purgedAt := time.Now()
	for _, n := range nodes[1:] {
		for {
			asked := time.Now() // a slow answer under load is not a late purge
			held := false
			for _, tok := range n.tokens(t, "m00") {
				held = held || tok["fingerprint"] == cur
			}
			if !held {
				break
			}
			if asked.Sub(purgedAt) > time.Second {
				t.Fatalf("%s still holds the purged token %s 1 s after the admin purge on another node", n.base, cur)
			}
			time.Sleep(10 * time.Millisecond)
		}
	}
	if e := nodes[2].mustCall(t, "m00"); e.Authorization.Fingerprint == cur {
		t.Errorf("node 2 served the purged token %s", cur)
	}
}

// TestFleetRedisKilledUnderLoad: redis-server is killed (SIGKILL, by pid)
// while three sidecars serve a warm merchant and a stream of cold ones: no
// request fails. Redis is then started again on the same port and, without
// restarting Caddy, sharing resumes: a new cold merchant called on the
// three nodes is minted once. Each node's breaker keeps Redis out for its
// cooldown (5 s) after the failures, so the test waits for that real time,
// polling with a fresh merchant every 500 ms.
func TestFleetRedisKilledUnderLoad(t *testing.T) {
	t.Parallel()
	f := newFleetEnv(t, "1h")
	nodes := f.startFleet(3)
	for _, n := range nodes {
		n.mustCall(t, "m00")
	}
	var (
		next     atomic.Int64 // the next cold merchant
		calls    atomic.Int64
		failures atomic.Int64
		killed   atomic.Bool
		stop     = make(chan struct{})
		wg       sync.WaitGroup
	)
	next.Store(1)
	const coldUntil = 20 // m01..m19 are used under load, the rest after
	for w := range 6 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				m := "m00"
				if w%2 == 1 && i%10 == 0 {
					// m01..m04 before the kill, m05..m19 after.
					limit := int64(5)
					if killed.Load() {
						limit = coldUntil
					}
					if k := next.Add(1) - 1; k < limit {
						m = fmt.Sprintf("m%02d", k)
					} else {
						next.Add(-1)
					}
				}
				calls.Add(1)
				if status, e, err := nodes[(w+i)%3].call(m); err != nil || status != http.StatusOK || !e.Authorization.Valid {
					failures.Add(1)
					t.Errorf("%s under load: %d %v", m, status, err)
				}
			}
		}()
	}
	time.Sleep(300 * time.Millisecond) // load before the kill
	f.redis.Kill()
	killed.Store(true)
	killedAt := calls.Load()
	time.Sleep(1500 * time.Millisecond) // load while Redis is down
	close(stop)
	wg.Wait()
	if failures.Load() != 0 || calls.Load() == killedAt {
		t.Fatalf("%d of %d requests failed (%d after the kill), want 0", failures.Load(), calls.Load(), calls.Load()-killedAt)
	}
	if next.Load() <= 6 {
		t.Fatalf("no cold merchant was called after the kill")
	}
	t.Logf("%d requests, %d after the kill, cold merchants m01..m%02d", calls.Load(), calls.Load()-killedAt, min(next.Load(), coldUntil)-1)

	f.redis.Restart()
	deadline := time.Now().Add(20 * time.Second)
	for k := coldUntil; ; k++ {
		if k >= fleetMerchants || time.Now().After(deadline) {
			t.Fatalf("sharing did not resume within 20 s of Redis's restart")
		}
		m := fmt.Sprintf("m%02d", k)
		before := f.sb.TokenRequests()
		for _, n := range nodes {
			n.mustCall(t, m)
		}
		if f.sb.TokenRequests()-before == 1 {
			break
		}
		time.Sleep(500 * time.Millisecond) // the breakers' cooldown is real time in the processes
	}
	// Shared again: another new merchant, concurrently on the three.
	m := fmt.Sprintf("m%02d", fleetMerchants-1)
	before := f.sb.TokenRequests()
	concurrently(30, nodes, func(i int, n *fleetNode) { n.mustCall(t, m) })
	if got := f.sb.TokenRequests() - before; got != 1 {
		t.Errorf("a cold merchant after Redis came back: %d token requests, want 1", got)
	}
}

// TestExampleFleetRedis runs examples/fleet-redis as its README says, with
// a real redis-server: tokens for its merchants, stored in Redis under
// hashed names (no merchant id) as ciphertext (no token, no fingerprint
// of the scopes or organisation in clear).
func TestExampleFleetRedis(t *testing.T) {
	r := startRedisServer(t)
	sb, tap := startTappedSandbox(t)
	t.Setenv("REDIS_ADDR", r.Addr())
	t.Setenv("REDIS_TIMEOUT", "1s") // a busy machine must not bypass Redis
	t.Setenv("TOKEN_CACHE_KEY", newCacheKey())
	base := startCaddy(t, useExample(t, "fleet-redis"))

	for _, tt := range []struct{ merchant, path, org string }{
		{"acme", "/tpp/payments", "org-acme"},
		{"globex", "/tpp/accounts/1", "org-globex"},
	} {
		a := getEcho(t, base+tt.path, "X-Merchant-Id", tt.merchant).Authorization
		if !a.Valid || a.Organisation != tt.org {
			t.Fatalf("%s %s: %+v, want a valid token for %s", tt.merchant, tt.path, a, tt.org)
		}
	}
	if sb.TokenRequests() != 2 {
		t.Errorf("token requests = %d, want 2", sb.TokenRequests())
	}
	if len(tap.tokens()) != 2 {
		t.Fatalf("the tap saw %d tokens, want 2", len(tap.tokens()))
	}
	assertRedisSealed(t, r, tap.tokens(), "acme", "globex", "org-acme", "org-globex", "openbanking")
}

// assertRedisSealed reads every key and value straight from Redis with
// redis-cli and fails if one shows any of the tokens or clear words.
func assertRedisSealed(t *testing.T, r *redistest.Server, tokens []string, clear ...string) {
	t.Helper()
	keys := strings.Fields(r.CLI("--scan"))
	if len(keys) == 0 {
		t.Fatal("redis-cli --scan: no keys: nothing was shared")
	}
	values := 0
	for _, k := range keys {
		for _, c := range clear {
			if strings.Contains(k, c) {
				t.Errorf("Redis key %q shows %q in clear", k, c)
			}
		}
		if typ := strings.TrimSpace(r.CLI("TYPE", k)); typ != "string" {
			continue
		}
		v := r.CLI("--no-raw", "GET", k)
		values++
		for _, tok := range tokens {
			if strings.Contains(v, tok) || strings.Contains(v, tok[:16]) || strings.Contains(v, tok[len(tok)-16:]) {
				t.Errorf("Redis value of %q holds a token in clear", k)
			}
		}
		for _, c := range clear {
			if strings.Contains(v, c) {
				t.Errorf("Redis value of %q shows %q in clear", k, c)
			}
		}
	}
	if values == 0 {
		t.Errorf("no string value among the keys %v", keys)
	}
}

// TestFleetSteadyTrafficMintsOncePerLifetime: three sidecars serve steady
// traffic for one merchant over about three lifetimes of a 5 s token (the
// token API answers an expiryTime 5 s ahead; refresh window default, the
// last 25 %: one refresh-ahead every 3.75 s). The fleet mints about once
// per refresh period: at most ceil(12 s / 3.75 s) + 1 = 5 mints, where three
// sidecars refreshing on their own would make about 3 × 4 = 12. The
// lifetime is real time in the processes, hence the 12 s of traffic.
func TestFleetSteadyTrafficMintsOncePerLifetime(t *testing.T) {
	t.Parallel()
	f := newFleetEnv(t, "10s")
	const lifetime, traffic = 5 * time.Second, 12 * time.Second
	f.tap.lifetime.Store(int64(lifetime))
	nodes := f.startFleet(3)
	var calls, failures atomic.Int64
	start := time.Now()
	var wg sync.WaitGroup
	for _, n := range nodes {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for time.Since(start) < traffic {
				calls.Add(1)
				if status, e, err := n.call("m00"); err != nil || status != http.StatusOK || !e.Authorization.Valid {
					failures.Add(1)
					t.Errorf("%s: %d %v %+v", n.base, status, err, e.Authorization)
				}
				time.Sleep(20 * time.Millisecond) // a steady rate, not a wait for a state
			}
		}()
	}
	wg.Wait()
	mints := f.sb.TokenRequests()
	periods := float64(traffic) / (float64(lifetime) * (1 - 0.25))
	limit := int64(math.Ceil(periods)) + 1
	t.Logf("%d calls, %d failed, %d mints over %s of %s tokens (limit %d)", calls.Load(), failures.Load(), mints, traffic, lifetime, limit)
	if mints > limit {
		t.Errorf("the fleet minted %d tokens over %s of %s tokens, want at most %d (one per refresh period)", mints, traffic, lifetime, limit)
	}
	if mints < 2 {
		t.Errorf("the fleet minted %d tokens over %s of %s tokens: the short lifetime did not apply", mints, traffic, lifetime)
	}
}

// TestFleetKeyRotation: with traffic on three sidecars sealing with key A,
// the sidecars are restarted one by one with key B and A as old: no request
// fails, a value sealed under one key opens under the other (a restarted
// node adopts tokens of nodes not yet rotated), and once all run key B the
// fleet shares again (a cold merchant is minted once) and Redis holds only
// ciphertext.
func TestFleetKeyRotation(t *testing.T) {
	f := newFleetEnv(t, "1h")
	nodes := f.startFleet(3)
	for _, n := range nodes {
		n.mustCall(t, "m00")
	}
	var (
		mu       sync.Mutex
		calls    atomic.Int64
		failures atomic.Int64
		stop     = make(chan struct{})
		wg       sync.WaitGroup
	)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := 0; ; i++ {
				select {
				case <-stop:
					return
				default:
				}
				mu.Lock()
				n := nodes[(w+i)%3]
				mu.Unlock()
				calls.Add(1)
				if status, e, err := n.call("m00"); err != nil || status != http.StatusOK || !e.Authorization.Valid {
					failures.Add(1)
					t.Errorf("during the rotation, %s: %d %v", n.base, status, err)
				}
				time.Sleep(5 * time.Millisecond) // a steady rate
			}
		}()
	}
	f.oldKeys, f.key = f.key, newCacheKey()
	for i := range nodes {
		fresh := f.startNode()
		// A rotated node adopts the token sealed with the old key.
		if e := fresh.mustCall(t, "m00"); f.sb.TokenRequests() != 1 {
			t.Errorf("node %d rotated: %d token requests, want still 1 (the old token opens with the old key); served %s", i, f.sb.TokenRequests(), e.Authorization.Fingerprint)
		}
		mu.Lock()
		old := nodes[i]
		nodes[i] = fresh
		mu.Unlock()
		time.Sleep(200 * time.Millisecond) // calls that picked the old node reach it before it stops
		old.stop()
	}
	close(stop)
	wg.Wait()
	if failures.Load() != 0 {
		t.Fatalf("%d of %d requests failed during the rotation", failures.Load(), calls.Load())
	}
	before := f.sb.TokenRequests()
	concurrently(30, nodes, func(i int, n *fleetNode) { n.mustCall(t, "m01") })
	if got := f.sb.TokenRequests() - before; got != 1 {
		t.Errorf("a cold merchant after the rotation: %d token requests, want 1", got)
	}
	assertRedisSealed(t, f.redis, f.tap.tokens(), "m00", "m01", "org-m0", "openbanking")
}

// TestFleetRotatingRefreshTokenAlternateNodes: a merchant whose bank
// rotates its refresh token at every use (the old one then fails with
// invalid_grant) is served by two sidecars in turn; before each call the
// access token is purged (fleet-wide), so every call refreshes, on
// alternate nodes. The refresh token lives in Redis and refreshes are
// serialised fleet-wide: the 20 calls all succeed, each refresh token is
// used once, in order, and the consent is never lost.
// startRotatingFleet starts two sidecars of a merchant m00 whose bank
// rotates its refresh token at every use (see rotatingBank), and loads
// the first refresh token, rt-initial, through node 0's admin API.
func startRotatingFleet(t *testing.T) (*fleetEnv, []*fleetNode, *rotatingBank) {
	t.Helper()
	f := newFleetEnv(t, "1h")
	bank := &rotatingBank{current: "rt-initial"}
	tokenSrv := httptest.NewServer(bank)
	t.Cleanup(tokenSrv.Close)
	upstream := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		fmt.Fprintf(w, `{"authorization":{"present":true,"valid":%t}}`, strings.HasPrefix(r.Header.Get("Authorization"), "Bearer at-"))
	}))
	t.Cleanup(upstream.Close)
	dir := t.TempDir()
	f.registry = filepath.Join(dir, "merchants.toml")
	toml := `[providers.bank]
type = "oauth2"
grant = "refresh_token"
token_url = "` + tokenSrv.URL + `/token"
client_id = "bank-client"
client_secret = "{env.BANK_SECRET}"
auth_method = "client_secret_basic"

[merchants.m00]
provider = "bank"
scopes = ["accounts"]
`
	f.caddyfile = filepath.Join(dir, "Caddyfile")
	caddyfile := `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
		redis {
			address {$REDIS_ADDR}
			encryption_key {env.TOKEN_CACHE_KEY}
		}
	}
	persist_config off
}
http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker
	reverse_proxy ` + upstream.URL + `
}
`
	for path, content := range map[string]string{f.registry: toml, f.caddyfile: caddyfile} {
		if err := os.WriteFile(path, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	f.env = []string{"BANK_SECRET=bank-secret-xyz"}
	nodes := f.startFleet(2)

	req, _ := http.NewRequest(http.MethodPut, nodes[0].admin+"/token_broker/merchants/m00/refresh_token", strings.NewReader(`{"refresh_token":"rt-initial"}`))
	req.Header.Set("Content-Type", "application/json")
	resp, err := http.DefaultClient.Do(req)
	if err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("loading the refresh token on node 0: %v %v", err, resp)
	}
	resp.Body.Close()
	return f, nodes, bank
}

func TestFleetRotatingRefreshTokenAlternateNodes(t *testing.T) {
	_, nodes, bank := startRotatingFleet(t)

	const calls = 20
	for i := range calls {
		n := nodes[i%2]
		if status, e, err := n.call("m00"); err != nil || status != http.StatusOK || !e.Authorization.Valid {
			t.Fatalf("call %d on node %d: %d %v", i, i%2, status, err)
		}
		resp, err := http.Post(n.admin+"/token_broker/merchants/m00/purge", "application/json", nil)
		if err != nil || resp.StatusCode != http.StatusOK {
			t.Fatalf("purge %d: %v %v", i, err, resp)
		}
		resp.Body.Close()
	}
	bank.mu.Lock()
	defer bank.mu.Unlock()
	want := []string{"rt-initial"}
	for i := 1; i < calls; i++ {
		want = append(want, fmt.Sprintf("rt-%d", i))
	}
	if got := strings.Join(bank.used, ","); got != strings.Join(want, ",") {
		t.Errorf("refresh tokens used: %s\nwant each once, in order: %s", got, strings.Join(want, ","))
	}
}
