package integration

import (
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
)

// TestEchoMethodsRefusedInAnyCase: TRACE and TRACK, in any letter case, are
// refused with 405 method_refused before any token request and never reach
// the upstream, which would echo the injected token back.
func TestEchoMethodsRefusedInAnyCase(t *testing.T) {
	sb, _ := startSandbox(t)
	up := startRecordingUpstream(t)
	base := startCaddy(t, headersCaddyfile(t, up.url, ""))
	for _, method := range []string{"TRACE", "trace", "Trace", "TRACK", "track", "tRaCk"} {
		resp, body := rawRequest(t, base, method+" /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nConnection: close\r\n\r\n")
		if resp.StatusCode != http.StatusMethodNotAllowed || !strings.Contains(body, `"method_refused"`) {
			t.Errorf("%s: %d %s, want 405 method_refused", method, resp.StatusCode, body)
		}
		if resp.Header.Get("Allow") == "" {
			t.Errorf("%s: the 405 has no Allow header", method)
		}
	}
	if n := len(up.requests()); n != 0 {
		t.Fatalf("%d echo requests reached the upstream, want none", n)
	}
	if n := sb.TokenRequests(); n != 0 {
		t.Fatalf("echo requests caused %d token requests, want none", n)
	}
	// Other methods, whatever their case, still go through.
	for _, method := range []string{"GET", "get", "PROPFIND"} {
		resp, body := rawRequest(t, base, method+" /tpp/payments HTTP/1.1\r\nHost: localhost\r\nX-Merchant-Id: acme\r\nConnection: close\r\n\r\n")
		if resp.StatusCode != http.StatusOK {
			t.Errorf("%s: %d %s, want 200", method, resp.StatusCode, body)
		}
	}
}

