package command

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
	"testing"
	"time"

	"github.com/tokenbroker/caddy-token-broker/broker"
	"github.com/tokenbroker/caddy-token-broker/broker/adminapi"
	"github.com/tokenbroker/caddy-token-broker/broker/oauth/consentweb"
	"github.com/tokenbroker/caddy-token-broker/broker/opstate"
	"github.com/tokenbroker/caddy-token-broker/config"
	"github.com/tokenbroker/caddy-token-broker/integration/brokertest"
)

// adminClient is an AdminRequest over plain HTTP that fails as Caddy's
// (caddycmd.AdminAPIRequest) does: an answer of 400 or more is an error
// quoting its status and body. addr is the server's URL.
func adminClient(addr, method, uri string, headers http.Header, body io.Reader) (*http.Response, error) {
	req, err := http.NewRequest(method, addr+uri, body)
	if err != nil {
		return nil, err
	}
	for k, v := range headers {
		req.Header[k] = v
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		return nil, fmt.Errorf("performing request: %v", err)
	}
	if resp.StatusCode >= 400 {
		defer resp.Body.Close()
		b, _ := io.ReadAll(resp.Body)
		return nil, fmt.Errorf("caddy responded with error: HTTP %d: %s", resp.StatusCode, b)
	}
	return resp, nil
}

// adminErrorJSON answers as Caddy's admin API answers an error.
func adminErrorJSON(w http.ResponseWriter, status int, msg string) {
	w.WriteHeader(status)
	json.NewEncoder(w).Encode(map[string]string{"error": msg})
}

// stateServer serves GET /token_broker/state with opstate.Build over a
// registry of 60 Nuapay merchants, m00 to m59, of which the tracker saw
// m00 to m54 refused for an unknown organisation, at now.
func stateServer(t *testing.T, now time.Time) *httptest.Server {
	t.Helper()
	reg := "[providers.np]\ntype = \"nuapay\"\nbase_url = \"http://127.0.0.1:1\"\napi_key = \"{env.K}\"\n"
	for i := range 60 {
		reg += fmt.Sprintf("\n[merchants.m%02d]\nprovider = \"np\"\norganisation = \"org-%02d\"\nscopes = [\"s\"]\n", i, i)
	}
	path := filepath.Join(t.TempDir(), "merchants.toml")
	if err := os.WriteFile(path, []byte(reg), 0o600); err != nil {
		t.Fatal(err)
	}
	r, err := config.LoadWith(path, config.Options{LookupEnv: func(string) (string, bool) { return "key", true }})
	if err != nil {
		t.Fatal(err)
	}
	br := broker.New(broker.Options{Now: func() time.Time { return now }})
	t.Cleanup(br.Close)
	tr := opstate.NewTracker(opstate.TrackerOptions{Now: func() time.Time { return now.Add(-3 * time.Minute) }})
	unknown := &broker.APIError{Provider: "nuapay", StatusCode: 404, Code: "40400", Err: broker.ErrUnknownOrganisation}
	for i := range 55 {
		tr.Fetched("np", brokertest.NewBinding("np#1", nil, broker.Request{Merchant: fmt.Sprintf("m%02d", i)}), nil, unknown)
	}
	src := opstate.Sources{Registry: r, Broker: br, Tracker: tr}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if req.URL.Path != "/token_broker/state" {
			adminErrorJSON(w, 404, "not found")
			return
		}
		q, err := opstate.ParseQuery(req.URL.Query())
		if err != nil {
			adminErrorJSON(w, 400, err.Error())
			return
		}
		json.NewEncoder(w).Encode(opstate.Build(src, q, now))
	}))
	t.Cleanup(srv.Close)
	return srv
}

