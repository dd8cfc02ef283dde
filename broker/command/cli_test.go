package command

import (
	"bytes"
	"errors"
	"io"
	"net/http"
	"strings"
	"testing"

	"github.com/spf13/cobra"
)

// TestAddSubcommands: each subcommand finds its admin address or config
// through the Caddy services, with its flags, and a failure it printed
// exits 1 without cobra's error line or usage.
func TestAddSubcommands(t *testing.T) {
	ready := func(_, _, _ string, _ http.Header, _ io.Reader) (*http.Response, error) {
		return &http.Response{StatusCode: http.StatusOK, Body: io.NopCloser(strings.NewReader(`{"ready":true,"live":true,"reason":"ready: all good"}`))}, nil
	}
	noAddress := func(string, []byte, string, string) (string, error) { return "", errors.New("no such config") }
	tests := []struct {
		name       string
		args       []string
		c          Caddy
		wantErr    bool
		wantOut    string
		wantStderr string
	}{
		{name: "health", args: []string{"health", "--address", "localhost:2019"}, wantOut: "ready: all good",
			c: Caddy{Request: ready, AdminAddress: func(address string, cfg []byte, file, adapter string) (string, error) {
				if address != "localhost:2019" || cfg != nil || file != "" || adapter != "" {
					return "", errors.New("wrong flags")
				}
				return address, nil
			}}},
		{name: "health without address", args: []string{"health", "--config", "Caddyfile"}, wantErr: true,
			wantStderr: "not ready: finding the admin address: no such config", c: Caddy{Request: ready, AdminAddress: noAddress}},
		{name: "status without address", args: []string{"status"}, wantErr: true,
			wantStderr: "finding the admin address: no such config", c: Caddy{Request: ready, AdminAddress: noAddress}},
		{name: "status page without json", args: []string{"status", "--after", "m55"}, wantErr: true,
			wantStderr: "--after and --limit choose the page of --json: add --json", c: Caddy{Request: ready,
				AdminAddress: func(string, []byte, string, string) (string, error) { return "localhost:2019", nil }}},
		{name: "status negative limit", args: []string{"status", "--json", "--limit", "-5"}, wantErr: true,
			wantStderr: "--limit -5: want a number of merchants from 1 to 1000", c: Caddy{Request: ready,
				AdminAddress: func(string, []byte, string, string) (string, error) { return "localhost:2019", nil }}},
		{name: "status limit over the most", args: []string{"status", "--json", "--limit", "1001"}, wantErr: true,
			wantStderr: "--limit 1001: want a number of merchants from 1 to 1000", c: Caddy{Request: ready,
				AdminAddress: func(string, []byte, string, string) (string, error) { return "localhost:2019", nil }}},
		{name: "validate without config", args: []string{"validate", "--config", "nowhere", "--adapter", "caddyfile"}, wantErr: true,
			wantStderr: "loading the config: nowhere caddyfile: no such file", c: Caddy{LoadConfig: func(file, adapter string) ([]byte, string, string, error) {
				return nil, "", "", errors.New(file + " " + adapter + ": no such file")
			}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			root := &cobra.Command{Use: "token-broker"}
			AddSubcommands(root, tt.c)
			var out, stderr bytes.Buffer
			root.SetOut(&out)
			root.SetErr(&stderr)
			root.SetArgs(tt.args)
			err := root.Execute()
			if (err != nil) != tt.wantErr || tt.wantErr && !errors.Is(err, ErrFailed) {
				t.Fatalf("error %v, want an error: %v", err, tt.wantErr)
			}
			if !strings.Contains(out.String(), tt.wantOut) || tt.wantStderr == "" && stderr.Len() > 0 ||
				!strings.Contains(stderr.String(), tt.wantStderr) || strings.Contains(stderr.String(), "Usage:") || strings.Contains(stderr.String(), "Error:") {
				t.Errorf("out %q err %q, want out with %q, err with %q", out.String(), stderr.String(), tt.wantOut, tt.wantStderr)
			}
		})
	}
}
