package config

import (
	"errors"
	"slices"
	"testing"
)

// TestErrorLines: every problem of a registry on a line of its own, file
// and line first, in file order.
func TestErrorLines(t *testing.T) {
	file := "[providers.p]\ntype = \"nuapay\"\nbase_url = \"https://nuapay.example\"\napi_key = \"{env.NUAPAY_API_KEY}\"\ntoken_lifetme = \"1h\"\n\n" +
		"[merchants.acme]\nprovider = \"q\"\norganisation = \"org-acme\"\nscope = [\"a\"]\n"
	_, err := parse("m.toml", []byte(file), testEnv())
	got := ErrorLines(err)
	want := []string{
		`m.toml:5: provider "p": field token_lifetme: unknown key "providers.p.token_lifetme": did you mean "token_lifetime"? (the keys of a provider of type nuapay: type, timeout, tls, rate_limit, rate_burst, base_url, api_key, token_lifetime, organisations_path)`,
		`m.toml:8: merchant "acme": field provider: unknown provider "q" (defined: p)`,
		`m.toml:10: merchant "acme": field scope: unknown key "merchants.acme.scope": did you mean "scopes"? (known keys here: provider, organisation, scopes, token_lifetime, audience, display_name)`,
	}
	if !slices.Equal(got, want) {
		t.Errorf("lines:\n%q\nwant\n%q", got, want)
	}
	if got := ErrorLines(errors.New("a\nb")); !slices.Equal(got, []string{"a", "b"}) {
		t.Errorf("plain error: %q", got)
	}
	if got := ErrorLines(nil); got != nil {
		t.Errorf("nil: %q", got)
	}
}