// Status prints aligned tables of the providers, the merchants needing
// attention (at most MaxListed, then how many more) and the counts by
// state; --state lists another state; --json prints the report; an
// instance that cannot be asked fails with a sentence.
func TestStatus(t *testing.T) {
	now := time.Date(2026, 12, 6, 23, 0, 0, 0, time.UTC)
	srv := stateServer(t, now)
	notRunning := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		adminErrorJSON(w, 404, "the token_broker app is not running")
	}))
	t.Cleanup(notRunning.Close)
	closed := httptest.NewServer(http.NotFoundHandler())
	closed.Close()
	tests := []struct {
		name    string
		addr    string
		q       StatusQuery
		wantErr bool
		want    []string // regular expressions the output matches
		wantNot []string
	}{
		{name: "needing attention", addr: srv.URL, want: []string{
			`(?m)^PROVIDERS\nNAME +TYPE +STATUS +BREAKER +BACKOFF UNTIL +REQUESTS/FAILURES \(5m0s\) +MERCHANTS +LAST ERROR\n` +
				`np +nuapay +\S+ +closed +- +55/55 +60 +token_refused 3m ago \(22:57:00 UTC\)\n`,
			`(?m)^MERCHANTS NEEDING ATTENTION\nMERCHANT +PROVIDER +ORGANISATION +STATE +LAST ERROR +BACKOFF UNTIL +TOKEN EXPIRES\n` +
				`m00 +np +org-00 +unknown_organisation +token_refused 3m ago \(22:57:00 UTC\) +- +-\n`,
			`(?m)^m49 +np +org-49 +unknown_organisation `,
			`(?m)^\.\.\. and 5 more: caddy token-broker status --state STATE --json`,
			`(?m)^MERCHANTS BY STATE\n +refused +0\n +unknown_organisation +55\n`,
			`(?m)^ +idle +5\n +total +60\n\z`,
		}, wantNot: []string{`(?m)^m50 `}},
		{name: "one state", addr: srv.URL, q: StatusQuery{State: opstate.StateIdle}, want: []string{
			`(?m)^MERCHANTS idle\n`, `(?m)^m55 +np +org-55 +idle +- +- +-\n`, `(?m)^m59 `,
		}, wantNot: []string{`(?m)^m00 `, `more:`}},
		{name: "json", addr: srv.URL, q: StatusQuery{JSON: true, State: opstate.StateIdle}, want: []string{
			`"total": 5`, `"merchant": "m55"`, `"state": "idle"`,
		}},
		{name: "unknown provider", addr: srv.URL, q: StatusQuery{Provider: "nq"}, wantErr: true, want: []string{
			`^the token broker at admin address http://\S+ has no provider "nq": its providers are np\n$`}},
		{name: "unknown provider, json", addr: srv.URL, q: StatusQuery{Provider: "nq", JSON: true}, wantErr: true, want: []string{
			`^the token broker at admin address http://\S+ has no provider "nq": its providers are np\n$`}},
		{name: "json, a page", addr: srv.URL, q: StatusQuery{JSON: true, State: opstate.StateIdle, After: "m55", Limit: 2}, want: []string{
			`"merchant": "m56"`, `"merchant": "m57"`, `"next": "m57"`,
		}, wantNot: []string{`"merchant": "m55"`, `"merchant": "m58"`}},
		{name: "unknown state", addr: srv.URL, q: StatusQuery{State: "sad"}, wantErr: true, want: []string{`^unknown state "sad": one of \[refused `}},
		{name: "app not running", addr: notRunning.URL, wantErr: true, want: []string{
			`^the Caddy at admin address http://\S+ does not run the token_broker app: configure the token_broker global option\n$`}},
		{name: "nothing there", addr: closed.URL, wantErr: true, want: []string{
			`^cannot reach the admin API at http://\S+ \(is Caddy running, and is this its admin address\? --address names another\): `}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			err := Status(IO{Out: &out, Err: &errOut}, adminClient, tt.addr, tt.q, now)
			got := out.String()
			if tt.wantErr {
				got = errOut.String()
				if err != ErrFailed || out.Len() > 0 {
					t.Fatalf("Status: %v, out %q; want ErrFailed and nothing on Out", err, out.String())
				}
			} else if err != nil || errOut.Len() > 0 {
				t.Fatalf("Status: %v, err %q", err, errOut.String())
			}
			for _, re := range tt.want {
				if !regexp.MustCompile(re).MatchString(got) {
					t.Errorf("output does not match %s:\n%s", re, got)
				}
			}
			for _, re := range tt.wantNot {
				if regexp.MustCompile(re).MatchString(got) {
					t.Errorf("output matches %s:\n%s", re, got)
				}
			}
		})
	}
}

func TestWhen(t *testing.T) {
	now := time.Date(2026, 12, 6, 23, 0, 0, 0, time.UTC)
	at := func(d time.Duration) *time.Time { t := now.Add(d); return &t }
	tests := []struct {
		t    *time.Time
		want string
	}{
		{nil, "-"},
		{at(42 * time.Second), "in 42s (23:00:42 UTC)"},
		{at(-3*time.Minute - 10*time.Second), "3m ago (22:56:50 UTC)"},
		{at(-5 * time.Hour), "5h ago (18:00:00 UTC)"},
		{at(2 * time.Hour), "in 2h (2026-12-07 01:00 UTC)"},
		{at(-72 * time.Hour), "3d ago (2026-12-03 23:00 UTC)"},
	}
	for _, tt := range tests {
		if got := when(tt.t, now); got != tt.want {
			t.Errorf("when(%v) = %q, want %q", tt.t, got, tt.want)
		}
	}
}