// TestUnderscoreMerchantHeaderThroughCaddy: Caddy drops every request
// header whose name holds an underscore or a dot before any handler runs,
// so by default an X-Merchant_Id never reaches the token broker nor the
// upstream: beside X-Merchant-Id the request is served for X-Merchant-Id;
// alone it is a request without a merchant. A server option that keeps it
// (expected_underscore_headers, expected_dot_headers; Caddy then drops
// X-Merchant-Id) makes every request carrying it ambiguous: refused. The
// README says so. A selector that reads as a default merchant
// ({http.request.header.X-Merchant-Id:acme}, or the shorthand
// {header.X-Merchant-Id:acme}) fails the config load with a message giving
// the recipe that does give one: a matcher of the requests without the
// header and request_header before token_broker, which serves a request
// without the header for acme and one with it for its value.
func TestUnderscoreMerchantHeaderThroughCaddy(t *testing.T) {
	sb, _ := startSandbox(t)
	caddyfile := sandboxCaddyfile(t)
	selecting := func(selector string) string {
		cf := strings.Replace(caddyfile, "\thandle {\n\t\ttoken_broker\n", "\thandle {\n\t\ttoken_broker {\n\t\t\tmerchant "+selector+"\n\t\t}\n", 1)
		if cf == caddyfile {
			t.Fatal("the root Caddyfile has no `handle { token_broker` to set the merchant selector of")
		}
		return cf
	}
	// recipe has the README's lines that set a default merchant before
	// token_broker in the root Caddyfile's catch-all handle.
	_, lines, _ := strings.Cut(readmeBlock(t, filepath.Join(repoRoot(t), "README.md"), "default-merchant"), "handle {\n")
	lines, _, _ = strings.Cut(lines, "    token_broker\n")
	recipe := strings.Replace(caddyfile, "\thandle {\n\t\ttoken_broker\n", "\thandle {\n"+lines+"\t\ttoken_broker\n", 1)
	if !strings.Contains(lines, "request_header") || recipe == caddyfile {
		t.Fatalf("the README's default merchant recipe %q, in the root Caddyfile's `handle { token_broker`: not found", lines)
	}
	keeping := func(option string) string {
		cf := strings.Replace(caddyfile, "persist_config off", "persist_config off\n\tservers {\n\t\t"+option+"\n\t}", 1)
		if cf == caddyfile {
			t.Fatal("the root Caddyfile has no persist_config line to add the servers option after")
		}
		return cf
	}
	underscoreKept := keeping("expected_underscore_headers X-Merchant_Id")
	dotKept := keeping("expected_dot_headers X-Merchant.Id")
	for _, tt := range []struct {
		name      string
		caddyfile string
		headers   []string
		status    int
		code      string // for a refusal
		org       string // for a 200
	}{
		{"both, default", caddyfile, []string{"X-Merchant-Id", "acme", "X-Merchant_Id", "globex"}, 200, "", "org-acme"},
		{"both, underscore first", caddyfile, []string{"X-Merchant_Id", "globex", "X-Merchant-Id", "acme"}, 200, "", "org-acme"},
		{"dot form beside", caddyfile, []string{"X-Merchant-Id", "acme", "X-Merchant.Id", "globex"}, 200, "", "org-acme"},
		{"underscore alone", caddyfile, []string{"X-Merchant_Id", "globex"}, 400, "missing_merchant", ""},
		{"both, underscore kept", underscoreKept, []string{"X-Merchant-Id", "acme", "X-Merchant_Id", "globex"}, 400, "ambiguous_merchant", ""},
		{"underscore alone, kept", underscoreKept, []string{"X-Merchant_Id", "globex"}, 400, "ambiguous_merchant", ""},
		{"hyphen alone, underscore kept", underscoreKept, []string{"X-Merchant-Id", "acme"}, 400, "missing_merchant", ""},
		{"both, dot kept", dotKept, []string{"X-Merchant-Id", "acme", "X-Merchant.Id", "globex"}, 400, "ambiguous_merchant", ""},
		{"recipe, header absent", recipe, nil, 200, "", "org-acme"},
		{"recipe, header present", recipe, []string{"X-Merchant-Id", "globex"}, 200, "", "org-globex"},
		{"recipe, header empty", recipe, []string{"X-Merchant-Id", ""}, 400, "missing_merchant", ""},
		{"recipe, header twice", recipe, []string{"X-Merchant-Id", "globex", "X-Merchant-Id", "globex"}, 400, "ambiguous_merchant", ""},
		{"recipe, underscore alone", recipe, []string{"X-Merchant_Id", "globex"}, 200, "", "org-acme"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			base := startCaddy(t, tt.caddyfile)
			req := "GET /tpp/payments HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n"
			for i := 0; i+1 < len(tt.headers); i += 2 {
				req += tt.headers[i] + ": " + tt.headers[i+1] + "\r\n"
			}
			resp, body := rawRequest(t, base, req+"\r\n")
			if resp.StatusCode != tt.status {
				t.Fatalf("%d %s, want %d", resp.StatusCode, body, tt.status)
			}
			if tt.code != "" {
				var eb struct{ Error string }
				if err := json.Unmarshal([]byte(body), &eb); err != nil || eb.Error != tt.code {
					t.Fatalf("body %s, want error %q", body, tt.code)
				}
				return
			}
			var e echo
			if err := json.Unmarshal([]byte(body), &e); err != nil {
				t.Fatalf("echo %s: %v", body, err)
			}
			if !e.Authorization.Valid || e.Authorization.Organisation != tt.org {
				t.Fatalf("upstream token %+v, want one for %s", e.Authorization, tt.org)
			}
			for name := range e.Headers {
				if strings.ContainsAny(name, "_.") {
					t.Errorf("header %s reached the upstream", name)
				}
			}
		})
	}
	if sb.TokenRequests() == 0 {
		t.Fatal("no token request at all: the cases did not reach the broker")
	}

	for _, tt := range []struct{ selector, want string }{
		{"{http.request.header.X-Merchant-Id:acme}", `token_broker: merchant: selector "{http.request.header.X-Merchant-Id:acme}": "X-Merchant-Id:acme" is not a header field name`},
		{"{header.X-Merchant-Id:acme}", `token_broker: merchant: selector "{header.X-Merchant-Id:acme}": {header.X-Merchant-Id:acme} is a Caddyfile shorthand`},
		{"{http.request.header.X-Merchant-Id", `token_broker: merchant: selector "{http.request.header.X-Merchant-Id" has braces that do not pair`},
	} {
		t.Run("refused "+tt.selector, func(t *testing.T) {
			t.Setenv("TOKEN_BROKER_PORT", strconv.Itoa(freePort(t)))
			t.Setenv("TOKEN_BROKER_ADMIN_PORT", strconv.Itoa(freePort(t)))
			cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(selecting(tt.selector)), map[string]any{"filename": "Caddyfile"})
			if err != nil {
				t.Fatal(err)
			}
			err = caddy.Load(cfg, true)
			if err == nil {
				caddy.Stop()
			}
			if err == nil || !strings.Contains(err.Error(), tt.want) || (tt.selector != "{http.request.header.X-Merchant-Id" &&
				!strings.Contains(err.Error(), "`@nomerchant not header X-Merchant-Id *` and `request_header @nomerchant X-Merchant-Id acme` before token_broker")) {
				t.Fatalf("load error %v, want one saying %q and, for a default, giving the recipe", err, tt.want)
			}
		})
	}

	// The README describes this (Caddy's drop, the server options), not an
	// answer Caddy never lets happen by default.
	readme, err := os.ReadFile(filepath.Join(repoRoot(t), "README.md"))
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"drops every request header whose name contains an underscore or a dot",
		"`expected_underscore_headers`", "`expected_dot_headers`"} {
		if !strings.Contains(strings.Join(strings.Fields(string(readme)), " "), want) {
			t.Errorf("README does not say %q", want)
		}
	}
}

