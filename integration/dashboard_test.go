package integration

import (
	"encoding/json"
	"fmt"
	"net/http"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// The files under test, from the repository's root.
const (
	dashboardFile = "deploy/grafana/token-broker.json"
	alertsFile    = "deploy/prometheus/token-broker-alerts.yml"
)

// TestDashboardQueriesReturnData runs a real Prometheus (Debian's
// prometheus, on a free loopback port, scraping every second) against the
// built Caddy of a fleet sidecar with a real redis-server, sends traffic
// through the sidecar (hits, misses, refresh-ahead, a refused organisation,
// a provider failure, then Redis killed), and executes every query of the
// Grafana dashboard through Prometheus's HTTP API: each must return data.
// The alerting rules are loaded into the same Prometheus, which must report
// them all evaluated without error, and every metric they read must have
// series.
func TestDashboardQueriesReturnData(t *testing.T) {
	t.Parallel()
	queries := dashboardQueries(t, filepath.Join(repoRoot(t), dashboardFile))
	promBin := requireBinary(t, "prometheus")

	// A fleet sidecar (examples/fleet-redis) with 10 s tokens, so that
	// refresh-ahead starts after 7.5 s, and a merchant whose organisation
	// the provider does not know.
	f := newFleetEnv(t, "10s")
	reg, err := os.OpenFile(f.registry, os.O_APPEND|os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	_, err = fmt.Fprint(reg, "\n[merchants.nowhere]\nprovider = \"nuapay-sandbox\"\norganisation = \"org-nowhere\"\nscopes = [\"openbanking_pisp\"]\n")
	if cerr := reg.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		t.Fatal(err)
	}
	node := f.startNode()

	prom := startPrometheus(t, promBin, strings.TrimPrefix(node.admin, "http://"), filepath.Join(repoRoot(t), alertsFile))

	metricsURL := node.admin + "/metrics"
	call := func(merchant string) int {
		status, _ := get(t, node.base+"/tpp/payments", "X-Merchant-Id", merchant)
		return status
	}
	// Misses through the fleet tier, then a refused organisation and one
	// failed token API call (the retry succeeds).
	for i := range 10 {
		if status := call(fmt.Sprintf("m%02d", i)); status != http.StatusOK {
			t.Fatalf("m%02d: %d, want 200", i, status)
		}
	}
	if status := call("nowhere"); status == http.StatusOK {
		t.Fatal("nowhere (unknown organisation): 200, want an error")
	}
	f.sb.Fail(http.StatusServiceUnavailable, "", 1)
	if status := call("m10"); status != http.StatusOK {
		t.Fatalf("m10 after one failed token request: %d, want 200 (the retry)", status)
	}
	// Hits until the tokens enter their refresh window; Redis is killed
	// half way, so that new merchants mint without it.
	killed := false
	next := 11
	start := time.Now()
	for {
		for i := range 5 {
			if status := call(fmt.Sprintf("m%02d", i)); status != http.StatusOK {
				t.Fatalf("m%02d: %d, want 200", i, status)
			}
		}
		if !killed && time.Since(start) > 4*time.Second {
			f.redis.Kill()
			killed = true
		}
		if killed && next < fleetMerchants {
			call(fmt.Sprintf("m%02d", next))
			next++
		}
		m := scrape(t, metricsURL)
		if killed && next > 15 && sumSeries(m, `caddy_token_broker_refreshes_total{outcome="ok"`) > 0 &&
			sumSeries(m, "caddy_token_broker_l2_errors_total") > 0 {
			break
		}
		if time.Since(start) > time.Minute {
			t.Fatalf("after a minute of traffic: no refresh or no Redis error counted; metrics: %v", m)
		}
		time.Sleep(100 * time.Millisecond)
	}

	// Every dashboard query returns data once Prometheus has scraped twice
	// after the traffic.
	pending := map[string]bool{}
	for _, q := range queries {
		pending[q] = true
	}
	for deadline := time.Now().Add(30 * time.Second); len(pending) > 0; time.Sleep(500 * time.Millisecond) {
		for q := range pending {
			if n := promQuery(t, prom, q); n > 0 {
				delete(pending, q)
			}
		}
		if time.Now().After(deadline) {
			var empty []string
			for q := range pending {
				empty = append(empty, q)
			}
			sort.Strings(empty)
			t.Errorf("%d of %d dashboard queries returned no data:\n%s", len(empty), len(queries), strings.Join(empty, "\n"))
			break
		}
	}
	t.Logf("%d of %d dashboard queries returned data", len(queries)-len(pending), len(queries))

	checkRulesLoaded(t, prom, filepath.Join(repoRoot(t), alertsFile))
}

// requireBinary returns the path of a Debian tool the test runs; the test
// fails without it, as `make test` installs it (make tools).
func requireBinary(t *testing.T, name string) string {
	t.Helper()
	path, err := exec.LookPath(name)
	if err != nil {
		t.Fatalf("%s is not installed: run make tools (apt-get install -y prometheus): %v", name, err)
	}
	return path
}

// startPrometheus starts prometheus on a free loopback port with a
// temporary storage folder, scraping target's /metrics every second and
// evaluating ruleFile every second, waits until it is ready and returns its
// base URL. It is stopped by its process id when the test ends.
func startPrometheus(t *testing.T, bin, target, ruleFile string) string {
	t.Helper()
	dir := t.TempDir()
	cfg := fmt.Sprintf(`global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files:
  - %q
scrape_configs:
  - job_name: token-broker
    static_configs:
      - targets: [%q]
`, ruleFile, target)
	cfgFile := filepath.Join(dir, "prometheus.yml")
	if err := os.WriteFile(cfgFile, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	addr := fmt.Sprintf("127.0.0.1:%d", freePort(t))
	out := startProcess(t, dir, nil, bin, "--config.file="+cfgFile, "--storage.tsdb.path="+filepath.Join(dir, "data"),
		"--web.listen-address="+addr)
	base := "http://" + addr
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(100 * time.Millisecond) {
		if resp, err := http.Get(base + "/-/ready"); err == nil {
			resp.Body.Close()
			if resp.StatusCode == http.StatusOK {
				return base
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("prometheus on %s not ready after 30 s:\n%s", addr, out.String())
		}
	}
}

// dashboardQueries returns the PromQL of every target of the dashboard's
// panels (rows' panels included) and of its query variables, with the
// template variables replaced: every provider, and a rate window that
// covers several 1 s scrapes. A variable the test does not know fails the
// test.
func dashboardQueries(t *testing.T, path string) []string {
	t.Helper()
	variables := map[string]string{"provider": ".*", "__rate_interval": "1m"}
	type target struct {
		Expr string `json:"expr"`
	}
	type panel struct {
		Title   string   `json:"title"`
		Targets []target `json:"targets"`
		Panels  []panel  `json:"panels"`
	}
	var dash struct {
		SchemaVersion int     `json:"schemaVersion"`
		Panels        []panel `json:"panels"`
		Templating    struct {
			List []struct {
				Name  string          `json:"name"`
				Type  string          `json:"type"`
				Query json.RawMessage `json:"query"`
			} `json:"list"`
		} `json:"templating"`
	}
	if err := json.Unmarshal([]byte(readFile(t, path)), &dash); err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	variable := regexp.MustCompile(`\$\{?(\w+)\}?`)
	expand := func(where, expr string) string {
		return variable.ReplaceAllStringFunc(expr, func(v string) string {
			name := variable.FindStringSubmatch(v)[1]
			value, ok := variables[name]
			if !ok {
				t.Errorf("%s: %s uses the variable $%s, which the test does not set", path, where, name)
			}
			return value
		})
	}
	var out []string
	var walk func([]panel)
	walk = func(ps []panel) {
		for _, p := range ps {
			for i, tg := range p.Targets {
				if strings.TrimSpace(tg.Expr) == "" {
					t.Errorf("%s: panel %q target %d has no expr", path, p.Title, i)
					continue
				}
				out = append(out, expand(fmt.Sprintf("panel %q", p.Title), tg.Expr))
			}
			walk(p.Panels)
		}
	}
	walk(dash.Panels)
	// A query variable's label_values(metric, label) becomes the metric
	// itself, which must have series carrying the label.
	labelValues := regexp.MustCompile(`^label_values\((.+),\s*(\w+)\)$`)
	for _, v := range dash.Templating.List {
		if v.Type != "query" {
			continue
		}
		var q struct {
			Query string `json:"query"`
		}
		if err := json.Unmarshal(v.Query, &q); err != nil {
			t.Fatalf("%s: variable %s: query: %v", path, v.Name, err)
		}
		m := labelValues.FindStringSubmatch(q.Query)
		if m == nil {
			t.Fatalf("%s: variable %s: query %q is not label_values(metric, label)", path, v.Name, q.Query)
		}
		out = append(out, fmt.Sprintf("count by (%s) (%s)", m[2], expand("variable "+v.Name, m[1])))
	}
	if len(out) == 0 || dash.SchemaVersion == 0 {
		t.Fatalf("%s: no queries or no schemaVersion", path)
	}
	return out
}

// promResponse is the envelope of Prometheus's HTTP API.
type promResponse struct {
	Status    string          `json:"status"`
	ErrorType string          `json:"errorType"`
	Error     string          `json:"error"`
	Data      json.RawMessage `json:"data"`
}

// promGet GETs a Prometheus API path and returns its data; an error answer
// (a query that does not parse, say) fails the test.
func promGet(t *testing.T, base, path string) json.RawMessage {
	t.Helper()
	resp, err := http.Get(base + path)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r promResponse
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil {
		t.Fatalf("GET %s: %s: %v", path, resp.Status, err)
	}
	if r.Status != "success" {
		t.Fatalf("GET %s: %s %s: %s", path, resp.Status, r.ErrorType, r.Error)
	}
	return r.Data
}

// promQuery runs an instant query and returns how many series it
// returned.
func promQuery(t *testing.T, base, query string) int {
	t.Helper()
	var data struct {
		ResultType string            `json:"resultType"`
		Result     []json.RawMessage `json:"result"`
	}
	if err := json.Unmarshal(promGet(t, base, "/api/v1/query?query="+url.QueryEscape(query)), &data); err != nil {
		t.Fatalf("query %s: %v", query, err)
	}
	return len(data.Result)
}

// checkRulesLoaded asks Prometheus for its rules: every alert and
// recording rule of file is loaded and evaluated without error, and every
// caddy_token_broker_ metric the rules read has series (a rule on a
// metric that never exists would never fire).
func checkRulesLoaded(t *testing.T, base, file string) {
	t.Helper()
	src := readFile(t, file)
	want := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?m)^\s*- (?:alert|record): (\S+)$`).FindAllStringSubmatch(src, -1) {
		want[m[1]] = true
	}
	type rule struct {
		Name      string `json:"name"`
		Health    string `json:"health"`
		LastError string `json:"lastError"`
	}
	var problems []string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(500 * time.Millisecond) {
		var data struct {
			Groups []struct {
				Name  string `json:"name"`
				File  string `json:"file"`
				Rules []rule `json:"rules"`
			} `json:"groups"`
		}
		if err := json.Unmarshal(promGet(t, base, "/api/v1/rules"), &data); err != nil {
			t.Fatal(err)
		}
		problems = problems[:0]
		seen := map[string]bool{}
		for _, g := range data.Groups {
			for _, r := range g.Rules {
				seen[r.Name] = true
				if r.Health != "ok" {
					problems = append(problems, fmt.Sprintf("group %s rule %s: health %q %s", g.Name, r.Name, r.Health, r.LastError))
				}
			}
		}
		for name := range want {
			if !seen[name] {
				problems = append(problems, "rule "+name+" not loaded")
			}
		}
		if len(seen) != len(want) {
			problems = append(problems, fmt.Sprintf("%d rules loaded, %s has %d", len(seen), file, len(want)))
		}
		if len(problems) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("rules of %s in prometheus:\n%s", file, strings.Join(problems, "\n"))
		}
	}
	metrics := map[string]bool{}
	for _, m := range regexp.MustCompile(`(?:^|[^:\w])(caddy_token_broker_\w+)`).FindAllStringSubmatch(src, -1) {
		metrics[m[1]] = true
	}
	if len(metrics) == 0 {
		t.Fatalf("%s reads no caddy_token_broker_ metric", file)
	}
	for name := range metrics {
		if promQuery(t, base, "count("+name+")") == 0 {
			t.Errorf("%s reads %s, which has no series in prometheus", file, name)
		}
	}
}

// sumSeries adds the samples of a scrape whose series start with prefix
// (a metric name, with some of its labels).
func sumSeries(samples map[string]float64, prefix string) float64 {
	var sum float64
	for series, v := range samples {
		if strings.HasPrefix(series, prefix) {
			sum += v
		}
	}
	return sum
}
