package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strings"
	"testing"
)

// readmeBlock returns the fenced block that follows the line
// `<!-- test: name -->` in the README, without its fences.
func readmeBlock(t *testing.T, readme, name string) string {
	t.Helper()
	_, rest, ok := strings.Cut(readFile(t, readme), "<!-- test: "+name+" -->\n")
	if !ok {
		t.Fatalf("%s has no block marked <!-- test: %s -->", readme, name)
	}
	_, rest, ok = strings.Cut(rest, "```")
	if !ok {
		t.Fatalf("%s: no fenced block after <!-- test: %s -->", readme, name)
	}
	_, rest, _ = strings.Cut(rest, "\n") // the info string
	block, _, ok := strings.Cut(rest, "```")
	if !ok {
		t.Fatalf("%s: the block after <!-- test: %s --> does not end", readme, name)
	}
	return block
}

// TestHandleErrorsSnippet: the README's handle_errors snippet, in a real
// Caddy, answers an upstream that is down with the broker's JSON error
// format (a cached merchant's request has a token but no upstream), where
// Caddy alone answers a bare 502; the broker's own refusals keep their
// JSON.
func TestHandleErrorsSnippet(t *testing.T) {
	snippet := readmeBlock(t, filepath.Join(repoRoot(t), "README.md"), "handle_errors")
	for _, tt := range []struct {
		name    string
		snippet string
		want    string // the error code of the 502 body; "" for Caddy's bare 502
	}{
		{"without the snippet", "", ""},
		{"with the README's snippet", snippet, "upstream_unavailable"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			sb, _ := startSandbox(t)
			useExample(t, "nuapay-tpp")
			t.Setenv("UPSTREAM", fmt.Sprintf("127.0.0.1:%d", freePort(t))) // nothing listens
			base := startCaddy(t, `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
	}
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	token_broker
	reverse_proxy {$UPSTREAM}
`+tt.snippet+`
}
`)
			for i := range 2 { // a fresh token, then the cached one
				req, _ := http.NewRequest("GET", base+"/tpp/payments", nil)
				req.Header.Set("X-Merchant-Id", "globex")
				resp, err := http.DefaultClient.Do(req)
				if err != nil {
					t.Fatal(err)
				}
				var body struct{ Error, Message, Merchant string }
				raw, _ := io.ReadAll(resp.Body)
				resp.Body.Close()
				if resp.StatusCode != http.StatusBadGateway {
					t.Fatalf("request %d: %d %s, want 502", i, resp.StatusCode, raw)
				}
				if tt.want == "" {
					if len(raw) != 0 {
						t.Errorf("request %d: body %q, want Caddy's bare 502", i, raw)
					}
					continue
				}
				if err := json.Unmarshal(raw, &body); err != nil || body.Error != tt.want || body.Merchant != "globex" || body.Message == "" ||
					resp.Header.Get("Content-Type") != "application/json" || resp.Header.Get("Cache-Control") != "no-store" {
					t.Errorf("request %d: %s %q (%v), want JSON %s for globex, no-store", i, resp.Header, raw, err, tt.want)
				}
				if strings.Contains(string(raw), os.Getenv("UPSTREAM")) {
					t.Errorf("request %d: the body names the upstream: %s", i, raw)
				}
			}
			if sb.TokenRequests() != 1 {
				t.Errorf("token requests = %d, want 1 (the second request used the cached token)", sb.TokenRequests())
			}
			// The broker's own refusal is untouched.
			status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "nobody")
			if status != http.StatusForbidden || !strings.Contains(string(body), `"unknown_merchant"`) {
				t.Errorf("unknown merchant: %d %s, want the broker's 403 unknown_merchant", status, body)
			}
		})
	}
}