// TestRetryAfterIsTheRealHold: a provider answering 429 with Retry-After:
// 99999999 holds it for 10 minutes (the broker's cap), and callers are told
// that hold, then what is left of it, not the provider's value nor another
// cap. The provider is called once.
func TestRetryAfterIsTheRealHold(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	sb.Fail(http.StatusTooManyRequests, "99999999", 1)
	for i, merchant := range []string{"acme", "globex", "acme"} {
		status, hdr, body := getWithHeader(t, base+"/tpp/payments", "X-Merchant-Id", merchant)
		if status != http.StatusServiceUnavailable || !strings.Contains(string(body), `"token_rate_limited"`) {
			t.Fatalf("%s: %d %s, want 503 token_rate_limited", merchant, status, body)
		}
		ra, err := strconv.Atoi(hdr.Get("Retry-After"))
		// The hold is 600 s; later answers say what is left (whole
		// seconds, rounded up), allowing a slow machine a minute.
		if err != nil || ra > 600 || ra < 540 || (i == 0 && ra != 600) {
			t.Fatalf("%s: Retry-After %q, want the 10-minute hold the broker applies (600 on the first answer, then what is left)", merchant, hdr.Get("Retry-After"))
		}
	}
	if n := sb.TokenRequests(); n != 1 {
		t.Fatalf("token requests = %d, want 1: the provider is held", n)
	}
}

// guardCaddyfile writes a registry (the sandbox's Nuapay provider, the
// explicit merchant acme, then extra TOML) and returns a Caddyfile: the
// token_broker app on it with the global lines appDirectives, and a
// loopback site with the lines site before a token_broker route to the
// sandbox's echo.
func guardCaddyfile(t *testing.T, extraTOML, appDirectives, site string) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "merchants.toml")
	toml := `[providers.nuapay]
type = "nuapay"
base_url = "{env.SANDBOX_URL}"
api_key = "{env.NUAPAY_API_KEY}"
timeout = "5s"

[merchants.acme]
provider = "nuapay"
organisation = "org-acme"
scopes = ["openbanking_pisp"]
` + extraTOML
	if err := os.WriteFile(path, []byte(toml), 0o600); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TOKEN_BROKER_CONFIG", path)
	return `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
` + appDirectives + `
	}
	persist_config off
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
` + site + `
	handle {
		token_broker
		reverse_proxy {$SANDBOX_URL}
	}
}
`
}