// ConsentLink prints the link alone on Out; a merchant whose provider
// does not use consent gets a sentence saying so.
func TestConsentLink(t *testing.T) {
	now := time.Date(2026, 12, 6, 23, 0, 0, 0, time.UTC)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		var req consentweb.LinkRequest
		if r.Method != http.MethodPost || r.URL.Path != "/token_broker/consent/links" || json.NewDecoder(r.Body).Decode(&req) != nil {
			adminErrorJSON(w, 400, "bad request")
			return
		}
		if req.Merchant != "acme" {
			adminErrorJSON(w, 409, fmt.Sprintf("merchant %q: provider \"nuapay\" has no consent table ([providers.nuapay.consent])", req.Merchant))
			return
		}
		json.NewEncoder(w).Encode(consentweb.LinkResponse{Merchant: req.Merchant, Provider: "bank",
			URL: "https://cb.example/consent/start?link=abc&r=" + req.ReturnURL, Expires: now.Add(10 * time.Minute)})
	}))
	t.Cleanup(srv.Close)
	tests := []struct {
		merchant, returnURL string
		wantErr             bool
		wantOut, wantErrOut string
	}{
		{"acme", "https://app.example/", false, "https://cb.example/consent/start?link=abc&r=https://app.example/\n",
			"consent link for acme at bank: one use, expires in 10m (23:10:00 UTC)\n"},
		{"np1", "", true, "", `no consent link for np1: its provider does not use consent (only a provider with grant refresh_token and a consent table does); ` +
			`the token broker at admin address ` + srv.URL + ` answered HTTP 409: merchant "np1": provider "nuapay" has no consent table ([providers.nuapay.consent])` + "\n"},
	}
	for _, tt := range tests {
		t.Run(tt.merchant, func(t *testing.T) {
			var out, errOut bytes.Buffer
			err := ConsentLink(IO{Out: &out, Err: &errOut}, adminClient, srv.URL, tt.merchant, tt.returnURL, now)
			if (err != nil) != tt.wantErr || out.String() != tt.wantOut || errOut.String() != tt.wantErrOut {
				t.Fatalf("ConsentLink: %v\nout %q\nerr %q", err, out.String(), errOut.String())
			}
		})
	}
}

