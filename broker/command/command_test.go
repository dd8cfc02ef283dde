package command

import (
	"bytes"
	"errors"
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

func TestHealth(t *testing.T) {
	answer := func(status int, body string) AdminRequest {
		return func(_, _, _ string, _ http.Header, _ io.Reader) (*http.Response, error) {
			if status != http.StatusOK {
				return nil, errors.New("HTTP " + http.StatusText(status) + " " + body)
			}
			return &http.Response{StatusCode: status, Body: io.NopCloser(strings.NewReader(body))}, nil
		}
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
		{"not ready (503)", func(_, _, _ string, _ http.Header, _ io.Reader) (*http.Response, error) {
			return nil, errors.New(`caddy responded with error: HTTP 503: {"ready":false,"reason":"not ready: loading"}`)
		}, false, true, "", "not ready: loading\n"},
		{"unreachable", answer(500, "boom"), false, true, "", "not ready: asking the token broker at admin address a: HTTP Internal Server Error boom\n"},
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