// TestFailingMerchantIDsKeepNoWildcardSlot: five merchant ids whose token
// requests fail (organisations the provider does not know) fill a
// wildcard with max_active = 5, yet merchants that can get a token are
// served at once, not refused with too_many_merchants for idle_timeout.
func TestFailingMerchantIDsKeepNoWildcardSlot(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, guardCaddyfile(t, `
[merchants."*"]
provider = "nuapay"
organisation = "{merchant}"
scopes = ["openbanking_pisp"]
max_active = 5
idle_timeout = "2h"
`, "", ""))
	for i := range 5 {
		status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", fmt.Sprint("org-unknown-", i))
		if status != http.StatusBadGateway || !strings.Contains(string(body), `"token_refused"`) {
			t.Fatalf("org-unknown-%d: %d %s, want 502 token_refused", i, status, body)
		}
	}
	for _, org := range []string{"org-acme", "org-globex", "org-initech"} {
		e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", org)
		if !e.Authorization.Valid || e.Authorization.Organisation != org {
			t.Fatalf("%s: upstream token %+v, want one for %s", org, e.Authorization, org)
		}
	}
	// Served merchants keep their slots: two more failing ids share the
	// two slots left, and a sixth served merchant would be refused.
	for i := 5; i < 8; i++ {
		if status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", fmt.Sprint("org-unknown-", i)); status != http.StatusBadGateway {
			t.Fatalf("org-unknown-%d: %d %s, want 502", i, status, body)
		}
	}
	if n := sb.TokenRequests(); n != 11 {
		t.Fatalf("token requests = %d, want 11 (one per merchant id)", n)
	}
}

// TestOrganisationListingCappedInTotal: a provider whose organisations list
// runs to 150 pages of about 0.95 MB is read up to the default budget over
// all pages (max_organisations × 1 KiB), then refused with an error that
// says what to change; the last good list stays in force: a listed
// merchant is served, an organisation only the oversized list named is
// not.
func TestOrganisationListingCappedInTotal(t *testing.T) {
	sb, sandboxURL := startSandbox(t)
	var hostile atomic.Bool
	var pages atomic.Int64
	pad := strings.Repeat("x", 9500)
	provider := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if !hostile.Load() || r.URL.Path != "/organisations" {
			sb.ServeHTTP(w, r)
			return
		}
		pages.Add(1)
		page, _ := strconv.Atoi(r.URL.Query().Get("pagenumber"))
		var b strings.Builder
		b.WriteString(`{"data":[`)
		for i := range 100 {
			if i > 0 {
				b.WriteByte(',')
			}
			fmt.Fprintf(&b, `{"id":"org-hostile-%d","name":"%s"}`, (page-1)*100+i, pad)
		}
		b.WriteString(`],"page":{"totalPages":150}}`)
		w.Header().Set("Content-Type", "application/json")
		io.WriteString(w, b.String())
	}))
	t.Cleanup(provider.Close)
	t.Setenv("SANDBOX_URL", provider.URL) // the registry's provider
	base := startCaddy(t, guardCaddyfile(t, `
[merchants."*"]
provider = "nuapay"
organisation = "{merchant}"
scopes = ["openbanking_pisp"]
only_listed_organisations = true
`, "", ""))
	t.Setenv("SANDBOX_URL", sandboxURL)

	if status, body := adminCall(t, "POST", "/token_broker/providers/nuapay/organisations"); status != http.StatusOK {
		t.Fatalf("good list: %d %s", status, body)
	}
	hostile.Store(true)
	status, body := adminCall(t, "POST", "/token_broker/providers/nuapay/organisations")
	if status != http.StatusBadGateway || !strings.Contains(body, "not used") || !strings.Contains(body, "max_organisations") ||
		!strings.Contains(body, "the last good list stays in force") {
		t.Fatalf("oversized list: %d %s; want 502 saying the list is not used, what to raise, and that the last good list stays", status, body)
	}
	if n := pages.Load(); n >= 150 {
		t.Errorf("the oversized list was read to its end (%d pages)", n)
	}
	for _, tt := range []struct {
		merchant string
		status   int
	}{{"org-globex", 200}, {"org-hostile-1", 403}} {
		if got, body := get(t, base+"/tpp/payments", "X-Merchant-Id", tt.merchant); got != tt.status {
			t.Errorf("%s after the oversized list: %d %s, want %d", tt.merchant, got, body, tt.status)
		}
	}
}

