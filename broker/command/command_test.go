package command

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"net/http"
	"slices"
	"strings"
	"testing"
)

func TestRegistryPaths(t *testing.T) {
	tests := []struct {
		name, cfg string
		want      []string
	}{
		{"none", `{"apps":{}}`, nil},
		{"app", `{"apps":{"token_broker":{"config":"/etc/a.toml"}}}`, []string{"/etc/a.toml"}},
		{"app and handlers, once each", `{"apps":{"token_broker":{"config":"a.toml"},"http":{"servers":{"s":{"routes":[
			{"handle":[{"handler":"token_broker","config":"b.toml"},{"handler":"token_broker","config":"a.toml"},{"handler":"file_server","config":"c.toml"}]}]}}}}}`,
			[]string{"a.toml", "b.toml"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, err := registryPaths([]byte(tt.cfg))
			if err != nil || !slices.Equal(got, tt.want) {
				t.Fatalf("registryPaths = %q, %v; want %q", got, err, tt.want)
			}
		})
	}
	if _, err := registryPaths([]byte("{")); err == nil {
		t.Fatal("a config that is not JSON was read")
	}
}

// Health prints the reason of a ready or unready instance, a 503's
// included, and the admin API's error in words otherwise.
func TestHealth(t *testing.T) {
	// answer fails as caddycmd.AdminAPIRequest does: an answer other than
	// 2xx is an error quoting its status and body.
	answer := func(status int, body string) AdminRequest {
		return func(_, _, _ string, _ http.Header, _ io.Reader) (*http.Response, error) {
			if status != http.StatusOK {
				return nil, fmt.Errorf("caddy responded with error: HTTP %d: %s", status, body)
			}
			return &http.Response{StatusCode: status, Body: io.NopCloser(strings.NewReader(body))}, nil
		}
	}
	unreachable := func(_, _, _ string, _ http.Header, _ io.Reader) (*http.Response, error) {
		return nil, errors.New("performing request: dial tcp 127.0.0.1:1: connect: connection refused")
	}
	tests := []struct {
		name            string
		request         AdminRequest
		live            bool
		wantErr         bool
		wantOut, wantEr string
	}{
		{"ready", answer(200, `{"ready":true,"live":true,"reason":"ready: 1 registry"}`), false, false, "ready: 1 registry\n", ""},
		{"live", answer(200, `{"ready":false,"live":true,"reason":"x"}`), true, false, "live: the token_broker app is running\n", ""},
		{"not ready (503)", answer(503, `{"ready":false,"reason":"not ready: loading"}`), false, true, "", "not ready: loading\n"},
		{"not live (503, app not running)", answer(503, `{"ready":false,"live":false,"reason":"not live: the token_broker app is not running: the loaded config has no token_broker global option or handler"}`),
			true, true, "", "not live: the token_broker app is not running: the loaded config has no token_broker global option or handler\n"},
		{"admin error", answer(500, `{"error":"boom"}`), false, true, "", "not ready: the token broker at admin address a answered HTTP 500: boom\n"},
		{"503 without a health answer", answer(503, `{"error":"busy"}`), false, true, "", "not ready: the token broker at admin address a answered HTTP 503: busy\n"},
		{"not JSON", answer(200, "<html>"), false, true, "", "not ready: reading the answer of GET /token_broker/health at admin address a: invalid character '<' looking for beginning of value\n"},
		{"unreachable", unreachable, false, true, "",
			"not ready: cannot reach the admin API at a (is Caddy running, and is this its admin address? --address names another): performing request: dial tcp 127.0.0.1:1: connect: connection refused\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var out, er bytes.Buffer
			err := Health(IO{Out: &out, Err: &er}, tt.request, "a", tt.live)
			if (err != nil) != tt.wantErr || out.String() != tt.wantOut || er.String() != tt.wantEr {
				t.Fatalf("Health: %v, out %q, err %q", err, out.String(), er.String())
			}
		})
	}
}

// TestRefreshToken: a merchant id that is missing or not an id (it goes
// into the admin API's path) is refused before standard input is read or
// the admin API asked; a valid one has the token read from standard input
// PUT to its refresh_token route, and the answer printed. When the admin
// API refuses, the error names the admin address, not the token, and
// nothing is printed.
func TestRefreshToken(t *testing.T) {
	const token = "rt-secret"
	tests := []struct {
		name     string
		merchant string
		refusal  string // the admin request's error (Caddy's "HTTP status: body"), "" for a 200
		wantErr  string // "" for no error
	}{
		{name: "missing", merchant: "", wantErr: "--merchant is required"},
		{name: "a path", merchant: "../tokens", wantErr: `--merchant "../tokens" is not a merchant id`},
		{name: "a space", merchant: "acme corp", wantErr: `--merchant "acme corp" is not a merchant id`},
		{name: "valid", merchant: "acme"},
		{name: "refused by the admin API", merchant: "acme",
			refusal: `caddy responded with error: HTTP 404: {"error":"merchant \"acme\" is not in the registry"}`,
			wantErr: `the token broker at admin address localhost:2019 answered HTTP 404: merchant "acme" is not in the registry`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var asked []string
			var sent string
			request := func(addr, method, uri string, _ http.Header, body io.Reader) (*http.Response, error) {
				b, _ := io.ReadAll(body)
				asked, sent = append(asked, addr+" "+method+" "+uri), string(b)
				if tt.refusal != "" {
					return nil, errors.New(tt.refusal)
				}
				return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader(`{"stored":true}`))}, nil
			}
			in := strings.NewReader(token + "\n")
			var out bytes.Buffer
			err := RefreshToken(IO{In: in, Out: &out, Err: io.Discard}, request, func() (string, error) { return "localhost:2019", nil }, tt.merchant)
			if tt.refusal != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) || strings.Contains(err.Error(), token) || out.Len() != 0 || sent != `{"refresh_token":"`+token+`"}` {
					t.Fatalf("error %v, sent %s, printed %q; want one with %q and not the token, the token sent, nothing printed", err, sent, out.String(), tt.wantErr)
				}
				return
			}
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("error %v, want one with %q", err, tt.wantErr)
				}
				if asked != nil || in.Len() != len(token)+1 {
					t.Fatalf("asked %q, %d bytes of standard input left: want nothing asked or read", asked, in.Len())
				}
				return
			}
			want := []string{"localhost:2019 PUT /token_broker/merchants/acme/refresh_token"}
			if err != nil || !slices.Equal(asked, want) || sent != `{"refresh_token":"`+token+`"}` || out.String() != "{\"stored\":true}\n" {
				t.Fatalf("error %v, asked %q with %s, printed %q; want %q with the token, the answer printed", err, asked, sent, out.String(), want)
			}
		})
	}
}
