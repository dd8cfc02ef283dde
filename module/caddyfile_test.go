package module

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    Handler
		wantErr string
	}{
		{name: "config argument", input: `token_broker merchants.toml`,
			want: Handler{Config: "merchants.toml"}},
		{name: "all subdirectives", input: `token_broker {
				config /etc/tb/merchants.toml
				merchant {http.request.header.X-Org}
				scopes openbanking_aisp openbanking_pisp
				header X-Api-Token
				refresh_window 20%
				leeway 2s
				fetch_timeout 5s
				errors caddy
			}`,
			want: Handler{Config: "/etc/tb/merchants.toml", Merchant: "{http.request.header.X-Org}",
				Scopes: []string{"openbanking_aisp", "openbanking_pisp"}, Header: "X-Api-Token", RefreshWindow: 0.2,
				Leeway: caddy.Duration(2 * time.Second), FetchTimeout: caddy.Duration(5 * time.Second), Errors: "caddy"}},
		{name: "fraction window", input: "token_broker m.toml {\n refresh_window 0.5\n}", want: Handler{Config: "m.toml", RefreshWindow: 0.5}},
		{name: "no config", input: `token_broker`, wantErr: "needs the path of the TOML"},
		{name: "two args", input: `token_broker a.toml b.toml`, wantErr: "wrong argument count"},
		{name: "unknown", input: "token_broker m.toml {\n  scope x\n}", wantErr: "unrecognized subdirective 'scope', at Testfile:2"},
		{name: "duplicate", input: "token_broker m.toml {\n header A\n header B\n}", wantErr: "duplicate subdirective 'header', at Testfile:3"},
		{name: "config twice", input: "token_broker m.toml {\n config n.toml\n}", wantErr: "config given twice"},
		{name: "empty scopes", input: "token_broker m.toml {\n scopes\n}", wantErr: "wrong argument count"},
		{name: "window 100%", input: "token_broker m.toml {\n refresh_window 100%\n}", wantErr: "refresh_window '100%'"},
		{name: "window junk", input: "token_broker m.toml {\n refresh_window lots\n}", wantErr: "refresh_window 'lots'"},
		{name: "bad leeway", input: "token_broker m.toml {\n leeway soon\n}", wantErr: "leeway 'soon'"},
		{name: "bad errors", input: "token_broker m.toml {\n errors html\n}", wantErr: "errors must be json or caddy"},
		{name: "extra arg", input: "token_broker m.toml {\n header A B\n}", wantErr: "wrong argument count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var h Handler
			err := h.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(h, tt.want) {
				t.Fatalf("got %+v\nwant %+v", h, tt.want)
			}
		})
	}
}