// TestSidecarSiteRefusesForeignHostsAndCrossSite: with the documented
// `http://:8080` site (the root Caddyfile), the token_broker routes and
// the consent links endpoint answer loopback Host names only, and refuse
// browsers' cross-site requests, before any token request and without
// forwarding: a DNS-rebinding page (its own name as Host) and a page on
// another site (a text/plain POST needs no preflight) get nothing. The
// consent site, reached by merchants' browsers on the partner's domain,
// is not restricted. allowed_hosts adds names.
func TestSidecarSiteRefusesForeignHostsAndCrossSite(t *testing.T) {
	sb, _ := startSandbox(t)
	base := startCaddy(t, sandboxCaddyfile(t))
	port := strings.TrimPrefix(base, "http://127.0.0.1:")
	consentSite := os.Getenv("SANDBOX_CONSENT_SITE")
	waitListening(t, strings.TrimPrefix(consentSite, "http://"))

	type answer struct {
		status int
		code   string // the JSON error; "" for a success
	}
	call := func(t *testing.T, target, method, path, host string, headers ...string) (int, string) {
		t.Helper()
		req := method + " " + path + " HTTP/1.1\r\nHost: " + host + "\r\nConnection: close\r\n"
		for i := 0; i+1 < len(headers); i += 2 {
			req += headers[i] + ": " + headers[i+1] + "\r\n"
		}
		if method == "POST" {
			body := `{"merchant":"hooli"}`
			req += "Content-Type: text/plain\r\nContent-Length: " + strconv.Itoa(len(body)) + "\r\n\r\n" + body
		} else {
			req += "\r\n"
		}
		resp, body := rawRequest(t, target, req)
		return resp.StatusCode, body
	}
	check := func(t *testing.T, status int, body string, want answer) {
		t.Helper()
		if status != want.status {
			t.Fatalf("%d %s, want %d %s", status, body, want.status, want.code)
		}
		if want.code != "" {
			var eb struct{ Error, Message string }
			if err := json.Unmarshal([]byte(body), &eb); err != nil || eb.Error != want.code || eb.Message == "" {
				t.Fatalf("body %s, want a JSON error %q with a message", body, want.code)
			}
		}
	}
	local := "127.0.0.1:" + port
	for _, tt := range []struct {
		name, method, path, host string
		headers                  []string
		want                     answer
	}{
		{"loopback IP", "GET", "/tpp/payments", local, nil, answer{200, ""}},
		{"localhost", "GET", "/tpp/payments", "localhost:" + port, nil, answer{200, ""}},
		{"LOCALHOST without port", "GET", "/tpp/payments", "LOCALHOST", nil, answer{200, ""}},
		{"IPv6 loopback", "GET", "/tpp/payments", "[::1]:" + port, nil, answer{200, ""}},
		{"rebinding name", "GET", "/tpp/payments", "attacker.example:" + port, nil, answer{421, "host_not_allowed"}},
		{"name ending in localhost", "GET", "/tpp/payments", "localhost.attacker.example", nil, answer{421, "host_not_allowed"}},
		{"cross-site fetch", "GET", "/tpp/payments", local, []string{"Sec-Fetch-Site", "cross-site"}, answer{403, "cross_site_request"}},
		{"same-site fetch", "POST", "/tpp/payments", local, []string{"Sec-Fetch-Site", "same-site"}, answer{403, "cross_site_request"}},
		{"same-origin fetch", "GET", "/tpp/payments", local, []string{"Sec-Fetch-Site", "same-origin"}, answer{200, ""}},
		{"typed in the address bar", "GET", "/tpp/payments", local, []string{"Sec-Fetch-Site", "none"}, answer{200, ""}},
		{"foreign Origin", "POST", "/tpp/payments", local, []string{"Origin", "https://attacker.example"}, answer{403, "cross_site_request"}},
		{"null Origin", "POST", "/tpp/payments", local, []string{"Origin", "null"}, answer{403, "cross_site_request"}},
		{"own Origin", "POST", "/tpp/payments", local, []string{"Origin", "http://" + local}, answer{200, ""}},
		{"links, rebinding name", "POST", "/consent/links", "attacker.example:" + port, nil, answer{421, "host_not_allowed"}},
		{"links, cross-site text/plain", "POST", "/consent/links", local, []string{"Sec-Fetch-Site", "cross-site"}, answer{403, "cross_site_request"}},
		{"links, foreign Origin", "POST", "/consent/links", local, []string{"Origin", "https://attacker.example"}, answer{403, "cross_site_request"}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			before := sb.TokenRequests()
			status, body := call(t, base, tt.method, tt.path, tt.host, append([]string{"X-Merchant-Id", "acme"}, tt.headers...)...)
			check(t, status, body, tt.want)
			if tt.want.code != "" {
				if n := sb.TokenRequests() - before; n != 0 {
					t.Errorf("a refused request made %d token requests", n)
				}
				if strings.Contains(body, `"url"`) || strings.Contains(body, `"authorization"`) {
					t.Errorf("a refused request got an answer from behind the guard: %s", body)
				}
			}
		})
	}
	// The application's own link request still works.
	if status, body := call(t, base, "POST", "/consent/links", local); status != http.StatusOK || !strings.Contains(body, `"url"`) {
		t.Fatalf("links from the application: %d %s, want 200 with a link", status, body)
	}
	// The consent site answers merchants' browsers under the partner's
	// name, cross-site navigations included (the bank redirects back).
	status, body := call(t, consentSite, "GET", "/consent/start?link=unknown", "callback.partner.example", "Sec-Fetch-Site", "cross-site")
	if status == http.StatusMisdirectedRequest || strings.Contains(body, "host_not_allowed") || strings.Contains(body, "cross_site_request") {
		t.Fatalf("consent site: %d %s, want the consent handler's own answer", status, body)
	}

	// allowed_hosts adds names (any port); others stay refused.
	loadCaddy(t, guardCaddyfile(t, "", "\t\tallowed_hosts sidecar.payments.svc 10.1.2.3", ""))
	if status, body := get(t, base+"/tpp/payments", "X-Merchant-Id", "acme"); status != http.StatusOK { // get retries a reload's reset
		t.Fatalf("after the reload: %d %s", status, body)
	}
	for _, tt := range []struct {
		host string
		want answer
	}{
		{"sidecar.payments.svc:" + port, answer{200, ""}},
		{"SIDECAR.payments.svc.", answer{200, ""}},
		{"10.1.2.3:" + port, answer{200, ""}},
		{"localhost:" + port, answer{200, ""}},
		{"other.payments.svc:" + port, answer{421, "host_not_allowed"}},
	} {
		t.Run("allowed_hosts "+tt.host, func(t *testing.T) {
			status, body := call(t, base, "GET", "/tpp/payments", tt.host, "X-Merchant-Id", "acme")
			check(t, status, body, tt.want)
		})
	}
}