// Check prints what the provider answered in words, and fails when the
// check or the registries' validation does.
func TestCheck(t *testing.T) {
	until := time.Date(2026, 12, 6, 23, 0, 42, 0, time.UTC)
	answers := map[string]adminapi.CheckResult{
		"acme": {Merchant: "acme", Provider: "nuapay", OK: true, Outcome: "ok", Called: true, Fingerprint: "1a2b3c4d", ExpiresInSeconds: 600,
			Message: "nuapay issued a token (fingerprint 1a2b3c4d, expires in 10m0s); it is cached and served to the merchant's requests"},
		"badkey": {Merchant: "badkey", Provider: "nuapay", Outcome: "token_refused", Called: true, ProviderStatus: 401, ProviderError: "40100",
			Message: "the provider refused the credentials; check api_key of [providers.nuapay] in merchants.toml:1"},
		"held": {Merchant: "held", Provider: "nuapay", Outcome: "token_refused", ProviderStatus: 401, ProviderError: "40100", NotCalledUntil: &until,
			Message: "the broker does not call nuapay for this merchant before 2026-12-06T23:00:42Z (in 42s): ..."},
		"bank1": {Merchant: "bank1", Provider: "bank", Outcome: "consent_required", Called: true, ProviderStatus: 400, ProviderError: "invalid_grant",
			Message: "the merchant's consent at the provider is missing"},
		"down": {Merchant: "down", Provider: "nuapay", Outcome: "token_unavailable", Called: true, Message: "the provider's token API failed"},
		"hostile": {Merchant: "hostile", Provider: "nuapay", Outcome: "token_unavailable", Called: true, ProviderStatus: 500,
			ProviderError: "x\x1b]0;pwned\a\r\n", Message: "the provider's token API failed"},
	}
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		id, ok := strings.CutSuffix(strings.TrimPrefix(r.URL.Path, "/token_broker/merchants/"), "/check")
		res, known := answers[id]
		if r.Method != http.MethodPost || !ok || !known {
			adminErrorJSON(w, 404, fmt.Sprintf("merchant %q is not in the registry", id))
			return
		}
		json.NewEncoder(w).Encode(res)
	}))
	t.Cleanup(srv.Close)
	dir := t.TempDir()
	good, bad := filepath.Join(dir, "good.toml"), filepath.Join(dir, "bad.toml")
	os.WriteFile(good, []byte("[providers.np]\ntype = \"nuapay\"\nbase_url = \"http://127.0.0.1:1\"\napi_key = \"{env.HOME}\"\n\n[merchants.m]\nprovider = \"np\"\norganisation = \"o\"\nscopes = [\"s\"]\n"), 0o600)
	os.WriteFile(bad, []byte("[providers.np]\ntype = \"nuapay\"\n"), 0o600)
	cfgOf := func(path string) []byte { return []byte(`{"apps":{"token_broker":{"config":"` + path + `"}}}`) }
	tests := []struct {
		name, merchant, registry string
		wantErr                  bool
		wantOut, wantErrOut      string // regular expressions
	}{
		{"ok", "acme", "", false, `^acme: OK: nuapay issued a token \(fingerprint 1a2b3c4d, expires in 10m0s\)`, `^$`},
		{"refused", "badkey", "", true, `^$`,
			`^badkey: REFUSED by nuapay \(HTTP 401 40100\): the provider refused the credentials; check api_key of \[providers.nuapay\] in merchants.toml:1\n$`},
		{"not called", "held", "", true, `^$`, `^held: NOT CALLED \(nuapay\): the broker does not call nuapay for this merchant before `},
		{"consent", "bank1", "", true, `^$`, `^bank1: CONSENT NEEDED at bank \(HTTP 400 invalid_grant\): the merchant's consent`},
		{"down", "down", "", true, `^$`, `^down: FAILED at nuapay: the provider's token API failed\n$`},
		{"provider's code with control characters", "hostile", "", true, `^$`,
			`^hostile: FAILED at nuapay \(HTTP 500 "x\\x1b\]0;pwned\\a\\r\\n"\): the provider's token API failed\n$`},
		{"unknown merchant", "nobody", "", true, `^$`, `^nobody: not checked: the token broker at admin address \S+ answered HTTP 404: merchant "nobody" is not in the registry\n$`},
		{"valid registry, ok", "acme", good, false, `(?s)^` + regexp.QuoteMeta(good) + `: valid \(1 merchants, 1 providers\)\nacme: OK: `, `^$`},
		{"registry problems, ok", "acme", bad, true, `^acme: OK: `, regexp.QuoteMeta(bad) + `:\d+: `},
		{"registry only", "", good, false, `^` + regexp.QuoteMeta(good) + `: valid`, `^$`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, errOut bytes.Buffer
			cfg, file := []byte(nil), ""
			if tt.registry != "" {
				cfg, file = cfgOf(tt.registry), "Caddyfile"
			}
			address := func() (string, error) { return srv.URL, nil }
			err := Check(IO{Out: &out, Err: &errOut}, adminClient, cfg, file, func(s string) string { return s }, address, tt.merchant)
			if (err != nil) != tt.wantErr || !regexp.MustCompile(tt.wantOut).MatchString(out.String()) ||
				!regexp.MustCompile(tt.wantErrOut).MatchString(errOut.String()) {
				t.Fatalf("Check: %v\nout %q\nerr %q", err, out.String(), errOut.String())
			}
		})
	}
}

// TestPrintProvidersDPoP: a provider whose tokens are DPoP-bound gets a
// line with its key's algorithm and thumbprint; a bearer provider none.
func TestPrintProvidersDPoP(t *testing.T) {
	rep := opstate.Report{Providers: []opstate.Provider{
		{Name: "bank", Type: "oauth2", Status: "ok", Breaker: "closed", Window: "5m0s",
			DPoP: &opstate.DPoPKey{Alg: "EdDSA", JKT: "0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I"}},
		{Name: "np", Type: "nuapay", Status: "ok", Breaker: "closed", Window: "5m0s"},
	}}
	var b bytes.Buffer
	printProviders(&b, rep, time.Now())
	out := b.String()
	if !strings.Contains(out, "\nbank: DPoP-bound tokens, EdDSA key 0ZcOCORZNYy-DWpqq30jZyJGHTN0d2HglBV3uiguA4I\n") {
		t.Errorf("no DPoP line for bank:\n%s", out)
	}
	if strings.Contains(out, "np: DPoP") {
		t.Errorf("a DPoP line for the bearer provider:\n%s", out)
	}
}