// TestValidateCommand: `caddy token-broker validate` prints each problem
// of the config's registries on a line of its own, file:line first (the
// token_broker global option's registry and a handler's own), and exits
// 1; a valid registry exits 0. `caddy validate` gives the problems one per
// line after a line that counts them.
func TestValidateCommand(t *testing.T) {
	t.Parallel()
	caddyBin, _ := buildBinaries(t)
	dir := t.TempDir()
	write := func(name, content string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(content), 0o600); err != nil {
			t.Fatal(err)
		}
		return p
	}
	bad := write("bad.toml", `[providers.np]
type = "nuapay"
base_url = "http://127.0.0.1:1"
api_key = "{env.VALIDATE_KEY}"
token_lifetme = "1h"

[merchants.acme]
provider = "nq"
organisation = "org-acme"
scopes = ["a"]
`)
	good := write("good.toml", `[providers.np]
type = "nuapay"
base_url = "http://127.0.0.1:1"
api_key = "{env.VALIDATE_KEY}"

[merchants.acme]
provider = "np"
organisation = "org-acme"
scopes = ["a"]
`)
	caddyfile := func(app, handler string) string {
		return write("Caddyfile", fmt.Sprintf(`{
	admin off
	token_broker {
		config %s
	}
}

http://127.0.0.1:%d {
	handle /own/* {
		token_broker {
			config %s
		}
		respond ok
	}
	token_broker
	respond ok
}
`, app, freePort(t), handler))
	}
	// The registries' API key, in the commands' environment.
	const keyEnv = "VALIDATE_KEY=validate-key-never-printed"
	wantBad := []string{
		bad + `:5: provider "np": field token_lifetme: unknown key "providers.np.token_lifetme": did you mean "token_lifetime"? (the keys of a provider of type nuapay: type, timeout, tls, rate_limit, rate_burst, base_url, api_key, token_lifetime, organisations_path)`,
		bad + `:8: merchant "acme": field provider: unknown provider "nq" (defined: np)`,
	}
	for _, tt := range []struct {
		name      string
		app, own  string
		wantCode  int
		wantLines []string // the lines that are not Caddy's JSON log
	}{
		{"valid", good, good, 0, []string{good + ": valid (1 merchants, 1 providers)"}},
		{"the app's registry", bad, good, 1, append(slices.Clone(wantBad), good+": valid (1 merchants, 1 providers)")},
		{"a handler's own registry", good, bad, 1, append([]string{good + ": valid (1 merchants, 1 providers)"}, wantBad...)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			cf := caddyfile(tt.app, tt.own)
			out, code := runCommand(t, caddyBin, keyEnv, "token-broker", "validate", "--config", cf, "--adapter", "caddyfile")
			var lines []string
			for _, l := range strings.Split(strings.TrimSpace(out), "\n") {
				if !strings.HasPrefix(l, "{") {
					lines = append(lines, l)
				}
			}
			if code != tt.wantCode || strings.Join(lines, "\n") != strings.Join(tt.wantLines, "\n") {
				t.Errorf("exit %d, lines:\n%s\nwant exit %d, lines:\n%s", code, strings.Join(lines, "\n"), tt.wantCode, strings.Join(tt.wantLines, "\n"))
			}
			if strings.Contains(out, "validate-key-never-printed") {
				t.Error("the output holds the API key")
			}
			if tt.wantCode == 0 {
				return
			}
			// Caddy's own validate: a line counting the problems, then
			// one problem per line (escaped inside its JSON log line).
			out, code = runCommand(t, caddyBin, keyEnv, "validate", "--config", cf, "--adapter", "caddyfile")
			want := regexp.QuoteMeta(`token_broker: 2 problems in the merchant registry, one per line below (`+"`caddy token-broker validate --config <Caddyfile>`"+` prints them alone):\n`) +
				regexp.QuoteMeta(strings.ReplaceAll(strings.Join(wantBad, `\n`), `"`, `\"`))
			if code != 1 || !regexp.MustCompile(want).MatchString(out) {
				t.Errorf("caddy validate: exit %d, output %s\nwant a match of %s", code, out, want)
			}
		})
	}
}
