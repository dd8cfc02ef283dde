package module

import (
	"reflect"
	"strings"
	"testing"
	"time"

	"github.com/caddyserver/caddy/v2"
	"github.com/caddyserver/caddy/v2/caddyconfig"
	"github.com/caddyserver/caddy/v2/caddyconfig/caddyfile"
)

func TestUnmarshalCaddyfile(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    Handler
		wantErr string
	}{
		{name: "bare", input: `token_broker`, want: Handler{}},
		{name: "all subdirectives", input: `token_broker {
				config /etc/tb/merchants.toml
				merchant {http.request.header.X-Org}
				scopes openbanking_aisp openbanking_pisp
				header authorization
				errors caddy
			}`,
			want: Handler{Config: "/etc/tb/merchants.toml", Merchant: "{http.request.header.X-Org}",
				Scopes: []string{"openbanking_aisp", "openbanking_pisp"}, Header: "authorization", Errors: "caddy"}},
		{name: "Proxy-Authorization header", input: "token_broker {\n header Proxy-Authorization\n}", wantErr: "reverse_proxy removes Proxy-Authorization"},
		{name: "other header", input: "token_broker {\n header X-Api-Token\n}", wantErr: "only be set in Authorization, which Caddy's logs redact, at Testfile:2"},
		{name: "body limit too large", input: "token_broker {\n retry_body_limit 1GiB\n}", wantErr: "at most 16MiB"},
		{name: "interaction id", input: "token_broker {\n interaction_id\n}", want: Handler{InteractionID: true}},
		{name: "interaction id with an argument", input: "token_broker {\n interaction_id yes\n}", wantErr: "wrong argument count"},
		{name: "retry", input: "token_broker {\n retry_on_401 any\n retry_body_limit 1MiB\n}", want: Handler{RetryOn401: "any", RetryBodyLimit: 1 << 20}},
		{name: "bad retry", input: "token_broker {\n retry_on_401 always\n}", wantErr: "retry_on_401 must be"},
		{name: "bad body limit", input: "token_broker {\n retry_body_limit lots\n}", wantErr: "retry_body_limit 'lots'"},
		{name: "argument", input: `token_broker merchants.toml`, wantErr: "takes no arguments (got 'merchants.toml')"},
		{name: "unknown", input: "token_broker {\n  scope x\n}", wantErr: "unrecognized subdirective 'scope', at Testfile:2"},
		{name: "duplicate", input: "token_broker {\n errors json\n errors caddy\n}", wantErr: "duplicate subdirective 'errors', at Testfile:3"},
		{name: "empty scopes", input: "token_broker {\n scopes\n}", wantErr: "wrong argument count"},
		{name: "bad errors", input: "token_broker {\n errors html\n}", wantErr: "errors must be json or caddy"},
		{name: "extra arg", input: "token_broker {\n header Authorization B\n}", wantErr: "wrong argument count"},
		{name: "broker setting on a route", input: "token_broker {\n leeway 2s\n}", wantErr: "unrecognized subdirective 'leeway'"},
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

func TestUnmarshalGlobalOption(t *testing.T) {
	tests := []struct {
		name    string
		input   string
		want    App
		wantErr string
	}{
		{name: "all", input: `token_broker {
				config /etc/tb/merchants.toml
				refresh_window 20%
				leeway 2s
				fetch_timeout 5s
			}`,
			want: App{Config: "/etc/tb/merchants.toml", RefreshWindow: 0.2,
				Leeway: caddy.Duration(2 * time.Second), FetchTimeout: caddy.Duration(5 * time.Second)}},
		{name: "fraction", input: "token_broker {\n refresh_window 0.5\n}", want: App{RefreshWindow: 0.5}},
		{name: "storage encryption keys", input: "token_broker {\n storage_encryption_key {file./run/secrets/k}\n storage_encryption_keys_old {env.OLD1} {env.OLD2}\n}",
			want: App{StorageEncryptionKey: "{file./run/secrets/k}", StorageEncryptionKeysOld: []string{"{env.OLD1}", "{env.OLD2}"}}},
		{name: "storage encryption key twice", input: "token_broker {\n storage_encryption_key a\n storage_encryption_key b\n}", wantErr: "duplicate subdirective 'storage_encryption_key', at Testfile:3"},
		{name: "storage encryption key without value", input: "token_broker {\n storage_encryption_key\n}", wantErr: "wrong argument count"},
		{name: "storage old keys without value", input: "token_broker {\n storage_encryption_keys_old\n}", wantErr: "wrong argument count"},
		{name: "fleet size", input: "token_broker {\n fleet_size 3\n}", want: App{FleetSize: 3}},
		{name: "budget wait", input: "token_broker {\n budget_wait 2s\n}", want: App{BudgetWait: caddy.Duration(2 * time.Second)}},
		{name: "budget wait junk", input: "token_broker {\n budget_wait soon\n}", wantErr: "budget_wait 'soon'"},
		{name: "fleet size zero", input: "token_broker {\n fleet_size 0\n}", wantErr: "fleet_size '0': want the number of sidecars that share the providers' rate limits, from 1 to 10000, at Testfile:2"},
		{name: "fleet size junk", input: "token_broker {\n fleet_size three\n}", wantErr: "fleet_size 'three'"},
		{name: "window 100%", input: "token_broker {\n refresh_window 100%\n}", wantErr: "refresh_window '100%'"},
		{name: "window junk", input: "token_broker {\n refresh_window lots\n}", wantErr: "refresh_window 'lots'"},
		{name: "bad leeway", input: "token_broker {\n leeway soon\n}", wantErr: "leeway 'soon'"},
		{name: "negative timeout", input: "token_broker {\n fetch_timeout -1s\n}", wantErr: "fetch_timeout '-1s'"},
		{name: "unknown", input: "token_broker {\n scopes a\n}", wantErr: "unrecognized subdirective 'scopes', at Testfile:2"},
		{name: "duplicate", input: "token_broker {\n config a\n config b\n}", wantErr: "duplicate subdirective 'config', at Testfile:3"},
		{name: "argument", input: "token_broker a.toml", wantErr: "wrong argument count"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var a App
			err := a.UnmarshalCaddyfile(caddyfile.NewTestDispenser(tt.input))
			if tt.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tt.wantErr) {
					t.Fatalf("err = %v, want %q", err, tt.wantErr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if !reflect.DeepEqual(a, tt.want) {
				t.Fatalf("got %+v\nwant %+v", a, tt.want)
			}
		})
	}
}

// A second token_broker global option is an error naming its line: it
// would replace the first one whole (its redis block among its settings).
func TestGlobalOptionTwice(t *testing.T) {
	input := "{\n\ttoken_broker {\n\t\tleeway 2s\n\t}\n\ttoken_broker {\n\t\tfetch_timeout 5s\n\t}\n}\n:8080 {\n\trespond ok\n}\n"
	_, _, err := caddyconfig.GetAdapter("caddyfile").Adapt([]byte(input), map[string]any{"filename": "Caddyfile"})
	if err == nil || !strings.Contains(err.Error(), "token_broker global option given twice") || !strings.Contains(err.Error(), "Caddyfile:5") {
		t.Fatalf("err = %v; want the second token_broker option refused at Caddyfile:5", err)
	}
}

// A negative duration in the app's JSON is named with its value.
func TestAppNegativeDurationNamed(t *testing.T) {
	for name, a := range map[string]App{
		"leeway -1s":        {Leeway: caddy.Duration(-time.Second)},
		"fetch_timeout -2s": {FetchTimeout: caddy.Duration(-2 * time.Second)},
		"budget_wait -3s":   {BudgetWait: caddy.Duration(-3 * time.Second)},
	} {
		if err := a.validate(); err == nil || !strings.Contains(err.Error(), name+" must not be negative") {
			t.Errorf("validate() = %v; want %q", err, name+" must not be negative")
		}
	}
}

// With several negative durations, the error names the first in the
// order of the options (leeway, fetch_timeout, budget_wait), every time.
func TestAppNegativeDurationsNamedInOrder(t *testing.T) {
	a := App{Leeway: caddy.Duration(-time.Second), FetchTimeout: caddy.Duration(-2 * time.Second), BudgetWait: caddy.Duration(-3 * time.Second)}
	for range 20 {
		if err := a.validate(); err == nil || !strings.Contains(err.Error(), "leeway -1s must not be negative") {
			t.Fatalf("validate() = %v; want leeway named", err)
		}
	}
	a.Leeway = 0
	for range 20 {
		if err := a.validate(); err == nil || !strings.Contains(err.Error(), "fetch_timeout -2s must not be negative") {
			t.Fatalf("validate() = %v; want fetch_timeout named", err)
		}
	}
}
