package integration

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"regexp"
	"strings"
	"sync"
	"testing"
	"time"
)

// tokenRecorder sits in front of the sandbox's token API and keeps every
// access token it hands out, so the canary knows what must never leak.
type tokenRecorder struct {
	next   http.Handler
	mu     sync.Mutex
	tokens []string
}

var tokenField = regexp.MustCompile(`"(?:accessToken|access_token|refresh_token)"\s*:\s*"([^"]+)"`)

func (tr *tokenRecorder) ServeHTTP(w http.ResponseWriter, r *http.Request) {
	rec := httptest.NewRecorder()
	tr.next.ServeHTTP(rec, r)
	for _, m := range tokenField.FindAllStringSubmatch(rec.Body.String(), -1) {
		tr.mu.Lock()
		tr.tokens = append(tr.tokens, m[1])
		tr.mu.Unlock()
	}
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	w.WriteHeader(rec.Code)
	w.Write(rec.Body.Bytes())
}

// TestSecretCanary drives the scenarios of the integration suite (tokens for
// several merchants and scopes, cache hits, token API failures, upstream
// 401 with purge and retry, refused callers, admin list, purge and revoke)
// with tracing on and every log at DEBUG, then looks for the partner API
// key and every token the provider issued in the logs, the spans, the
// metrics, the admin answers and the error bodies.
func TestSecretCanary(t *testing.T) {
	t.Setenv("OTEL_TRACES_EXPORTER", "token_broker_test")
	t.Setenv("OTEL_BSP_SCHEDULE_DELAY", "20")
	testSpans.Reset()
	sb, sandboxURL := startSandbox(t)
	rec := &tokenRecorder{next: sb}
	api := httptest.NewServer(rec)
	t.Cleanup(api.Close)
	t.Setenv("NUAPAY_API", api.URL)

	logFile := filepath.Join(t.TempDir(), "caddy.log")
	cf := useExample(t, "tracing-otlp")
	cf = strings.Replace(cf, "{\n\tadmin", fmt.Sprintf("{\n\tdebug\n\tlog {\n\t\toutput file %s\n\t\tlevel DEBUG\n\t}\n\tadmin", logFile), 1)
	cf = strings.Replace(cf, "\tbind 127.0.0.1\n", "\tbind 127.0.0.1\n\tlog {\n\t\toutput file "+logFile+"\n\t}\n", 1)
	cf = strings.Replace(cf, "\thandle {\n\t\trespond", "\thandle /metrics {\n\t\tmetrics\n\t}\n\thandle {\n\t\trespond", 1)
	base := startCaddy(t, cf)

	var answers bytes.Buffer // everything a caller or an operator got back
	keep := func(status int, body []byte) { fmt.Fprintf(&answers, "%d %s\n", status, body) }

	for _, m := range []string{"acme", "globex"} {
		for _, p := range []string{"/tpp/payments", "/tpp/accounts", "/tpp/payments"} {
			keep(get(t, base+p, "X-Merchant-Id", m, "Authorization", "Bearer caller-token"))
		}
	}
	// Refused requests.
	keep(get(t, base+"/tpp/payments"))
	keep(get(t, base+"/tpp/payments", "X-Merchant-Id", "nobody"))
	keep(get(t, base+"/tpp/payments", "X-Merchant-Id", "bad/id"))
	// Token API failures, each class once (initech is cold).
	for _, f := range []struct {
		status int
		ra     string
	}{{401, ""}, {429, "3"}, {503, ""}} {
		sb.Fail(f.status, f.ra, 3)
		keep(get(t, base+"/tpp/payments", "X-Merchant-Id", "initech"))
		adminCall(t, "POST", "/token_broker/merchants/initech/purge")
		keep(get(t, base+"/tpp/accounts", "X-Merchant-Id", "initech"))
	}
	sb.Fail(0, "", 0)
	// Upstream 401: the token is purged and the request retried.
	revokeAll(t, sandboxURL, "org-acme")
	status, e := post(t, base+"/tpp/payments", []byte(`{"amount":"1.00"}`))
	if status != 200 || !e.Authorization.Valid {
		t.Fatalf("401 retry: %d %+v", status, e.Authorization)
	}
	// Admin API.
	keep(adminCallRaw(t, "GET", "/token_broker/tokens"))
	keep(adminCallRaw(t, "POST", "/token_broker/merchants/globex/revoke"))
	keep(adminCallRaw(t, "POST", "/token_broker/merchants/acme/purge"))
	keep(adminCallRaw(t, "GET", "/config/"))
	// Metrics, from the server and the admin endpoint.
	keep(get(t, base+"/metrics"))
	keep(adminCallRaw(t, "GET", "/metrics"))

	rec.mu.Lock()
	tokens := append([]string(nil), rec.tokens...)
	rec.mu.Unlock()
	if len(tokens) < 5 {
		t.Fatalf("only %d tokens were issued: the scenarios did not run", len(tokens))
	}

	// Let the span exporter catch up, then gather everything.
	var spans []byte
	for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		if len(testSpans.GetSpans()) > 0 || time.Now().After(deadline) {
			break
		}
	}
	spans, _ = json.Marshal(testSpans.GetSpans())
	logs, _ := os.ReadFile(logFile)
	if len(logs) == 0 || !bytes.Contains(logs, []byte(`"token fetched"`)) {
		t.Fatalf("the debug log has no token fetch line: %d bytes", len(logs))
	}
	if !bytes.Contains(spans, []byte("token_broker.token")) {
		t.Fatal("no broker span was recorded")
	}

	places := map[string][]byte{"logs": logs, "spans": spans, "answers, admin and metrics": answers.Bytes()}
	secrets := append([]string{apiKey}, tokens...)
	for where, data := range places {
		for _, s := range secrets {
			if bytes.Contains(data, []byte(s)) {
				i := bytes.Index(data, []byte(s))
				t.Errorf("a secret (%.6s…) appears in the %s: …%s…", s, where, data[max(0, i-120):min(len(data), i+40)])
			}
		}
	}
}

func adminCallRaw(t *testing.T, method, path string) (int, []byte) {
	t.Helper()
	req, _ := http.NewRequest(method, adminURL()+path, nil)
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, _ := io.ReadAll(resp.Body)
	return resp.StatusCode, b
}