// TestAllowedHostsConfig: allowed_hosts is parsed strictly, from a
// Caddyfile (file and line) and from JSON.
func TestAllowedHostsConfig(t *testing.T) {
	startSandbox(t)
	for _, tt := range []struct{ directive, want string }{
		{"allowed_hosts", "allowed_hosts needs at least one host name"},
		{"allowed_hosts sidecar:8080", `allowed_hosts[0] "sidecar:8080": want a host name or IP address without scheme or port`},
		{"allowed_hosts http://sidecar", "without scheme or port"},
		{"allowed_hosts a\n\t\tallowed_hosts b", "allowed_hosts"},
	} {
		cf := guardCaddyfile(t, "", "\t\t"+tt.directive, "")
		_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(cf), map[string]any{"filename": "Caddyfile"})
		if err == nil || !strings.Contains(err.Error(), tt.want) || !strings.Contains(err.Error(), "Caddyfile:") {
			t.Errorf("%q: %v, want an error at a Caddyfile line saying %q", tt.directive, err, tt.want)
		}
	}
	cfg, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(guardCaddyfile(t, "", "\t\tallowed_hosts sidecar.svc", "")), map[string]any{"filename": "Caddyfile"})
	if err != nil || !strings.Contains(string(cfg), `"allowed_hosts":["sidecar.svc"]`) {
		t.Fatalf("adapted: %v %s", err, cfg)
	}
	bad := strings.Replace(string(cfg), `"allowed_hosts":["sidecar.svc"]`, `"allowed_hosts":["sidecar.svc:80"]`, 1)
	if err := caddy.Load([]byte(bad), true); err == nil || !strings.Contains(err.Error(), "allowed_hosts[0]") {
		if err == nil {
			caddy.Stop()
		}
		t.Fatalf("JSON allowed_hosts with a port: %v, want a load error naming allowed_hosts[0]", err)
	}
}
