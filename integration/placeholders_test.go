package integration

import (
	"net/http"
	"strings"
	"testing"
)

// TestPlaceholdersRenderThroughCaddy: the handler's placeholders are set
// without allocating and without a boxed copy per binding (interface
// values pointing at the binding's strings, issue 9) and are plain strings
// wherever Caddy uses placeholders: header_up on the way to the upstream,
// a respond body, the vars matcher and CEL expressions (which take no
// fmt.Stringer). The fingerprint is the one of the token the upstream got.
func TestPlaceholdersRenderThroughCaddy(t *testing.T) {
	_, sbURL := startSandbox(t)
	sandboxRegistryEnv(t)
	t.Setenv("UPSTREAM_URL", sbURL)
	base := startCaddy(t, `{
	admin 127.0.0.1:{$TOKEN_BROKER_ADMIN_PORT}
	token_broker {
		config {$TOKEN_BROKER_CONFIG}
	}
	persist_config off
}

http://:{$TOKEN_BROKER_PORT} {
	bind 127.0.0.1
	route /respond {
		token_broker
		@nuapay vars {http.token_broker.provider} nuapay-sandbox
		respond @nuapay "{http.token_broker.merchant} {http.token_broker.organisation} {http.token_broker.provider} {http.token_broker.fingerprint} {http.token_broker.cache}"
		respond "vars matcher did not match" 500
	}
	route /cel {
		token_broker
		@cel expression {http.token_broker.merchant} == "acme" && "org-acme" == {http.token_broker.organisation} && {http.token_broker.provider}.startsWith("nuapay") && size({http.token_broker.fingerprint}) == 8
		respond @cel "cel matched"
		respond "cel did not match" 500
	}
	route {
		token_broker
		reverse_proxy {$UPSTREAM_URL} {
			header_up X-Tb-Merchant {http.token_broker.merchant}
			header_up X-Tb-Organisation {http.token_broker.organisation}
			header_up X-Tb-Provider {http.token_broker.provider}
			header_up X-Tb-Fingerprint {http.token_broker.fingerprint}
			header_up X-Tb-Cache {http.token_broker.cache}
		}
	}
}
`)
	e := getEcho(t, base+"/tpp/payments", "X-Merchant-Id", "acme")
	fp := e.Authorization.Fingerprint
	if len(fp) != 8 || !e.Authorization.Valid {
		t.Fatalf("upstream authorization %+v: want a valid token", e.Authorization)
	}
	for h, want := range map[string]string{"X-Tb-Merchant": "acme", "X-Tb-Organisation": "org-acme",
		"X-Tb-Provider": "nuapay-sandbox", "X-Tb-Fingerprint": fp, "X-Tb-Cache": "miss"} {
		if got := echoHeader(e, h); got != want {
			t.Errorf("header_up %s: upstream got %q, want %q", h, got, want)
		}
	}
	if status, body := get(t, base+"/cel", "X-Merchant-Id", "acme"); status != http.StatusOK || string(body) != "cel matched" {
		t.Errorf("expression matcher: %d %q, want 200 \"cel matched\"", status, body)
	}
	status, body := get(t, base+"/respond", "X-Merchant-Id", "acme")
	if want := "acme org-acme nuapay-sandbox " + fp + " hit"; status != http.StatusOK || string(body) != want {
		t.Errorf("respond: %d %q, want 200 %q", status, body, want)
	}
}

// echoHeader returns the one value of a header the sandbox's echo reports.
func echoHeader(e echo, name string) string {
	for k, v := range e.Headers {
		if !strings.EqualFold(k, name) {
			continue
		}
		switch v := v.(type) {
		case string:
			return v
		case []any:
			if len(v) == 1 {
				s, _ := v[0].(string)
				return s
			}
		}
	}
	return ""
}
